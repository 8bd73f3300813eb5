"""The one region batch format: images with any number of regions each, flattened over the batch.

Every region data module (the region folder, the synthetic world, COCO, RefCOCO, VOC/ImageNet boxes) batches its
transformed samples (see :mod:`.transforms`) with :func:`collate_regions_batch` into a :class:`RegionBatch`, and
every region consumer (MaskInversion, region classification, referring, localization, Alpha-CLIP) reads that.
Per-image work (MaskInversion inverts one image at a time) walks it with :func:`image_views`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NotRequired, TypedDict

import torch

from .transforms import REGION_KEYS, REGION_STR_KEYS

__all__ = ["RegionBatch", "collate_regions_batch", "image_views", "region_names"]

_REGION_TENSORS = ("masks", "boxes", "labels", *REGION_KEYS)
_REGION_LISTS = ("texts", "region_names")
_HANDLED = {"image", "image_id", "alpha", *_REGION_TENSORS, *_REGION_LISTS}


class RegionBatch(TypedDict):
    """A batch of ``B`` images with ``N_i`` regions each (``N = sum N_i``), as :func:`collate_regions_batch` builds it.

    Regions are concatenated in image order, so image ``b``'s regions are the contiguous rows
    ``offsets[b] : offsets[b] + num_regions[b]`` (``offsets`` the exclusive cumulative sum of ``num_regions``); an
    image may have none. ``S`` is the backbone's input side, ``H_i x W_i`` image ``b``'s raw size.

    Keys:
        image: float32 ``[B, 3, S, S]``, normalised with the backbone's mean and std.
        masks: float32 ``[N, S, S]`` in [0, 1], in the frame of ``image`` (0/1 except for soft folder masks).
        boxes: float32 ``[N, 4]`` xyxy in the ``S x S`` frame, ``x1``/``y1`` exclusive.
        labels: int64 ``[N]`` class indices into the data module's ``class_names`` (``-1``: no class, e.g. folder).
        region_batch_index: int64 ``[N]``, the image of each region.
        num_regions: int64 ``[B]``, ``N_i``.
        texts: ``N`` strings, per region (class name or expression; the mask name for the folder).
        region_names: ``N`` strings, unique within an image: what outputs of a region are filed under (the mask file
            name for the folder, ``<ann_id>_<text>`` with annotation ids, else ``<index>_<text>``).
        image_ids: ``B`` strings.
        alpha: float32 ``[B, 1, S, S]``, when the samples have an alpha map.
        ann_ids, iscrowd, difficult: int64 ``[N]``, when the dataset has them (``-1`` for regions without).
        original_masks: ``B`` tensors ``[N_i, H_i, W_i]``: the regions at the raw image's resolution, uncropped
            (the folder always; the other region data modules with ``keep_original=True``, which the CLIs link
            from the model's ``needs_original_image``). Only produced where ``image`` shows the whole raw image
            (``mode="squash"``), so MaskInversion fits its maps to these when present (results at the image's own
            resolution).
        original: ``B`` uint8 ``[3, H_i, W_i]`` raw images (with ``original_masks`` from the joint transform).
        image_path: ``B`` paths of the image files (the folder, COCO, RefCOCO, VOC), for overlays.
        inputs_sha256: ``B`` fingerprints of each image's input files (the folder), for resumable outputs.
        orig_size: ``B`` raw ``(H_i, W_i)``.
        text, kind, caption, ...: other per-image values as lists of ``B`` (``None`` for a sample without it);
            int-valued ones (``target_index``, an index into the image's own regions, ``-1`` if absent) as int64
            ``[B]``.
    """

    image: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    region_batch_index: torch.Tensor
    num_regions: torch.Tensor
    texts: list[str]
    region_names: list[str]
    image_ids: list[str]
    alpha: NotRequired[torch.Tensor]
    ann_ids: NotRequired[torch.Tensor]
    iscrowd: NotRequired[torch.Tensor]
    difficult: NotRequired[torch.Tensor]
    original_masks: NotRequired[list[torch.Tensor]]
    original: NotRequired[list[torch.Tensor]]
    image_path: NotRequired[list[str]]
    inputs_sha256: NotRequired[list[str]]
    orig_size: NotRequired[list[tuple[int, int]]]
    target_index: NotRequired[torch.Tensor]
    text: NotRequired[list[str]]


def region_names(sample: dict[str, Any]) -> list[str]:
    """Names of a transformed sample's regions, unique within it: its ``region_names``, else built from
    ``ann_ids`` (``"<ann_id>_<text>"``) or the region index (``"<index>_<text>"``)."""
    if "region_names" in sample:
        names = [str(n) for n in sample["region_names"]]
    elif "ann_ids" in sample:
        ann_ids = torch.as_tensor(sample["ann_ids"]).tolist()
        names = [f"{int(a)}_{t}" for a, t in zip(ann_ids, sample["texts"], strict=True)]
    else:
        names = [f"{i}_{t}" for i, t in enumerate(sample["texts"])]
    if len(set(names)) != len(names):
        raise ValueError(f"region names of image {sample.get('image_id')!r} are not unique: {names}")
    return names


def collate_regions_batch(samples: Sequence[dict[str, Any]]) -> RegionBatch:
    """Stack images and concatenate the regions of ``B`` transformed samples (see :mod:`.transforms`).

    An image with no region (``N_i = 0``, e.g. all cropped away) contributes nothing to the region tensors: it is
    still in ``image`` and has ``num_regions == 0``, so a consumer must not assume every image has a region.

    Args:
        samples: transformed samples: ``image`` ``[3, S, S]``, ``masks`` ``[N_i, S, S]``, ``boxes`` ``[N_i, 4]``,
            ``labels`` ``[N_i]``, ``texts`` (``N_i`` strings), ``image_id``, optional ``region_names``, ``alpha``
            ``[1, S, S]``, per-region extras and per-image values.

    Returns:
        A :class:`RegionBatch` (its docstring lists the keys and shapes).

    Raises:
        ValueError: an empty batch, images of different sizes, alpha maps on some samples only, or region names
            that repeat within an image.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    first = samples[0]
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"images of a batch must have one size (use a transform), got {sorted(shapes)}")
    size = tuple(first["image"].shape[-2:])
    num_regions = torch.tensor([len(s["labels"]) for s in samples], dtype=torch.long)
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),
        "masks": torch.cat([s["masks"].reshape(-1, *size) for s in samples]).float(),
        "boxes": torch.cat([torch.as_tensor(s["boxes"]).reshape(-1, 4) for s in samples]).float(),
        "labels": torch.cat([torch.as_tensor(s["labels"]).reshape(-1) for s in samples]).long(),
        "region_batch_index": torch.repeat_interleave(torch.arange(len(samples)), num_regions),
        "num_regions": num_regions,
        "texts": [str(t) for s in samples for t in s["texts"]],
        "region_names": [n for s in samples for n in region_names(s)],
        "image_ids": [str(s["image_id"]) for s in samples],
    }
    has_alpha = ["alpha" in s for s in samples]
    if any(has_alpha):
        if not all(has_alpha):
            raise ValueError("some samples of the batch have an alpha map and others do not")
        batch["alpha"] = torch.stack([s["alpha"] for s in samples])
    for key in REGION_KEYS:
        if any(key in s for s in samples):  # -1 for the regions of a sample without it
            batch[key] = torch.cat(
                [torch.as_tensor(s[key] if key in s else [-1] * len(s["labels"])).reshape(-1) for s in samples]
            ).long()
    keys = list(dict.fromkeys(k for s in samples for k in s))  # every sample's keys, in first-seen order
    for key in keys:
        if key in _HANDLED or key in REGION_STR_KEYS:
            continue
        values = [s.get(key) for s in samples]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch  # type: ignore[return-value]


def image_views(batch: RegionBatch) -> Iterator[dict[str, Any]]:
    """The images of a :class:`RegionBatch` one at a time, each with its own regions.

    Yields:
        For image ``b``: ``index`` (``b``), ``image`` ``[3, S, S]``, ``image_id``, the per-region keys restricted to
        its ``N_b`` regions (``masks`` ``[N_b, S, S]``, ``boxes``, ``labels``, ``texts``, ``region_names``, extras)
        and the ``b``-th value of every per-image key (``alpha`` ``[1, S, S]``, ``original_masks``
        ``[N_b, H_b, W_b]``, ``image_path``, ``inputs_sha256``, ``target_index``, ...).
    """
    counts = batch["num_regions"].tolist()
    size = len(counts)
    start = 0
    for b, n in enumerate(counts):
        view: dict[str, Any] = {"index": b, "image_id": batch["image_ids"][b]}
        for key, value in batch.items():
            if key in ("image_ids", "num_regions", "region_batch_index"):
                continue
            if key in _REGION_TENSORS or key in _REGION_LISTS:
                view[key] = value[start : start + n]
            elif (isinstance(value, list) or (isinstance(value, torch.Tensor) and value.ndim)) and len(value) == size:
                view[key] = value[b]
        start += n
        yield view
