"""The one region batch format: folder samples and joint-transform samples collate alike; per-image views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from regionembed.backbones.base import PreprocessSpec
from regionembed.data import ImageMaskDataset, RegionFolderDataModule, collate_regions_batch, image_views
from regionembed.data.transforms import build_transform, preprocess_array
from regionembed.io import preprocess_image

SPEC = PreprocessSpec(size=32, mean=(0.48, 0.45, 0.40), std=(0.27, 0.26, 0.28), interpolation="bicubic")


def _raw(height: int, width: int, boxes: list[tuple[int, int, int, int]], seed: int = 0) -> dict:
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    masks = np.zeros((len(boxes), height, width), np.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes, strict=True):
        m[y0:y1, x0:x1] = 1
    return {
        "image": image,
        "masks": masks,
        "boxes": np.array(boxes, np.float32).reshape(-1, 4),
        "labels": np.arange(len(boxes)),
        "texts": [f"thing {i}" for i in range(len(boxes))],
        "image_id": f"img{seed}",
    }


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest", "area", "lanczos"])
@pytest.mark.parametrize("shape", [(40, 56), (20, 24), (32, 32)])  # down-, up-scaling, none
def test_one_preprocessing_path(interpolation, shape):
    """io.preprocess_image (single images, the folder) and the data modules' eval transform: identical tensors."""
    spec = PreprocessSpec(SPEC.size, SPEC.mean, SPEC.std, interpolation=interpolation)
    raw = _raw(*shape, [(2, 2, 10, 10)])
    via_io = preprocess_image(Image.fromarray(raw["image"]), spec)
    via_transform = build_transform(spec, mode="squash")(raw)["image"]
    assert via_io.shape == (3, 32, 32) and via_io.dtype == torch.float32
    assert torch.equal(via_io, via_transform)
    assert torch.equal(preprocess_array(raw["image"], spec), via_io)


def test_unknown_interpolation_is_refused_alike():
    spec = PreprocessSpec(32, SPEC.mean, SPEC.std, interpolation="magic")
    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    message = r"unknown interpolation 'magic'.*PreprocessSpec\.interpolation.*bicubic"
    with pytest.raises(ValueError, match=message):
        preprocess_image(image, spec)
    with pytest.raises(ValueError, match=message):
        build_transform(spec)


def test_folder_and_transform_samples_collate_into_one_format(region_folder):
    folder = ImageMaskDataset(
        [(region_folder / "images" / "a.png", sorted((region_folder / "masks" / "a").iterdir()))], SPEC
    )[0]
    coco_like = build_transform(SPEC)({**_raw(30, 40, [(0, 0, 20, 20), (5, 5, 30, 25)], seed=1), "ann_ids": [7, 9]})
    plain = build_transform(SPEC)(_raw(30, 40, [(0, 0, 20, 20)], seed=2))
    batch = collate_regions_batch([folder, coco_like, plain])
    assert batch["image"].shape == (3, 3, 32, 32) and batch["masks"].shape == (6, 32, 32)
    assert batch["num_regions"].tolist() == [3, 2, 1]
    assert batch["region_batch_index"].tolist() == [0, 0, 0, 1, 1, 2]
    assert batch["labels"].tolist() == [-1, -1, -1, 0, 1, 0]  # the folder has no classes
    assert batch["region_names"] == ["grey", "rgba", "zero_one", "7_thing 0", "9_thing 1", "0_thing 0"]
    assert batch["image_ids"] == ["a", "img1", "img2"]
    # the folder's boxes are those of its resized masks (exclusive corners)
    grey = batch["masks"][0] > 0
    ys, xs = grey.nonzero(as_tuple=True)
    assert batch["boxes"][0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]

    views = list(image_views(batch))
    assert [v["index"] for v in views] == [0, 1, 2] and [v["image_id"] for v in views] == batch["image_ids"]
    assert views[0]["original_masks"].shape == (3, 40, 56)  # the folder's masks at the image's resolution
    assert views[0]["image_path"].endswith("a.png") and views[0]["inputs_sha256"]
    assert views[1]["original_masks"] is None and views[1]["image_path"] is None  # per-image keys the others lack
    torch.testing.assert_close(views[1]["masks"], coco_like["masks"])
    assert views[1]["region_names"] == ["7_thing 0", "9_thing 1"] and views[1]["ann_ids"].tolist() == [7, 9]
    assert batch["ann_ids"].tolist() == [-1, -1, -1, 7, 9, -1]  # -1 for the regions of samples without ids
    assert views[2]["texts"] == ["thing 0"] and torch.equal(views[2]["image"], plain["image"])


def test_image_without_regions_and_name_clash():
    empty = build_transform(SPEC)(_raw(30, 40, []))
    one = build_transform(SPEC)(_raw(30, 40, [(0, 0, 20, 20)], seed=1))
    views = list(image_views(collate_regions_batch([empty, one])))
    assert views[0]["masks"].shape == (0, 32, 32) and views[0]["region_names"] == []
    assert views[1]["masks"].shape == (1, 32, 32)
    clash = {**one, "region_names": ["x"], "texts": ["a"]}
    twice = {**build_transform(SPEC)(_raw(30, 40, [(0, 0, 20, 20), (1, 1, 9, 9)])), "region_names": ["x", "x"]}
    collate_regions_batch([clash])
    with pytest.raises(ValueError, match=r"region names of image 'img0' are not unique"):
        collate_regions_batch([twice])


def test_data_modules_need_the_spec_passed_in(region_folder):
    dm = RegionFolderDataModule(root=str(region_folder))
    with pytest.raises(ValueError, match=r"RegionFolderDataModule has no `preprocess`.*backbone\.preprocess"):
        dm.setup("predict")
    dm = RegionFolderDataModule(root=str(region_folder), preprocess=SPEC, batch_size=2)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["num_regions"].tolist() == [3, 3]
    assert [m.shape for m in batch["original_masks"]] == [(3, 40, 56), (3, 64, 48)]
