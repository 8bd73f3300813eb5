"""train.py fit on the tiny CLIP: a killed run resumes as if it had not stopped; DDP with 2 CPU processes; validation
scores what training optimises."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TINY_CLIP = ROOT / "configs" / "tests" / "tiny_clip.yaml"


def _fit(workdir: Path, *extra: str, devices: int = 1) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "fit",
        f"--config={TINY_CLIP}",
        f"--trainer.default_root_dir={workdir}",
        f"--model.init_args.export_path={workdir / 'backbone.safetensors'}",
        *extra,
    ]
    if devices > 1:
        cmd += [f"--trainer.devices={devices}", "--trainer.strategy=ddp"]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "tests"),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
    }
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize(("kill_at", "saved", "workers"), [(5, 3, 0), (11, 9, 2)])
def test_killed_run_resumes_as_if_uninterrupted(tmp_path, kill_at, saved, workers):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()
    data = f"--data.init_args.num_workers={workers}"
    proc = _fit(straight, data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 8 steps per epoch; killed at the start of step `kill_at`: last.ckpt is the mid-epoch checkpoint of `saved`
    proc = _fit(
        killed, data, "--trainer.callbacks+=helpers.callbacks.KillAtStep", f"--trainer.callbacks.step={kill_at}"
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (killed / "backbone.safetensors").exists()
    last = killed / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == saved
    proc = _fit(killed, data, f"--ckpt_path={last}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(straight / "backbone.safetensors")
    b = load_file(killed / "backbone.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    # the checkpoint is usable by every module: load it as a backbone
    from regionembed.backbones import OpenCLIPBackbone

    backbone = OpenCLIPBackbone("re-tiny-vit", pretrained=str(killed / "checkpoints" / "last.ckpt"))
    torch.testing.assert_close(backbone.model.state_dict()["logit_scale"], b["logit_scale"])


@pytest.mark.ddp
def test_fit_ddp_two_processes(tmp_path):
    proc = _fit(tmp_path, devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "backbone.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    # 64 scenes / (8 per batch x 2 ranks) = 4 steps per epoch, 2 epochs; checkpoints every 3 steps: 3, 6
    assert ckpt["global_step"] == 6


@pytest.mark.parametrize("multi_positive", [False, True])
def test_validation_honours_multi_positive(multi_positive):
    """Validation scores what training optimises. Under ``multi_positive`` images with the same caption are each
    other's positives, so in ``val/i2t_top1_in_batch`` a top caption identical to the image's own is a hit; it used
    to count only for the first image of each caption (identical captions tie, argmax takes the first). ``val/loss``
    is the shared objective (the same number either way: identical captions have identical embeddings)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from regionembed.backbones import OpenCLIPBackbone
    from regionembed.losses import multi_positive_clip_loss
    from regionembed.modules import ContrastiveModule

    torch.manual_seed(0)
    module = ContrastiveModule(OpenCLIPBackbone("re-tiny-vit"), multi_positive=multi_positive).eval()
    images = torch.randn(6, 3, 32, 32)
    candidates = ["a red circle.", "a blue square.", "a green star."]
    backbone = module.backbone
    with torch.no_grad():  # caption each image with its best candidate: 6 images, 3 captions, so some repeat
        image = backbone.encode_image(images, normalize=True)
        best = (image @ backbone.encode_text(backbone.tokenize(candidates), normalize=True).T).argmax(1)
        captions = [candidates[k] for k in best]
        text = backbone.encode_text(backbone.tokenize(captions), normalize=True)
    groups = best if multi_positive else torch.arange(6)
    loss = multi_positive_clip_loss(image, text, backbone.logit_scale.exp(), groups)
    hits = (groups[(image @ text.T).argmax(1)] == groups).float().mean()
    if multi_positive:  # every image's top caption is its own: 1; the first-index count is lower
        assert hits == 1 and (image @ text.T).argmax(1).eq(torch.arange(6)).float().mean() < 1

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    samples = [{"image": im, "caption": c} for im, c in zip(images, captions, strict=True)]
    trainer.validate(module, dataloaders=DataLoader(samples, batch_size=6))
    torch.testing.assert_close(trainer.callback_metrics["val/loss"], loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(trainer.callback_metrics["val/i2t_top1_in_batch"], hits)
