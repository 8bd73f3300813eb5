"""Region classification through infer.py: in-process with default Trainer settings, and 2 DDP processes giving
exactly the metrics of 1 process (every test scene counted once)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from regionembed.cli import infer_main
from regionembed.data import SyntheticDataModule

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
    # the square crop asked for the original pixels: the CLI linked keep_original (no config states it), the
    # evaluation samples carry them
    assert cli.model.needs_original_image and cli.datamodule.keep_original
    assert "original" in cli.datamodule.datasets["test"][0]

    # the same model and data built by hand in Python: the CLI's numbers with keep_original=True; without it the
    # module refuses the batches (naming the argument) instead of letting the square crop fall back to the input
    world = cli.datamodule.world

    def by_hand(**kwargs) -> SyntheticDataModule:
        sizes = {"train_size": 0, "val_size": 0, "test_size": 9, "batch_size": 2}
        spec = cli.model.backbone.preprocess
        return SyntheticDataModule(world.config, world.seed, **sizes, preprocess=spec, **kwargs)

    trainer = L.Trainer(
        accelerator="cpu", inference_mode=False, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    L.seed_everything(0)
    trainer.test(cli.model, datamodule=by_hand(keep_original=True), verbose=False)
    assert cli.model.results == results
    with pytest.raises(ValueError, match=r"\['masked_crop_square_grey'\].*keep_original=True"):
        trainer.test(cli.model, datamodule=by_hand(), verbose=False)


def test_shortest_crop_cannot_keep_the_original(tmp_path, capsys):
    """The square crop keeps the original pixels; with the centre crop they would not match the model input."""
    args = ["test", f"--config={CONFIG}", "--data.init_args.mode=shortest_crop"]
    with pytest.raises(SystemExit) as exc:
        infer_main([*args, f"--trainer.default_root_dir={tmp_path}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "SyntheticDataModule: keep_original=True needs mode='squash', got mode='shortest_crop'" in err


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
