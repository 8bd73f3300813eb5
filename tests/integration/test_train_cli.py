"""train.py fit on the tiny CLIP: a killed run resumes as if it had not stopped; DDP with 2 CPU processes."""

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
