"""Composed-retrieval data: synthetic triplets, the transform and collate, CIRR and FashionIQ readers on fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from regionembed.backbones.base import PreprocessSpec
from regionembed.data import (
    CirrDataModule,
    ComposedDataset,
    FashionIqDataModule,
    SyntheticComposed,
    SyntheticComposedDataModule,
    SyntheticWorld,
    WorldConfig,
    build_transform,
    collate_composed,
)
from regionembed.data.cirr import CirrTriplets, read_cirr_captions, read_cirr_split
from regionembed.data.fashioniq import FashionIqTriplets, join_captions, read_fashioniq_captions

SPEC = PreprocessSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
WORLD = WorldConfig(image_size=32, size_range=(0.3, 0.5), max_objects=2)


def _transform(size: int = 32):
    return build_transform(PreprocessSpec(size=size, mean=SPEC.mean, std=SPEC.std), train=False)


# ------------------------------------------------------------------------------------------------------ synthetic
def test_synthetic_triplets_and_transform():
    world = SyntheticWorld(WORLD, seed=0)
    raw = SyntheticComposed(world, start=7, length=3)
    item = raw[1]
    t = world.triplet(8)
    assert item["modifier"] == t.modifier
    assert (item["reference_key"], item["target_key"]) == (16, 17)
    np.testing.assert_array_equal(item["changed_mask"], t.changed_mask)
    # outside the changed region the two images are identical, inside they differ
    outside = item["changed_mask"] == 0
    np.testing.assert_array_equal(item["reference"][outside], item["target"][outside])
    assert (item["reference"] != item["target"]).any()

    ds = ComposedDataset(raw, _transform(32))
    out = ds[1]
    assert out["reference"].shape == out["target"].shape == (3, 32, 32)
    assert out["mask"].shape == (32, 32) and set(out["mask"].unique().tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(out["mask"].numpy(), t.changed_mask)  # same size: the identity resize
    expected = (torch.from_numpy(t.reference.image).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(out["reference"], expected, atol=1e-5, rtol=0)
    big = ComposedDataset(raw, _transform(64))[1]  # masks follow the image to another size
    assert big["mask"].shape == (64, 64) and big["mask"].sum() > 3 * out["mask"].sum()
    with pytest.raises(IndexError):
        raw[3]


def test_collate_and_datamodule_loader():
    dm = SyntheticComposedDataModule(world=WORLD, start=0, train_size=6, val_size=4, test_size=5, batch_size=4)
    dm.preprocess = SPEC
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert [len(b["modifier"]) for b in batches] == [4, 1]
    b = batches[0]
    assert b["reference"].shape == (4, 3, 32, 32) and b["mask"].shape == (4, 32, 32)
    assert b["index"].tolist() == [0, 1, 2, 3]
    assert b["reference_key"].tolist() == [2 * (10 + i) for i in range(4)]  # test follows train (6) and val (4)
    assert b["target_key"].tolist() == [2 * (10 + i) + 1 for i in range(4)]
    with pytest.raises(ValueError, match="start must be"):
        SyntheticComposedDataModule(world=WORLD, start=-1)


def test_collate_rejects_mixed_masks():
    s = {"reference": torch.zeros(3, 4, 4), "target": torch.zeros(3, 4, 4), "modifier": "m", "reference_key": 0}
    s.update(target_key=1, index=0, image_id="a", mask=None)
    assert collate_composed([s, dict(s)])["mask"] is None
    with pytest.raises(ValueError, match="others do not"):
        collate_composed([s, {**s, "mask": torch.ones(4, 4)}])
    with pytest.raises(ValueError, match="empty batch"):
        collate_composed([])


def _raw(mask):
    img = np.zeros((16, 16, 3), np.uint8)
    return [
        {
            "reference": img,
            "target": img,
            "modifier": "m",
            "changed_mask": mask,
            "reference_key": 0,
            "target_key": 1,
            "image_id": "x",
        }
    ]


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (np.ones((8, 16), np.uint8), "does not match"),
        (np.full((16, 16), 7, np.uint8), "binary"),
        (np.zeros((16, 16), np.uint8), "empty"),
    ],
)
def test_mask_validation(mask, match):
    with pytest.raises(ValueError, match=match):
        ComposedDataset(_raw(mask), _transform(16))[0]


def test_image_validation():
    raw = _raw(None)
    raw[0]["target"] = np.zeros((16, 16), np.uint8)
    with pytest.raises(ValueError, match="target must be a uint8"):
        ComposedDataset(raw, _transform(16))[0]


# ----------------------------------------------------------------------------------------------------------- CIRR
def _png(path, colour, size=(20, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def cirr_root(tmp_path):
    root = tmp_path / "cirr"
    names = {"dev-0-0-img0": (255, 0, 0), "dev-0-1-img0": (0, 255, 0), "dev-1-0-img1": (0, 0, 255)}
    split = {}
    for i, (name, colour) in enumerate(names.items()):
        rel = f"./dev/{i}/{name}.png"
        _png(root / "img_raw" / rel, colour)
        split[name] = rel
    (root / "image_splits").mkdir(parents=True)
    (root / "image_splits" / "split.rc2.val.json").write_text(json.dumps(split))
    caps = [
        {
            "pairid": 10,
            "reference": "dev-0-0-img0",
            "target_hard": "dev-0-1-img0",
            "target_soft": {"dev-0-1-img0": 1.0},
            "caption": "make it green",
            "img_set": {"id": 0, "members": ["dev-0-0-img0", "dev-0-1-img0"], "reference_rank": 0, "target_rank": 1},
        },
        {
            "pairid": 11,
            "reference": "dev-0-1-img0",
            "target_hard": "dev-1-0-img1",
            "target_soft": {},
            "caption": "blue instead",
            "img_set": {"id": 1, "members": ["dev-0-1-img0", "dev-1-0-img1"]},
        },
    ]
    (root / "captions").mkdir(parents=True)
    (root / "captions" / "cap.rc2.val.json").write_text(json.dumps(caps))
    return root


def test_cirr_reader(cirr_root):
    pairs = read_cirr_captions(cirr_root / "captions" / "cap.rc2.val.json")
    assert [(p.pairid, p.reference, p.target, p.caption) for p in pairs] == [
        (10, "dev-0-0-img0", "dev-0-1-img0", "make it green"),
        (11, "dev-0-1-img0", "dev-1-0-img1", "blue instead"),
    ]
    assert pairs[0].members == ("dev-0-0-img0", "dev-0-1-img0")
    assert len(read_cirr_split(cirr_root / "image_splits" / "split.rc2.val.json")) == 3
    ds = CirrTriplets(cirr_root, "val", image_root=cirr_root / "img_raw")
    a, b = ds[0], ds[1]
    assert a["modifier"] == "make it green" and a["changed_mask"] is None and a["image_id"] == "cirr-10"
    assert a["reference"].shape == (12, 20, 3) and tuple(a["reference"][0, 0]) == (255, 0, 0)
    assert tuple(a["target"][0, 0]) == (0, 255, 0)
    assert a["target_key"] == b["reference_key"]  # the same image, the same gallery key
    assert len({a["reference_key"], a["target_key"], b["target_key"]}) == 3


def test_cirr_datamodule_batches_without_masks(cirr_root):
    dm = CirrDataModule(str(cirr_root), image_root=str(cirr_root / "img_raw"), train_split=None, batch_size=2)
    dm.preprocess = SPEC
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["reference"].shape == (2, 3, 32, 32) and batch["mask"] is None
    assert batch["modifier"] == ["make it green", "blue instead"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"pairid": 1}', "expected a JSON list"),
        ('[{"pairid": 1, "reference": "a"}]', r"entry 0 misses \['caption'\]"),
        ('[{"pairid": 1, "reference": 3, "caption": "c"}]', "must be strings"),
        ('[{"pairid": 1, "reference": "a", "caption": "c", "target_hard": 5}]', "target_hard"),
    ],
)
def test_cirr_malformed_captions(tmp_path, content, match):
    path = tmp_path / "cap.rc2.val.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_cirr_captions(path)


def test_cirr_errors(cirr_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        CirrTriplets(cirr_root, "train")
    (tmp_path / "split.json").write_text('{"a": 3}')
    with pytest.raises(ValueError, match="mapping image names"):
        read_cirr_split(tmp_path / "split.json")
    caps = json.loads((cirr_root / "captions" / "cap.rc2.val.json").read_text())
    caps[1]["target_hard"] = "missing-img"
    (cirr_root / "captions" / "cap.rc2.val.json").write_text(json.dumps(caps))
    with pytest.raises(ValueError, match="'missing-img', not in the split file"):
        CirrTriplets(cirr_root, "val")
    del caps[1]["target_hard"]  # as in the hidden test1 split
    (cirr_root / "captions" / "cap.rc2.val.json").write_text(json.dumps(caps))
    with pytest.raises(ValueError, match="no target_hard"):
        CirrTriplets(cirr_root, "val")
    assert len(CirrTriplets(cirr_root, "val", require_targets=False)) == 2


# ------------------------------------------------------------------------------------------------------ FashionIQ
@pytest.fixture
def fiq_root(tmp_path):
    root = tmp_path / "fashioniq"
    for name, colour in {"B001": (255, 0, 0), "B002": (0, 255, 0), "B003": (0, 0, 255)}.items():
        _png(root / "images" / f"{name}.png", colour)
    (root / "image_splits").mkdir(parents=True)
    (root / "image_splits" / "split.dress.val.json").write_text(json.dumps(["B001", "B002", "B003"]))
    caps = [
        {"target": "B002", "candidate": "B001", "captions": ["is green.", "is shorter "]},
        {"target": "B003", "candidate": "B002", "captions": ["is blue", "has no sleeves?"]},
    ]
    (root / "captions").mkdir(parents=True)
    (root / "captions" / "cap.dress.val.json").write_text(json.dumps(caps))
    return root


def test_fashioniq_reader(fiq_root):
    ds = FashionIqTriplets(fiq_root, "dress", "val")
    a = ds[0]
    assert a["modifier"] == "is green and is shorter"
    assert ds[1]["modifier"] == "is blue and has no sleeves"
    assert tuple(a["reference"][0, 0]) == (255, 0, 0) and tuple(a["target"][0, 0]) == (0, 255, 0)
    assert a["target_key"] == ds[1]["reference_key"] and a["changed_mask"] is None
    assert join_captions(["a.", "b"], sep=", ") == "a, b"
    dm = FashionIqDataModule(str(fiq_root), category="dress", train_split=None, batch_size=2)
    dm.preprocess = SPEC
    dm.setup("test")
    assert next(iter(dm.test_dataloader()))["mask"] is None


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[1, 2", "not valid JSON"),
        ('{"candidate": "a"}', "expected a JSON list"),
        ('[{"candidate": "a", "target": "b"}]', r"misses \['captions'\]"),
        ('[{"candidate": "a", "target": "b", "captions": []}]', "non-empty list"),
        ('[{"candidate": 1, "target": "b", "captions": ["x"]}]', "must be strings"),
    ],
)
def test_fashioniq_malformed_captions(tmp_path, content, match):
    path = tmp_path / "cap.dress.val.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_fashioniq_captions(path)


def test_fashioniq_missing_files(fiq_root):
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        FashionIqTriplets(fiq_root, "shirt", "val")
    (fiq_root / "images" / "B003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"B003\.png"):
        FashionIqTriplets(fiq_root, "dress", "val")[1]
