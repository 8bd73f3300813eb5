"""The joint image/mask/box/alpha transform and the region collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regionembed.backbones.base import PreprocessSpec
from regionembed.data.collate import collate_regions_batch
from regionembed.data.transforms import ALPHA_MEAN, ALPHA_STD, build_transform

SPEC = PreprocessSpec(size=64, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bicubic")
H, W = 60, 100


def make_sample(boxes: list[tuple[int, int, int, int]], seed: int = 0, alpha: bool = False) -> dict:
    """A raw sample whose masks are the filled boxes ``(x0, y0, x1, y1)`` (exclusive ends)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((len(boxes), H, W), np.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes, strict=True):
        mask[y0:y1, x0:x1] = 1
    sample = {
        "image": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
        "masks": masks,
        "boxes": np.array(boxes, np.float32).reshape(-1, 4),
        "labels": np.arange(len(boxes), dtype=np.int64) + 10,
        "texts": [f"region {i}" for i in range(len(boxes))],
        "image_id": "img",
        "ann_ids": np.arange(len(boxes), dtype=np.int64) + 100,
    }
    if alpha:
        sample["alpha"] = masks[0] * 255
    return sample


def mask_box(mask: torch.Tensor) -> np.ndarray:
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


BOXES = [(5, 4, 40, 30), (50, 10, 95, 55), (20, 35, 70, 58), (0, 0, 100, 60)]


@pytest.mark.parametrize(
    ("train", "mode"), [(False, "squash"), (False, "shortest_crop"), (True, "squash"), (True, "shortest_crop")]
)
def test_boxes_stay_aligned_with_masks(train, mode):
    transform = build_transform(SPEC, train=train, mode=mode, seed=3, hflip=train)
    for i in range(6 if train else 1):
        out = transform(make_sample(BOXES, seed=i))
        assert out["image"].shape == (3, 64, 64) and out["image"].dtype == torch.float32
        assert out["masks"].shape == (len(out["boxes"]), 64, 64)
        assert set(out["masks"].unique().tolist()) <= {0.0, 1.0}
        for mask, box in zip(out["masks"], out["boxes"], strict=True):
            np.testing.assert_allclose(mask_box(mask), box.numpy(), atol=1.5)


def test_squash_and_shortest_crop_geometry():
    sample = make_sample([(0, 0, 10, 60), (40, 10, 60, 50)])
    squash = build_transform(SPEC, mode="squash")(sample)
    crop = build_transform(SPEC, mode="shortest_crop")(sample)
    assert squash["image"].shape == crop["image"].shape == (3, 64, 64)
    sx, sy = 64 / W, 64 / H
    np.testing.assert_allclose(squash["boxes"][1].numpy(), [40 * sx, 10 * sy, 60 * sx, 50 * sy], atol=1e-4)
    # shortest side 60 -> 64 (x16/15), width 100 -> ~107, centre crop 64 removes ~21 px per side: the left strip
    # (region 0) is cut away, region 1 is shifted by the crop offset.
    assert crop["labels"].tolist() == [11]
    s = 64 / H
    offset = (round(W * s) - 64) // 2
    np.testing.assert_allclose(crop["boxes"][0].numpy(), [40 * s - offset, 10 * s, 60 * s - offset, 50 * s], atol=1)


def test_image_normalisation_and_orig_size():
    sample = make_sample([(5, 5, 20, 20)])
    sample["image"][:] = 200
    out = build_transform(SPEC)(sample)
    expected = (200 / 255 - torch.tensor(SPEC.mean)) / torch.tensor(SPEC.std)
    torch.testing.assert_close(out["image"].mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)
    assert out["orig_size"] == (H, W)
    assert out["image_id"] == "img"


def test_alpha_moves_with_image_and_masks():
    sample = make_sample([(30, 15, 80, 50)], alpha=True)
    sample["image"][:] = 0
    sample["image"][15:50, 30:80] = 255  # bright exactly where alpha is 1
    transform = build_transform(SPEC, train=True, seed=0, scale=(0.3, 0.6))
    for _ in range(5):
        out = transform(sample)
        alpha = out["alpha"]
        assert alpha.shape == (1, 64, 64)
        unit = alpha[0] * ALPHA_STD + ALPHA_MEAN
        assert set(unit.round(decimals=4).unique().tolist()) <= {0.0, 1.0}
        if len(out["masks"]):  # same nearest geometry as the region mask
            torch.testing.assert_close(unit, out["masks"][0])
        bright = out["image"][0] > (0.5 - SPEC.mean[0]) / SPEC.std[0]
        assert (bright == (unit > 0.5)).float().mean() > 0.9


def test_alpha_rejects_wrong_shape():
    sample = make_sample([(5, 5, 20, 20)])
    sample["alpha"] = np.zeros((H + 1, W), np.float32)
    with pytest.raises(ValueError, match="alpha"):
        build_transform(SPEC)(sample)


def test_seeded_transforms_are_reproducible():
    sample = make_sample(BOXES)
    a = build_transform(SPEC, train=True, seed=7, hflip=True)
    b = build_transform(SPEC, train=True, seed=7, hflip=True)
    c = build_transform(SPEC, train=True, seed=8, hflip=True)
    np.random.seed(0)  # global seeds must not matter
    outs_a = [a(sample) for _ in range(3)]
    np.random.seed(123)
    outs_b = [b(sample) for _ in range(3)]
    outs_c = [c(sample) for _ in range(3)]
    for x, y in zip(outs_a, outs_b, strict=True):
        torch.testing.assert_close(x["image"], y["image"])
        torch.testing.assert_close(x["masks"], y["masks"])
        torch.testing.assert_close(x["boxes"], y["boxes"])
    assert any(not torch.equal(x["image"], z["image"]) for x, z in zip(outs_a, outs_c, strict=True))
    a.set_seed(7)
    torch.testing.assert_close(a(sample)["image"], outs_a[0]["image"])


def test_empty_regions_are_dropped_consistently():
    # shortest_crop removes ~20 px each side (original frame): regions 0 and 3 lie there.
    boxes = [(0, 5, 12, 50), (40, 10, 60, 50), (45, 20, 55, 30), (90, 0, 100, 60)]
    sample = make_sample(boxes)
    sample["target_index"] = 2
    out = build_transform(SPEC, mode="shortest_crop")(sample)
    assert out["labels"].tolist() == [11, 12]
    assert out["texts"] == ["region 1", "region 2"]
    assert out["ann_ids"].tolist() == [101, 102]
    assert out["masks"].shape == (2, 64, 64) and out["boxes"].shape == (2, 4)
    assert out["target_index"] == 1
    sample["target_index"] = 0
    assert build_transform(SPEC, mode="shortest_crop")(sample)["target_index"] == -1


def test_tiny_region_lost_to_nearest_resize_is_dropped():
    # a single pixel at a 0.64 x 1.07 scale: nearest resizing samples pixel 1 or 3 of that row, never 2
    out = build_transform(SPEC)(make_sample([(2, 2, 3, 3), (10, 10, 50, 50)]))
    assert out["labels"].tolist() == [11] and out["texts"] == ["region 1"]
    assert out["masks"].shape == (1, 64, 64) and out["boxes"].shape == (1, 4)


def test_sample_without_regions():
    out = build_transform(SPEC, train=True, seed=0)(make_sample([]))
    assert out["masks"].shape == (0, 64, 64) and out["boxes"].shape == (0, 4)
    assert out["labels"].shape == (0,) and out["texts"] == []


def test_invalid_arguments():
    with pytest.raises(ValueError, match="mode"):
        build_transform(SPEC, mode="letterbox")
    with pytest.raises(ValueError, match="interpolation"):
        build_transform(PreprocessSpec(64, (0.5,) * 3, (0.5,) * 3, interpolation="magic"))
    with pytest.raises(ValueError, match="masks"):
        build_transform(SPEC)({**make_sample([(1, 1, 5, 5)]), "masks": np.zeros((2, H, W), np.uint8)})


def test_collate_variable_regions_including_none():
    transform = build_transform(SPEC)
    samples = [transform(make_sample(BOXES[:2])), transform(make_sample([])), transform(make_sample(BOXES[2:3]))]
    samples[0]["text"], samples[1]["text"], samples[2]["text"] = "a", "b", "c"
    for s, t in zip(samples, (0, -1, 0), strict=True):
        s["target_index"] = t
    batch = collate_regions_batch(samples)
    assert batch["image"].shape == (3, 3, 64, 64)
    assert batch["masks"].shape == (3, 64, 64) and batch["boxes"].shape == (3, 4)
    assert batch["labels"].tolist() == [10, 11, 10]
    assert batch["region_batch_index"].tolist() == [0, 0, 2]
    assert batch["num_regions"].tolist() == [2, 0, 1]
    assert batch["texts"] == ["region 0", "region 1", "region 0"]
    assert batch["image_ids"] == ["img"] * 3
    assert batch["ann_ids"].tolist() == [100, 101, 100]
    assert batch["text"] == ["a", "b", "c"]
    assert batch["target_index"].tolist() == [0, -1, 0]
    torch.testing.assert_close(batch["masks"][2], samples[2]["masks"][0])


def test_collate_alpha_and_errors():
    transform = build_transform(SPEC)
    with_alpha = transform(make_sample(BOXES[:1], alpha=True))
    batch = collate_regions_batch([with_alpha, with_alpha])
    assert batch["alpha"].shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="alpha"):
        collate_regions_batch([with_alpha, transform(make_sample(BOXES[:1]))])
    other = build_transform(PreprocessSpec(32, SPEC.mean, SPEC.std))(make_sample(BOXES[:1]))
    with pytest.raises(ValueError, match="one size"):
        collate_regions_batch([with_alpha, other])


def test_alpha_normalisation_alpha_clip_convention():
    sample = make_sample([(0, 0, 50, 60)])
    sample["alpha"] = np.zeros((H, W), np.float32)
    sample["alpha"][:, :50] = 1.0  # left half, float in [0, 1]
    alpha = build_transform(SPEC)(sample)["alpha"][0]
    torch.testing.assert_close(alpha[:, :30], torch.full((64, 30), (1 - 0.5) / 0.26))
    torch.testing.assert_close(alpha[:, 34:], torch.full((64, 30), (0 - 0.5) / 0.26))
