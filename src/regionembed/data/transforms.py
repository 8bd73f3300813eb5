"""One joint transform for an image, its region masks and boxes, and an optional alpha map.

Every reader in :mod:`regionembed.data` returns a *raw sample* (numpy, before transforms):

* ``image``: uint8 ``[H, W, 3]`` RGB.
* ``masks``: uint8 ``[N, H, W]`` with values 0/1, one per region.
* ``boxes``: float32 ``[N, 4]`` ``(x0, y0, x1, y1)`` in pixels (``x1``/``y1`` exclusive, i.e. a box covering the
  whole image is ``(0, 0, W, H)``).
* ``labels``: int64 ``[N]`` contiguous class indices.
* ``texts``: ``N`` strings, per region (a class name, or a referring expression).
* ``image_id``: str.
* optional per-region keys (:data:`REGION_KEYS`, e.g. ``ann_ids``; :data:`REGION_STR_KEYS`, e.g. ``region_names``,
  names unique within the image that outputs are filed under), an optional ``alpha`` map float ``[H, W]`` in
  [0, 1] (or uint8 0..255), and any per-image keys (``text``, ``target_index``, ...), passed through.

:func:`build_transform` returns a :class:`RegionTransform` that moves all of them with a single
``albumentations.Compose`` (image, ``masks=``, ``bboxes=``, ``additional_targets={"alpha": "mask"}``), so the
geometry is identical for every target, and returns a *transformed sample* (batched by
:func:`~regionembed.data.collate.collate_regions_batch` into a :class:`~regionembed.data.collate.RegionBatch`):

* ``image``: float32 tensor ``[3, S, S]``, normalised with the backbone's mean and std.
* ``masks``: float32 tensor ``[N', S, S]`` with values 0/1 (nearest interpolation), same geometry as the image.
* ``boxes``: float32 tensor ``[N', 4]`` xyxy in the transformed pixel frame.
* ``labels``: int64 tensor ``[N']``; ``texts``: ``N'`` strings; per-region extras as int64 tensors ``[N']`` (string
  extras as lists of ``N'`` strings).
* ``alpha`` (when given): float32 tensor ``[1, S, S]``, normalised with mean 0.5 and std 0.26 (Alpha-CLIP).
* ``orig_size``: ``(H, W)`` of the raw image; ``target_index`` re-indexed (``-1`` when its region was dropped).

``N' <= N``: a region is dropped from masks, boxes, labels, texts and extras alike when its mask is empty after
the transform (cropped away, or a region smaller than about one output pixel lost to nearest resizing) or when its
box is removed by albumentations (outside the crop, or invalid in the raw sample).
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import

import functools
from collections.abc import Mapping
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch

from ..backbones.alpha import ALPHA_MEAN, ALPHA_STD
from ..backbones.base import PreprocessSpec

__all__ = [
    "ALPHA_MEAN",
    "ALPHA_STD",
    "REGION_KEYS",
    "RegionTransform",
    "build_transform",
    "check_keep_original",
    "cv2_interpolation",
    "preprocess_array",
]


#: Optional per-region keys (length ``N``) that are filtered together with the masks when regions are dropped.
REGION_KEYS = ("ann_ids", "iscrowd", "difficult")
#: Optional per-region string keys (``N`` strings), filtered like ``texts``.
REGION_STR_KEYS = ("region_names",)

_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "linear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}

Mode = Literal["squash", "shortest_crop"]


def check_keep_original(owner: str, mode: str, keep_original: bool) -> None:
    """Refuse ``keep_original`` with an eval ``mode`` whose model input is not the whole raw image.

    ``original`` and ``original_masks`` are the raw image and masks, uncropped. After ``"shortest_crop"`` the model
    input (``image``, ``masks``) shows only the centre of the image: MaskInversion would fit maps of the crop to
    masks of the whole image, and a region cut by the crop would be whole in ``original_masks``. ``"squash"`` keeps
    the whole image, so the two describe the same geometry.

    Args:
        owner: what to name in the error (a data module's class name, ``"build_transform"``).
        mode: the eval resize (see :func:`build_transform`).
        keep_original: whether ``original`` and ``original_masks`` are asked for.

    Raises:
        ValueError: ``keep_original`` with a mode other than ``"squash"``; the message names both settings.
    """
    if keep_original and mode != "squash":
        raise ValueError(
            f"{owner}: keep_original=True needs mode='squash', got mode={mode!r}: the centre crop shows only part of "
            "the image, while `original` and `original_masks` would show all of it, so they would not match `image` "
            "and `masks` (MaskInversion would fit the crop's maps to uncropped masks). Use mode='squash', or no "
            "region method that crops from the original image (keep_original is what infer.py and train.py set for "
            "methods with needs_original_image, e.g. ContextCropEmbedding)"
        )


def cv2_interpolation(name: str) -> int:
    """Map a :class:`PreprocessSpec` interpolation name (``"bicubic"``, ...) to its OpenCV flag.

    Raises:
        ValueError: an unknown name; the message names the setting (``PreprocessSpec.interpolation``).
    """
    try:
        return _INTERPOLATION[str(name).lower()]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {name!r} in the preprocessing spec (PreprocessSpec.interpolation, from the "
            f"backbone's preprocess config); expected one of {sorted(_INTERPOLATION)}"
        ) from None


def _resize_kwargs(spec: PreprocessSpec, antialias: bool) -> dict[str, Any]:
    """The interpolation arguments of every resize step: the one place that reads ``spec.interpolation``."""
    return {
        "interpolation": cv2_interpolation(spec.interpolation),
        "mask_interpolation": cv2.INTER_NEAREST,
        "area_for_downscale": "image" if antialias else None,
    }


def _normalize(spec: PreprocessSpec) -> A.Normalize:
    return A.Normalize(mean=tuple(spec.mean), std=tuple(spec.std), max_pixel_value=255.0)


@functools.lru_cache(maxsize=16)
def _image_compose(spec: PreprocessSpec, antialias: bool) -> A.Compose:
    size = int(spec.size)
    return A.Compose([A.Resize(size, size, **_resize_kwargs(spec, antialias)), _normalize(spec)])


def preprocess_array(image: np.ndarray, spec: PreprocessSpec, antialias: bool = True) -> torch.Tensor:
    """An image alone through the eval ``"squash"`` path of :func:`build_transform`: the same tensor, bit for bit.

    This is the one image preprocessing of regionembed: :func:`regionembed.io.preprocess_image` (single images,
    the region folder) calls it, and :func:`build_transform` builds its steps from the same pieces.

    Args:
        image: uint8 ``[H, W, 3]`` RGB.
        spec: the backbone's :class:`PreprocessSpec`.
        antialias: see :func:`build_transform`.

    Returns:
        float32 ``[3, S, S]``, normalised with the spec's mean and std.

    Raises:
        ValueError: not a uint8 ``[H, W, 3]`` array, or an unknown ``spec.interpolation``.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image [H, W, 3], got {image.dtype} {image.shape}")
    out = _image_compose(spec, antialias)(image=image)["image"]
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))).float()


class RegionTransform:
    """Callable joint transform ``raw sample -> transformed sample`` (see the module docstring for both schemas).

    Build it with :func:`build_transform`. It owns one ``albumentations.Compose`` whose random state is seeded
    explicitly (albumentations ignores global seeds); call :meth:`set_seed` to reseed, e.g. per DataLoader worker.

    Args:
        compose: the albumentations pipeline (geometry and image normalisation, no tensor conversion).
        size: output side ``S``.
        keep_original: also return the untransformed image (``original``, uint8 ``[3, H, W]``) and the kept
            regions' masks at that resolution (``original_masks``, uint8 ``[N', H, W]``), for region methods that
            crop from the original pixels (:class:`~regionembed.regions.ContextCropEmbedding`) and for MaskInversion
            at the image's own resolution. Only for a ``compose`` that shows the whole image (``build_transform``'s
            eval ``"squash"``): after a crop, random or central, the raw image and masks would show more than
            ``image`` and ``masks``.
    """

    def __init__(self, compose: A.Compose, size: int, keep_original: bool = False) -> None:
        self.compose = compose
        self.size = size
        self.keep_original = keep_original

    def set_seed(self, seed: int | None) -> None:
        """Reset the random state of the pipeline (``None``: non-deterministic)."""
        self.compose.set_random_seed(seed)

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """Transform one raw sample.

        Args:
            sample: a raw sample (``image`` uint8 ``[H, W, 3]``, ``masks`` ``[N, H, W]``, ``boxes`` ``[N, 4]``,
                ``labels`` ``[N]``, ``texts``, ``image_id``, optional ``alpha`` ``[H, W]`` and extras).

        Returns:
            The transformed sample: ``image`` ``[3, S, S]``, ``masks`` ``[N', S, S]``, ``boxes`` ``[N', 4]``,
            ``labels`` ``[N']``, ``texts``, optional ``alpha`` ``[1, S, S]``, ``orig_size`` and pass-through keys.
        """
        image = np.asarray(sample["image"])
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image [H, W, 3], got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        masks = (np.asarray(sample["masks"]) > 0).astype(np.uint8)  # 0/1, also from 0/255 input
        boxes = np.asarray(sample["boxes"], dtype=np.float32).reshape(-1, 4)
        n = len(boxes)
        if masks.shape != (n, height, width):
            raise ValueError(f"masks must be [N, H, W] = [{n}, {height}, {width}] to match boxes, got {masks.shape}")
        labels = np.asarray(sample["labels"], dtype=np.int64).reshape(-1)
        texts = list(sample["texts"])
        if len(labels) != n or len(texts) != n:
            raise ValueError(f"{n} regions but {len(labels)} labels and {len(texts)} texts")

        targets: dict[str, Any] = {"image": image, "bboxes": boxes, "region_index": list(range(n))}
        if n:  # albumentations cannot stack an empty mask list
            targets["masks"] = masks
        alpha = sample.get("alpha")
        if alpha is not None:
            targets["alpha"] = _alpha_to_unit(np.asarray(alpha), (height, width))
        out = self.compose(**targets)

        # Keep a region only when both its box survived and its mask is non-empty, in the original order.
        # (albumentations returns label fields as floats.)
        box_of = {round(float(i)): b for i, b in zip(out["region_index"], out["bboxes"], strict=True)}
        out_masks = np.asarray(out["masks"]) if n else np.zeros((0, self.size, self.size), np.uint8)
        out_masks = out_masks.reshape(n, self.size, self.size)
        keep = [i for i in range(n) if i in box_of and out_masks[i].any()]

        result = {k: v for k, v in sample.items() if k not in ("image", "masks", "boxes", "labels", "texts", "alpha")}
        for key in REGION_STR_KEYS:
            if key in sample:
                if len(sample[key]) != n:
                    raise ValueError(f"per-region key {key!r} has {len(sample[key])} values for {n} regions")
                result[key] = [str(sample[key][i]) for i in keep]
        result["image"] = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))).float()
        result["masks"] = torch.from_numpy(out_masks[keep].astype(np.float32)).reshape(-1, self.size, self.size)
        result["boxes"] = torch.tensor(np.array([box_of[i] for i in keep], np.float32).reshape(-1, 4))
        result["labels"] = torch.from_numpy(labels[keep])
        result["texts"] = [texts[i] for i in keep]
        for key in REGION_KEYS:
            if key in sample:
                values = np.asarray(sample[key]).reshape(-1)
                if len(values) != n:
                    raise ValueError(f"per-region key {key!r} has {len(values)} values for {n} regions")
                result[key] = torch.from_numpy(values[keep].astype(np.int64))
        if "target_index" in sample:
            target = int(sample["target_index"])
            result["target_index"] = keep.index(target) if target in keep else -1
        if alpha is not None:
            result["alpha"] = (torch.from_numpy(np.asarray(out["alpha"], np.float32))[None] - ALPHA_MEAN) / ALPHA_STD
        result["orig_size"] = (height, width)
        if self.keep_original:
            result["original"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
            result["original_masks"] = torch.from_numpy(masks[keep]).reshape(-1, height, width)
        return result


def _alpha_to_unit(alpha: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An alpha map as float32 ``[H, W]`` in [0, 1]: uint8 0..255 is divided by 255 (0/1 uint8 kept as is)."""
    if alpha.shape != shape:
        raise ValueError(f"alpha must be [H, W] = {list(shape)} like the image, got {list(alpha.shape)}")
    alpha = alpha.astype(np.float32)
    if alpha.max(initial=0.0) > 1.0:
        alpha = alpha / 255.0
    if alpha.min(initial=0.0) < 0.0 or alpha.max(initial=0.0) > 1.0:
        raise ValueError("alpha values must lie in [0, 1] (float) or [0, 255] (uint8)")
    return alpha


def build_transform(
    spec: PreprocessSpec,
    train: bool = False,
    mode: Mode = "squash",
    seed: int | None = None,
    scale: tuple[float, float] = (0.5, 1.0),
    hflip: bool = False,
    antialias: bool = True,
    keep_original: bool = False,
) -> RegionTransform:
    """Build the joint image/mask/box/alpha transform for a backbone's preprocessing.

    Args:
        spec: the backbone's :class:`PreprocessSpec` (size ``S``, mean, std, interpolation name).
        train: random augmentation (``RandomResizedCrop`` to ``S x S`` with ``scale``, then an optional flip)
            instead of the deterministic eval resize.
        mode: eval resize. ``"squash"``: resize to ``S x S`` ignoring the aspect ratio, no crop (the official
            MaskInversion evaluation; no region is cut). ``"shortest_crop"``: resize the shortest side to ``S``
            and centre-crop (open_clip's eval transform; regions near the long sides may be cut or dropped).
        seed: seed of the pipeline's own random state; two transforms with the same seed give the same sequence
            of augmentations. ``None`` is non-deterministic.
        scale: area fraction range of ``RandomResizedCrop`` (train only).
        hflip: add ``HorizontalFlip(p=0.5)`` (train only). Off by default: a flip turns "left of" into "right of",
            which silently corrupts referring expressions and spatial relations in ``texts``.
        antialias: resize the image with ``cv2.INTER_AREA`` when downscaling (albumentations'
            ``area_for_downscale="image"``). OpenCV's cubic/linear resize does not antialias, unlike the PIL /
            torchvision resize CLIP models were trained with; area downscaling is much closer to the latter.
            Upscaling always uses ``spec.interpolation``; masks and alpha always use nearest.
        keep_original: see :class:`RegionTransform` (eval transforms with ``mode="squash"`` only).

    Returns:
        A :class:`RegionTransform`.

    Raises:
        ValueError: an unknown ``mode``, a bad ``scale``, or ``keep_original`` with ``train`` or with
            ``mode="shortest_crop"`` (see :func:`check_keep_original`).
    """
    if keep_original and train:
        raise ValueError("keep_original is for evaluation transforms (train=False)")
    if mode not in ("squash", "shortest_crop"):
        raise ValueError(f"unknown mode {mode!r}; expected 'squash' or 'shortest_crop'")
    check_keep_original("build_transform", mode, keep_original)
    lo, hi = scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    size = int(spec.size)
    resize_kwargs = _resize_kwargs(spec, antialias)
    steps: list[A.BasicTransform]
    if train:
        steps = [A.RandomResizedCrop(size=(size, size), scale=(lo, hi), **resize_kwargs)]
        if hflip:
            steps.append(A.HorizontalFlip(p=0.5))
    elif mode == "squash":
        steps = [A.Resize(size, size, **resize_kwargs)]
    else:
        steps = [A.SmallestMaxSize(max_size=size, **resize_kwargs), A.CenterCrop(size, size)]
    steps.append(_normalize(spec))
    compose = A.Compose(
        steps,
        bbox_params=A.BboxParams(
            format="pascal_voc", label_fields=["region_index"], clip=True, filter_invalid_bboxes=True
        ),
        additional_targets={"alpha": "mask"},
        seed=seed,
    )
    return RegionTransform(compose, size, keep_original=keep_original)
