"""Composed retrieval with the gradient-attention loss through train.py / infer.py: in-process, DDP, W&B offline."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from regionembed.cli import infer_main, train_main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tests" / "tiny_gradattn.yaml")
KEYS = ("R@1", "R@5", "R@10", "R@50", "map_miou", "map_dice", "pointing_game", "energy_pointing_game")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **extra}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few steps of fit in-process (second-order backward), default Trainer settings otherwise."""
    root = tmp_path_factory.mktemp("gradattn")
    cli = train_main(["fit", f"--config={TINY}", f"--trainer.default_root_dir={root}"])
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    return root / "checkpoints" / "last.ckpt", logged, cli.model


def _test_metrics(ckpt: Path, *extra: str) -> dict[str, float]:
    root = f"--trainer.default_root_dir={ckpt.parent.parent}"
    cli = infer_main(["test", f"--config={TINY}", f"--ckpt_path={ckpt}", root, *extra])
    return {k.removeprefix("test/"): float(v) for k, v in cli.trainer.callback_metrics.items()}


def test_fit_then_infer_test(trained):
    ckpt, logged, model = trained
    assert ckpt.is_file() and torch.load(ckpt, weights_only=True)["global_step"] == 4  # 16 triplets / 4
    for key in ("train/loss", "train/retrieval_loss", "train/attention_loss", "val/R@1", "val/pointing_game"):
        assert key in logged and logged[key] == logged[key], key  # present and not NaN
    metrics = _test_metrics(ckpt)
    assert metrics["queries"] == 12 and metrics["gallery_size"] == 24  # targets and references of 12 triplets
    for key in KEYS:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["R@50"] == 1.0  # the gallery has 23 candidates per query
    # the optimiser stepped: the learned combiner's zero-initialised output layer has moved
    assert model.combiner.output.weight.abs().sum() > 0


def test_inference_mode_is_refused(trained):
    ckpt, _, _ = trained
    with pytest.raises(RuntimeError, match="inference_mode: false"):
        train_main(
            [
                "test",
                f"--config={TINY}",
                f"--ckpt_path={ckpt}",
                f"--trainer.default_root_dir={ckpt.parent.parent}",
                "--trainer.inference_mode=true",
            ]
        )


def test_attention_loss_needs_masks(trained):
    from regionembed.data.composed import collate_composed

    _, _, model = trained
    s = {"reference": torch.zeros(3, 32, 32), "target": torch.zeros(3, 32, 32), "modifier": "m", "mask": None}
    s.update(reference_key=0, target_key=1, index=0, image_id="a")
    with pytest.raises(ValueError, match="needs changed-region masks"):
        model.training_step(collate_composed([s, s]), 0)


def _csv_metrics(folder: Path) -> dict[str, float]:
    (path,) = folder.rglob("metrics.csv")
    out: dict[str, float] = {}
    with path.open() as fh:
        for row in csv.DictReader(fh):
            out.update({k.removeprefix("test/"): float(v) for k, v in row.items() if v and k.startswith("test/")})
    return out


@pytest.mark.ddp
def test_fit_and_test_ddp_two_processes(tmp_path, trained):
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    fit = [sys.executable, str(ROOT / "train.py"), "fit", f"--config={TINY}", f"--trainer.default_root_dir={tmp_path}"]
    proc = subprocess.run(fit + ddp, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2  # 16 triplets / (4 per batch x 2 ranks)
    logs = tmp_path / "test_logs"
    test = [
        sys.executable,
        str(ROOT / "infer.py"),
        "test",
        f"--config={TINY}",
        f"--ckpt_path={ckpt}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={logs}",
    ]
    proc = subprocess.run(
        test + ddp, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = _csv_metrics(logs)
    one = _test_metrics(ckpt)  # the same checkpoint in one process: the gathered gallery gives the same numbers
    assert two["queries"] == one["queries"] == 12 and two["gallery_size"] == 24
    for key in KEYS:
        assert two[key] == pytest.approx(one[key], abs=1e-5), key


@pytest.mark.wandb
@pytest.mark.slow  # a subprocess with W&B offline: ~20-50 s on 2 shared cores
def test_wandb_offline_media(tmp_path, trained):
    ckpt, _, _ = trained
    cmd = [
        sys.executable,
        str(ROOT / "infer.py"),
        "test",
        f"--config={TINY}",
        f"--config={ROOT / 'configs' / 'logger' / 'wandb.yaml'}",
        f"--ckpt_path={ckpt}",
        "--trainer.callbacks+=regionembed.callbacks.ComposedRetrievalMedia",
        "--trainer.callbacks.max_images=3",
    ]
    env = _env(WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "wandb").glob("offline-run-*")
    media = run / "files" / "media"
    (table,) = (media / "table").rglob("*.table.json")
    data = json.loads(table.read_text())
    assert data["columns"] == ["image_id", "modifier", "strip"]
    assert len(data["data"]) == 3
    strips = list((media / "images").rglob("composed_overlays*.png"))
    assert len(strips) == 3
    assert Image.open(strips[0]).size == (3 * 32, 32)  # reference | target | overlay
