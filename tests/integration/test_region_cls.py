"""Region classification through infer.py: in-process with default Trainer settings, and 2 DDP processes giving
exactly the metrics of 1 process (every test scene counted once)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from regionembed.cli import infer_main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tests" / "tiny_region_cls.yaml"
METHODS = {"global", "crop", "masked_crop_square_grey", "mask_pool", "mask_inversion"}


def test_region_classification_in_process(tmp_path):
    cli = infer_main(
        [
            "test",
            f"--config={CONFIG}",
            f"--model.init_args.results_path={tmp_path / 'r.json'}",
            f"--trainer.default_root_dir={tmp_path}",  # the saved config.yaml goes there, not into the checkout
        ]
    )
    results = cli.model.results
    assert set(results) == METHODS
    for row in results.values():
        assert set(row) == {"top1", "top5", "mean_class_top1", "mean_class_top5"}
        assert 0 <= row["top1"] <= row["top5"] <= 1
    assert json.loads((tmp_path / "r.json").read_text())["results"] == results
    assert "test/mask_inversion/top1" in cli.trainer.callback_metrics
    # the square crop asked for the original pixels: the evaluation samples carry them
    assert cli.model.needs_original_image and "original" in cli.datamodule.datasets["test"][0]


def _run(tmp_path: Path, devices: int) -> dict:
    out = tmp_path / f"results_{devices}.json"
    cmd = [
        sys.executable,
        str(ROOT / "infer.py"),
        "test",
        f"--config={CONFIG}",
        f"--model.init_args.results_path={out}",
    ]
    if devices > 1:
        cmd += ["--trainer.devices=2", "--trainer.strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["results"]


@pytest.mark.ddp
def test_two_processes_give_the_metrics_of_one(tmp_path):
    one, two = _run(tmp_path, 1), _run(tmp_path, 2)  # 9 scenes: ranks get 5 and 4, no padded duplicate
    assert one == two


def test_per_iteration_curves(tmp_path):
    """`curves: true` records MaskInversion's top-1 and Dice at every iteration; the last point is the final result."""
    out = tmp_path / "r.json"
    cli = infer_main(
        [
            "test",
            f"--config={CONFIG}",
            f"--model.init_args.results_path={out}",
            "--model.init_args.curves=true",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    payload = json.loads(out.read_text())
    curve = payload["curves"]["mask_inversion"]
    assert set(payload["curves"]) == {"mask_inversion"}
    assert len(curve["top1"]) == len(curve["dice"]) == 3  # before each of the 2 steps, and the returned tokens
    assert abs(curve["top1"][-1] - payload["results"]["mask_inversion"]["top1"]) < 1e-6
    assert all(0 <= d <= 1 for d in curve["dice"])
    assert cli.model.curves == payload["curves"]
