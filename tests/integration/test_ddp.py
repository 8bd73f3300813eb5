"""infer.py predict with DDP over 2 CPU processes (gloo), launched as a subprocess (never in-process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.ddp
def test_predict_ddp_two_processes(region_folder, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "infer.py"),
        "predict",
        f"--config={ROOT / 'configs' / 'infer' / 'maskinversion.yaml'}",
        f"--model.init_args.backbone={ROOT / 'configs' / 'backbone' / 'tiny.yaml'}",
        f"--data.root={region_folder}",
        f"--writer.output_dir={out}",
        "--model.init_args.solver.init_args.iterations=2",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.enable_progress_bar=false",
        "--return_predictions=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = set()
    for image in ("a", "b"):
        manifest = json.loads((out / image / "manifest.json").read_text())
        assert [r["name"] for r in manifest["regions"]] == ["grey", "rgba", "zero_one"]
        ranks.add(manifest["rank"])
    assert ranks == {0, 1}  # each rank wrote its own share
    assert not list(out.rglob("*.tmp"))
