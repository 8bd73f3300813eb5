"""Both forms of infer.py, in one process, single device, default Trainer settings otherwise."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from regionembed.cli import infer_main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "infer" / "maskinversion.yaml")
TINY = str(ROOT / "configs" / "backbone" / "tiny.yaml")
FAST = ["--model.init_args.solver.init_args.iterations=3", "--trainer.enable_progress_bar=false"]


def _check_image_output(folder: Path, regions: list[str], prompts: list[str] | None = None):
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [r["name"] for r in manifest["regions"]] == regions
    assert len(manifest["loss_history"]) == 4
    with safe_open(str(folder / "embeddings.safetensors"), "pt") as f:
        emb, maps = f.get_tensor("embeddings"), f.get_tensor("maps")
        assert json.loads(f.metadata()["mask_names"]) == regions
    assert emb.shape == (len(regions), 32) and torch.isfinite(emb).all()
    assert maps.shape[0] == len(regions) and maps.min() >= 0 and maps.max() <= 1
    for r in regions:
        assert (folder / "overlays" / f"{r}.png").is_file()
    if prompts:
        for r in manifest["regions"]:
            assert r["best_prompt"] in prompts
            assert sum(r["prompt_probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert not list(folder.rglob("*.tmp"))
    return manifest


def test_predict_over_a_folder(region_folder, tmp_path):
    out = tmp_path / "out"
    infer_main(
        [
            "predict",
            f"--config={CONFIG}",
            f"--model.init_args.backbone={TINY}",
            f"--data.root={region_folder}",
            f"--writer.output_dir={out}",
            *FAST,
        ]
    )
    for image in ("a", "b"):
        _check_image_output(out / image, ["grey", "rgba", "zero_one"])


def test_single_image_form_with_prompts(region_folder, tmp_path):
    out = tmp_path / "single"
    masks = region_folder / "masks" / "a"
    infer_main(
        [
            "single",
            str(region_folder / "images" / "a.png"),
            str(masks / "grey.png"),
            str(masks / "rgba.png"),
            "--prompts",
            "a red square",
            "a blue circle",
            "--output",
            str(out),
            "--config",
            CONFIG,
            f"--model.init_args.backbone={TINY}",
            *FAST,
        ]
    )
    manifest = _check_image_output(out / "a", ["grey", "rgba"], prompts=["a red square", "a blue circle"])
    assert manifest["prompts"] == ["a red square", "a blue circle"]


def test_test_subcommand_logs_metrics(region_folder, tmp_path):
    cli = infer_main(
        [
            "test",
            f"--config={CONFIG}",
            f"--model.init_args.backbone={TINY}",
            f"--data.root={region_folder}",
            f"--writer.output_dir={tmp_path}",
            *FAST,
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert {"test/mask_dice", "test/map_iou", "test/loss_drop"} <= set(metrics)
    assert 0 <= float(metrics["test/mask_dice"]) <= 1


def test_inference_mode_true_is_refused_clearly(region_folder, tmp_path):
    with pytest.raises(RuntimeError, match=r"trainer\.inference_mode: false"):
        infer_main(
            [
                "predict",
                f"--config={CONFIG}",
                f"--model.init_args.backbone={TINY}",
                f"--data.root={region_folder}",
                f"--writer.output_dir={tmp_path}",
                "--trainer.inference_mode=true",
                *FAST,
            ]
        )


def test_mask_of_wrong_size_names_the_file(region_folder, tmp_path):
    from PIL import Image

    Image.new("L", (5, 5), 255).save(region_folder / "masks" / "a" / "small.png")
    with pytest.raises(ValueError, match=r"small\.png is 5x5 but its image is 56x40"):
        infer_main(
            [
                "predict",
                f"--config={CONFIG}",
                f"--model.init_args.backbone={TINY}",
                f"--data.root={region_folder}",
                f"--writer.output_dir={tmp_path}",
                *FAST,
            ]
        )
