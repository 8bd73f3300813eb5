"""MaskInversion through ``infer.py predict|test`` on every region data module (one batch format for all).

In one process, single device, like test_infer_cli; the data are the on-disk format fixtures of
``tests/helpers/formats.py`` and a 32 px synthetic world. The data modules get their preprocessing from the model
through the CLI's argument link: no config below states it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers.formats import write_coco, write_refcoco, write_voc
from regionembed.cli import infer_main

# pycocotools 2.0.x calls np.array(copy=False) internally under numpy 2: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "infer" / "maskinversion.yaml")
TINY = str(ROOT / "configs" / "backbone" / "tiny.yaml")
FAST = [
    "--model.init_args.solver.init_args.iterations=2",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def _data_args(kind: str, tmp_path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """``--data`` arguments of ``kind`` and the region names expected per output folder."""
    if kind == "synthetic":
        args = [
            "--data=regionembed.data.SyntheticDataModule",
            '--data.world={"image_size": 32, "size_range": [0.3, 0.5], "max_objects": 2}',
            "--data.train_size=0",
            "--data.val_size=0",
            "--data.test_size=2",
            "--data.batch_size=2",
        ]
        return args, {}
    coco = write_coco(tmp_path / "coco")
    if kind == "coco":
        args = [
            "--data=regionembed.data.CocoRegionDataModule",
            f"--data.val_images={coco['images']}",
            f"--data.val_ann_file={coco['ann_file']}",
            "--data.batch_size=2",
        ]
        return args, {"1": ["11_dog", "12_person", "13_cat"], "2": ["21_cat"]}
    if kind == "refcoco":
        ref = write_refcoco(coco, tmp_path / "coco")
        args = [
            "--data=regionembed.data.RefCocoDataModule",
            f"--data.images={ref['images']}",
            f"--data.instances_file={ref['ann_file']}",
            f"--data.refs_file={ref['refs_file']}",
            "--data.batch_size=3",
        ]
        # every annotation of the image is a candidate region (crowd ones too)
        return args, {"1": ["11_dog", "12_person", "13_cat", "14_person"]}
    voc = write_voc(tmp_path / "voc")
    args = [
        "--data=regionembed.data.VocBoxDataModule",
        f"--data.val_images={voc['images']}",
        f"--data.val_annotations={voc['anns']}",
        "--data.batch_size=2",
    ]
    return args, {"2007_000001": ["0_person", "1_bird"], "n01440764_18": ["0_tench", "1_bird"]}


@pytest.mark.parametrize("kind", ["synthetic", "coco", "refcoco", "voc"])
def test_predict_on_every_region_data_module(kind, tmp_path):
    data, expected = _data_args(kind, tmp_path)
    out = tmp_path / "out"
    cli = infer_main(
        [
            "predict",
            f"--config={CONFIG}",
            f"--model.init_args.backbone={TINY}",
            *data,
            f"--writer.output_dir={out}",
            *FAST,
        ]
    )
    writer = next(c for c in cli.trainer.callbacks if type(c).__name__ == "InversionWriter")
    # RefCOCO has one item per expression: image 1's three (one batch) are inverted and written once
    assert (writer.written, writer.skipped) == (len(expected) or 2, 0)
    folders = sorted(p.parent.name for p in out.glob("*/manifest.json"))
    if kind == "synthetic":
        assert len(folders) == 2
    else:
        assert folders == sorted(expected)
    for folder in folders:
        manifest = json.loads((out / folder / "manifest.json").read_text())
        names = [r["name"] for r in manifest["regions"]]
        if expected:
            assert names == expected[folder]
        assert len(manifest["loss_history"]) == 3
        with safe_open(str(out / folder / "embeddings.safetensors"), "pt") as f:
            emb, maps = f.get_tensor("embeddings"), f.get_tensor("maps")
        assert emb.shape == (len(names), 32) and torch.isfinite(emb).all()
        assert maps.shape == (len(names), 32, 32)  # fitted to the S x S masks of the batch
        if kind != "synthetic":  # image files on disk: overlays over them
            assert sorted(p.stem for p in (out / folder / "overlays").glob("*.png")) == sorted(names)


@pytest.mark.parametrize("kind", ["synthetic", "coco", "refcoco", "voc"])
def test_test_on_every_region_data_module(kind, tmp_path):
    data, _ = _data_args(kind, tmp_path)
    cli = infer_main(["test", f"--config={CONFIG}", f"--model.init_args.backbone={TINY}", *data, *FAST])
    metrics = cli.trainer.callback_metrics
    assert {"test/mask_dice", "test/map_iou", "test/loss_drop"} <= set(metrics)
    assert 0 <= float(metrics["test/mask_dice"]) <= 1
    # the data module got the model's preprocessing through the CLI link, not from a config; MaskInversion needs no
    # original pixels (keep_original linked off), so it fits the S x S masks of the batch
    assert cli.datamodule.preprocess == cli.model.backbone.preprocess
    assert cli.datamodule.keep_original is False


def test_folder_batches_images_of_different_sizes(region_folder, tmp_path):
    """Two images of different sizes in one batch: S x S in the batch, maps at each image's own resolution."""
    out = tmp_path / "out"
    infer_main(
        [
            "predict",
            f"--config={CONFIG}",
            f"--model.init_args.backbone={TINY}",
            f"--data.root={region_folder}",
            "--data.batch_size=2",
            f"--writer.output_dir={out}",
            *FAST,
        ]
    )
    for name, size in (("a", (40, 56)), ("b", (64, 48))):
        with safe_open(str(out / name / "embeddings.safetensors"), "pt") as f:
            assert f.get_tensor("maps").shape == (3, *size)


def test_an_image_repeated_over_batches_is_inverted_once(tmp_path):
    """RefCOCO, one expression per batch: image 1 is computed for the first and up to date for the two others."""
    data, _ = _data_args("refcoco", tmp_path)
    out = tmp_path / "out"
    args = ["predict", f"--config={CONFIG}", f"--model.init_args.backbone={TINY}", *data, "--data.batch_size=1", *FAST]
    cli = infer_main([*args, f"--writer.output_dir={out}"])
    writer = next(c for c in cli.trainer.callbacks if type(c).__name__ == "InversionWriter")
    assert (writer.written, writer.skipped) == (1, 2)
    assert [p.parent.name for p in out.glob("*/manifest.json")] == ["1"]
