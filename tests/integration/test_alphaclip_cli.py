"""train.py fit with the Alpha-CLIP module: export in the official format, evaluation next to the other region
methods, exact continuation after a kill, DDP with 2 CPU processes, W&B offline logging."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from regionembed.cli import infer_main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tests" / "tiny_alphaclip.yaml"
REGION_CLS = ROOT / "configs" / "tests" / "tiny_region_cls.yaml"


def _fit(workdir: Path, *extra: str, devices: int = 1, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "fit",
        f"--config={CONFIG}",
        f"--trainer.default_root_dir={workdir}",
        f"--model.init_args.export_path={workdir / 'alpha.safetensors'}",
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
        **(env_extra or {}),
    }
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("alpha_fit")
    proc = _fit(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_fit_exports_official_format_and_trains_the_image_side_only(trained):
    state = load_file(trained / "alpha.safetensors")
    assert state["conv1_alpha.weight"].abs().sum() > 0  # the zero-initialised conv has learned
    assert "transformer.resblocks.0.attn.in_proj.weight" in state
    assert not any(k.startswith(("token_embedding", "text")) for k in state)  # the visual tower only
    first = torch.load(trained / "checkpoints" / "epoch=0-step=3.ckpt", weights_only=True)["state_dict"]
    last = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    changed = {k for k in last if not torch.equal(first[k], last[k])}
    assert "backbone.alpha_embed.conv.weight" in changed
    assert any(k.startswith("backbone.model.visual.") for k in changed)
    assert all(k.startswith(("backbone.model.visual.", "backbone.alpha_embed.")) for k in changed), changed


def test_alpha_model_in_region_classification(trained, tmp_path):
    from regionembed.backbones import OpenCLIPBackbone

    # a Lightning checkpoint of the run loads as an Alpha-CLIP visual checkpoint too
    last = trained / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    loaded = OpenCLIPBackbone("re-tiny-vit", alpha_checkpoint=str(last))
    for name, p in loaded.named_parameters():
        if name.startswith(("model.visual.", "alpha_embed.")):
            torch.testing.assert_close(p, state[f"backbone.{name}"], rtol=0, atol=0, msg=name)
    alpha = {
        "class_path": "regionembed.backbones.OpenCLIPBackbone",
        "init_args": {"model_name": "re-tiny-vit", "alpha_checkpoint": str(trained / "alpha.safetensors")},
    }
    methods = [{"class_path": "regionembed.regions.GlobalEmbedding"}] + [
        {"class_path": "regionembed.regions.AlphaEmbedding", "init_args": {"alpha": kind, "backbone": alpha}}
        for kind in ("mask", "box", "whole")
    ]
    cli = infer_main(
        [
            "test",
            f"--config={REGION_CLS}",
            f"--model.init_args.methods={json.dumps(methods)}",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    results = cli.model.results
    assert set(results) == {"global", "alpha_mask", "alpha_box", "alpha_whole"}
    for row in results.values():
        assert 0 <= row["top1"] <= row["top5"] <= 1


def test_killed_run_resumes_with_the_same_continuation(trained, tmp_path):
    # 64 scenes / 8 = 8 steps per epoch, 2 epochs; killed at the start of step 5, last.ckpt holds step 3
    proc = _fit(tmp_path, "--trainer.callbacks+=helpers.callbacks.KillAtStep", "--trainer.callbacks.step=5")
    assert proc.returncode == -9, proc.stderr[-3000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    proc = _fit(tmp_path, f"--ckpt_path={last}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(trained / "alpha.safetensors"), load_file(tmp_path / "alpha.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.ddp
def test_fit_ddp_two_processes(tmp_path):
    proc = _fit(tmp_path, devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_file(tmp_path / "alpha.safetensors")["conv1_alpha.weight"].abs().sum() > 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6  # 64 scenes / (8 x 2 ranks) = 4 steps per epoch, 2 epochs, saved every 3


@pytest.mark.wandb
def test_fit_logs_to_wandb_offline(tmp_path):
    proc = _fit(
        tmp_path,
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.logger.init_args.project=regionembed-tests",
        "--trainer.log_every_n_steps=2",
        env_extra={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = next(runs[0].glob("run-*.wandb")).read_bytes()  # offline: the history is in the run's record file
    for key in (b"train/loss", b"val/loss", b"val/region_top1"):
        assert key in records
