"""ContextCropEmbedding: square boxes with context from the original image, padded with the mean; the transform
keeps the original pixels when asked."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from regionembed.backbones.base import PreprocessSpec
from regionembed.data import SyntheticDataModule, WorldConfig
from regionembed.data.transforms import build_transform
from regionembed.regions import ContextCropEmbedding, CropEmbedding, square_boxes


class _Capture:
    """A stand-in backbone that records the crops it is asked to embed."""

    def __init__(self, size=32):
        self.preprocess = PreprocessSpec(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.crops = None

    def encode_image(self, crops):
        self.crops = crops
        return crops.flatten(1)[:, :4]


def _scene(h=40, w=80, box=(10, 5, 40, 15)):
    """uint8 [3, H, W] black image with a white rectangle; its mask."""
    x1, y1, x2, y2 = box
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    image[:, y1:y2, x1:x2] = 255
    mask = torch.zeros(1, h, w, dtype=torch.uint8)
    mask[:, y1:y2, x1:x2] = 1
    return image, mask


def test_square_boxes_keep_the_aspect_ratio_and_add_context():
    mask = torch.zeros(1, 20, 20)
    mask[0, 2:6, 4:12] = 1  # 8 wide, 4 high, centre (8, 4)
    box = square_boxes(mask, context=0.25)[0]
    assert torch.allclose(box, torch.tensor([2.0, -2.0, 14.0, 10.0]))  # side 8 * 1.5, may leave the image


def test_crop_from_original_keeps_the_shape_and_pads_with_the_mean():
    image, mask = _scene()
    backbone = _Capture()
    model_input = torch.nn.functional.interpolate(image[None].float() / 255, size=(32, 32))[0] * 2 - 1
    squashed = torch.nn.functional.interpolate(mask[None].float(), size=(32, 32))[0]
    ContextCropEmbedding(context=0.0)(backbone, model_input, squashed, original=(image, mask))
    crop = backbone.crops[0, 0]  # normalised: white = 1, black = -1, padding = 0
    rows = (crop > 0.5).any(dim=1).sum().item()
    cols = (crop > 0.5).any(dim=0).sum().item()
    assert cols == 32 and 9 <= rows <= 12  # a 30 x 10 rectangle stays 3:1 in a square crop
    assert (crop.abs() < 1e-6).any()  # the square reaches above the image top (y from -5): grey padding
    CropEmbedding()(backbone, model_input, squashed)
    stretched = backbone.crops[0, 0]
    assert (stretched[2:-2, 2:-2] > 0.5).all()  # the old protocol stretches the tight box to fill the square


def test_masked_crop_and_fallback_to_the_model_input():
    image, mask = _scene(box=(30, 10, 50, 30))
    image[:, :, :20] = 128  # other content left of the region
    backbone = _Capture()
    model_input = torch.zeros(3, 32, 32)
    squashed = torch.nn.functional.interpolate(mask[None].float(), size=(32, 32))[0]
    ContextCropEmbedding(context=0.5, background="grey")(backbone, model_input, squashed, original=(image, mask))
    crop = backbone.crops[0]
    assert crop.shape == (3, 32, 32)
    outside = crop[:, :4, :4]
    assert outside.abs().max() < 1e-6  # outside the mask: the mean
    blur = ContextCropEmbedding(background="blur")
    assert blur.name == "masked_crop_square_blur"
    out = blur(backbone, model_input, squashed)  # no original: crops the model input instead
    assert out.shape == (1, 4)
    with pytest.raises(ValueError, match="background"):
        ContextCropEmbedding(background="black")
    with pytest.raises(ValueError, match="context"):
        ContextCropEmbedding(context=-0.1)


def test_transform_keeps_the_original_for_kept_regions():
    spec = PreprocessSpec(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    image = np.zeros((24, 40, 3), np.uint8)
    masks = np.zeros((2, 24, 40), np.uint8)
    masks[0, 2:10, 2:10] = 1
    masks[1, 12:20, 20:38] = 1
    sample = {"image": image, "masks": masks, "boxes": [[2, 2, 10, 10], [20, 12, 38, 20]], "labels": [0, 1]}
    sample |= {"texts": ["a", "b"], "image_id": "x"}
    out = build_transform(spec, keep_original=True)(sample)
    assert out["original"].shape == (3, 24, 40) and out["original"].dtype == torch.uint8
    assert torch.equal(out["original_masks"], torch.from_numpy(masks))
    assert "original" not in build_transform(spec)(sample)
    with pytest.raises(ValueError, match="evaluation"):
        build_transform(spec, train=True, keep_original=True)


def test_original_masks_match_the_model_input_or_are_refused():
    """``squash`` shows the whole image: the original masks, resized like the masks, are the masks. The centre crop of
    ``shortest_crop`` cuts the region at the right edge, so uncropped original masks would not match (MaskInversion
    would fit the crop's maps to them): keep_original is refused there, naming both settings."""
    spec = PreprocessSpec(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    masks = np.zeros((2, 24, 40), np.uint8)
    masks[0, 4:20, 12:28] = 1
    masks[1, 4:20, 26:40] = 1  # reaches the right edge
    sample = {"image": np.zeros((24, 40, 3), np.uint8), "masks": masks, "labels": [0, 1], "texts": ["a", "b"]}
    sample |= {"boxes": [[12, 4, 28, 20], [26, 4, 40, 20]], "image_id": "x"}
    out = build_transform(spec, keep_original=True)(sample)
    resized = F.interpolate(out["original_masks"][:, None].float(), size=(16, 16), mode="nearest")[:, 0]
    assert torch.equal(resized, out["masks"])
    cropped = build_transform(spec, mode="shortest_crop")(sample)["masks"]
    assert cropped.shape[0] == 2 and cropped[1].sum() < 0.6 * masks[1].sum() * (16 / 24) ** 2  # cut by the crop
    with pytest.raises(ValueError, match=r"build_transform: keep_original=True needs mode='squash', got mode='short"):
        build_transform(spec, mode="shortest_crop", keep_original=True)


def test_data_modules_keep_the_original_when_told_not_when_the_model_asks():
    """``keep_original`` is a data module argument (the CLIs link it from the model); the model is never consulted."""
    spec = PreprocessSpec(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    kwargs = {"world": WorldConfig(image_size=32, max_objects=2), "train_size": 0, "val_size": 0, "test_size": 2}
    kwargs |= {"batch_size": 2, "preprocess": spec}
    plain = SyntheticDataModule(**kwargs)
    plain.trainer = SimpleNamespace(lightning_module=SimpleNamespace(needs_original_image=True), global_rank=0)
    plain.setup("test")
    assert "original" not in next(iter(plain.test_dataloader()))
    keep = SyntheticDataModule(**kwargs, keep_original=True)
    keep.setup("test")
    batch = next(iter(keep.test_dataloader()))
    assert [tuple(o.shape) for o in batch["original"]] == [(3, 32, 32)] * 2
    originals = torch.cat(batch["original_masks"]).float()[:, None]
    assert torch.equal(F.interpolate(originals, size=(16, 16), mode="nearest")[:, 0], batch["masks"])
    with pytest.raises(ValueError, match=r"SyntheticDataModule: keep_original=True needs mode='squash'"):
        SyntheticDataModule(**kwargs, keep_original=True, mode="shortest_crop")


def test_four_connected_components_split_diagonal_neighbours():
    from regionembed.boxes import maps_to_boxes

    m = torch.zeros(6, 6)
    m[1, 1] = m[2, 2] = 1.0  # touching only at a corner
    assert len(maps_to_boxes(m, 0.5, mode="all").boxes) == 1
    assert len(maps_to_boxes(m, 0.5, mode="all", connectivity=4).boxes) == 2
    with pytest.raises(ValueError, match="connectivity"):
        maps_to_boxes(m, connectivity=6)
