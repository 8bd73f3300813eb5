"""Referring expression comprehension through ``infer.py test``: synthetic world (checked against an independent
re-computation), RefCOCO files in their exact format, and 2 DDP processes giving the results of 1."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import box_iou

from regionembed.cli import infer_main
from regionembed.regions import CropEmbedding, MaskPoolEmbedding
from regionembed.text import encode_prompts

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tests" / "tiny_rec.yaml"
METHODS = ("global", "crop", "mask_pool", "mask_inversion")

# pycocotools 2.0.x calls np.array(copy=False) internally under numpy 2: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    out = root / "results.json"
    cli = infer_main(
        ["test", f"--config={TINY}", f"--model.init_args.results_path={out}", f"--trainer.default_root_dir={root}"]
    )
    return cli, json.loads(out.read_text()), {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def test_names_table_and_counts(synthetic):
    cli, payload, logged = synthetic
    names = {f"test/{m}/{k}" for m in METHODS for k in ("ref_acc", "ref_miou")}
    kinds = {k for rows in payload["by_kind"].values() for k, v in rows.items() if v["ref_acc"] == v["ref_acc"]}
    assert len(kinds) >= 2  # expressions of several kinds in these scenes
    names |= {f"test/{m}/{k}/{key}" for m in METHODS for k in kinds for key in ("ref_acc", "ref_miou")}
    assert set(logged) == names | {"test/expressions", "test/skipped_expressions"}
    assert payload["match"] == "box" and payload["skipped_expressions"] == 0
    assert payload["expressions"] == len(cli.datamodule.datasets["test"]) > 10
    for method in METHODS:
        row = payload["results"][method]
        assert 0 <= row["ref_acc"] <= row["ref_miou"] + 1e-6 <= 1 + 1e-6, method
        assert logged[f"test/{method}/ref_acc"] == pytest.approx(row["ref_acc"])
    # the kinds partition the expressions: their accuracies, weighted by their counts, give the overall one
    dataset = cli.datamodule.datasets["test"]
    counts = Counter(dataset[i]["kind"] for i in range(len(dataset)))
    for method in METHODS:
        by_kind = payload["by_kind"][method]
        total = sum(by_kind[k]["ref_acc"] * n for k, n in counts.items())
        assert total / sum(counts.values()) == pytest.approx(payload["results"][method]["ref_acc"]), method
    assert payload["results"]["global"]["ref_acc"] == 0  # every candidate scores the same: no answer
    dataset = cli.datamodule.datasets["test"]
    chance = []
    for i in range(len(dataset)):
        s = dataset[i]
        chance.append(float((box_iou(s["boxes"], s["boxes"][s["target_index"]][None])[:, 0] > 0.5).double().mean()))
    assert payload["chance_ref_acc"] == pytest.approx(np.mean(chance))


def _reference_accuracy(backbone, dataset, method) -> float:
    """The protocol written out independently: one item at a time, every candidate embedded, argmax, box IoU."""
    hits = []
    for i in range(len(dataset)):
        s = dataset[i]
        regions = F.normalize(method(backbone, s["image"], s["masks"]), dim=-1)
        text = encode_prompts(backbone, [s["text"]], ["{}"])[0]
        scores = regions @ text
        best = torch.nonzero(scores >= scores.max() - 1e-5)[:, 0]
        if len(best) != 1:  # a tie (within rounding): no answer
            hits.append(False)
            continue
        iou = box_iou(s["boxes"][best], s["boxes"][s["target_index"]][None])[0, 0]
        hits.append(bool(iou > 0.5))
    return float(np.mean(hits))


@pytest.mark.parametrize(("method", "name"), [(CropEmbedding(), "crop"), (MaskPoolEmbedding(), "mask_pool")])
def test_accuracy_equals_an_independent_computation(synthetic, method, name):
    cli, payload, _ = synthetic
    with torch.no_grad():
        want = _reference_accuracy(cli.model.backbone, cli.datamodule.datasets["test"], method)
    assert payload["results"][name]["ref_acc"] == pytest.approx(want, abs=1e-6)


def _polygon(x0, y0, x1, y1) -> list[list[float]]:
    return [[float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]]


@pytest.fixture
def refcoco(tmp_path):
    """Two images with three and two instances; refs(unc).p as the refer toolkit writes it (a Python 2 pickle)."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    boxes = {1: [(2, 2, 20, 18), (24, 4, 46, 20), (8, 22, 30, 38)], 2: [(4, 4, 24, 30), (26, 10, 46, 36)]}
    anns, ann_id = [], 100
    for image_id, rects in boxes.items():
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(images / f"{image_id:012d}.jpg")
        for k, (x0, y0, x1, y1) in enumerate(rects):
            ann_id += 1
            anns.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": 1 + k % 2,
                    "segmentation": _polygon(x0, y0, x1, y1),
                    "area": float((x1 - x0) * (y1 - y0)),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )
    instances = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": 40, "width": 50} for i in boxes],
        "annotations": anns,
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    refs = [
        {"ref_id": 0, "ann_id": 101, "image_id": 1, "split": "testA", "category_id": 1, "sentences": [
            {"sent": "man on the left", "sent_id": 1}, {"sent": "left person", "sent_id": 2}]},
        {"ref_id": 1, "ann_id": 103, "image_id": 1, "split": "testA", "category_id": 1, "sentences": [
            {"sent": "bottom person", "sent_id": 3}]},
        {"ref_id": 2, "ann_id": 105, "image_id": 2, "split": "testA", "category_id": 2, "sentences": [
            {"sent": "dog on the right", "sent_id": 4}]},
        {"ref_id": 3, "ann_id": 104, "image_id": 2, "split": "val", "category_id": 1, "sentences": [
            {"sent": "person", "sent_id": 5}]},
    ]  # fmt: skip
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return tmp_path


def test_refcoco_config_on_refer_files(refcoco):
    out = refcoco / "results.json"
    infer_main(
        [
            "test",
            f"--config={ROOT / 'configs' / 'infer' / 'rec_refcoco.yaml'}",
            f"--model.init_args.backbone={ROOT / 'configs' / 'backbone' / 'tiny.yaml'}",
            '--model.init_args.methods=[{"class_path": "regionembed.regions.CropEmbedding"}, '
            '{"class_path": "regionembed.regions.MaskInversionEmbedding", '
            '"init_args": {"solver": {"init_args": {"iterations": 2}}}}]',
            f"--model.init_args.results_path={out}",
            f"--data.init_args.images={refcoco / 'images'}",
            f"--data.init_args.instances_file={refcoco / 'instances.json'}",
            f"--data.init_args.refs_file={refcoco / 'refs(unc).p'}",
            "--data.init_args.test_split=testA",
            "--data.init_args.num_workers=0",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={refcoco}",
        ]
    )
    payload = json.loads(out.read_text())
    assert payload["expressions"] == 4 and payload["skipped_expressions"] == 0  # the testA sentences
    assert set(payload["results"]) == {"crop", "mask_inversion"}
    for row in payload["results"].values():
        assert set(row) == {"ref_acc", "ref_miou"}
        assert row["ref_acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.mark.ddp
@pytest.mark.slow  # a 2-process subprocess: ~30-60 s on 2 shared cores
def test_two_processes_give_the_results_of_one(synthetic, tmp_path):
    out = tmp_path / "results_2.json"
    cmd = [
        sys.executable,
        str(ROOT / "infer.py"),
        "test",
        f"--config={TINY}",
        f"--model.init_args.results_path={out}",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = json.loads(out.read_text()), synthetic[1]
    assert two["expressions"] == one["expressions"]
    for method in METHODS:
        assert two["results"][method] == pytest.approx(one["results"][method], abs=1e-6), method
