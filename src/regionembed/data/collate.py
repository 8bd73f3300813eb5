"""Batching transformed samples that each have their own number of regions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .transforms import REGION_KEYS

__all__ = ["collate_regions_batch"]

_HANDLED = {"image", "masks", "boxes", "labels", "texts", "image_id", "alpha", *REGION_KEYS}


def collate_regions_batch(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and concatenate the regions of ``B`` transformed samples (see :mod:`.transforms`).

    Regions are flattened over the batch; ``region_batch_index`` says which image each one belongs to. An image
    with no region (``N = 0``, e.g. all cropped away) simply contributes nothing to the region tensors: it is
    still in ``image`` and has ``num_regions == 0``, so a consumer must not assume every image has a region.

    Args:
        samples: transformed samples: ``image`` ``[3, S, S]``, ``masks`` ``[N_i, S, S]``, ``boxes`` ``[N_i, 4]``,
            ``labels`` ``[N_i]``, ``texts`` (``N_i`` strings), ``image_id``, optional ``alpha`` ``[1, S, S]``.

    Returns:
        A dict with

        * ``image``: ``[B, 3, S, S]``; ``alpha``: ``[B, 1, S, S]`` when the samples have one.
        * ``masks``: ``[sum N_i, S, S]``; ``boxes``: ``[sum N_i, 4]``; ``labels``: ``[sum N_i]`` int64.
        * ``region_batch_index``: ``[sum N_i]`` int64 index of each region's image; ``num_regions``: ``[B]`` int64.
        * ``texts``: ``sum N_i`` strings (region order); ``image_ids``: ``B`` strings.
        * per-region extras (:data:`~.transforms.REGION_KEYS`) concatenated to ``[sum N_i]``.
        * any other per-image key as a ``[B]`` tensor when all values are ints (e.g. ``target_index``, an index
          into that image's own regions, ``-1`` if absent), else as a list of ``B`` values (e.g. ``text``).
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
        "masks": torch.cat([s["masks"].reshape(-1, *size) for s in samples]),
        "boxes": torch.cat([s["boxes"].reshape(-1, 4) for s in samples]),
        "labels": torch.cat([s["labels"].reshape(-1) for s in samples]).long(),
        "region_batch_index": torch.repeat_interleave(torch.arange(len(samples)), num_regions),
        "num_regions": num_regions,
        "texts": [t for s in samples for t in s["texts"]],
        "image_ids": [str(s["image_id"]) for s in samples],
    }
    has_alpha = ["alpha" in s for s in samples]
    if any(has_alpha):
        if not all(has_alpha):
            raise ValueError("some samples of the batch have an alpha map and others do not")
        batch["alpha"] = torch.stack([s["alpha"] for s in samples])
    for key in REGION_KEYS:
        if key in first:
            batch[key] = torch.cat([torch.as_tensor(s[key]).reshape(-1) for s in samples]).long()
    for key in first:
        if key in _HANDLED:
            continue
        values = [s.get(key) for s in samples]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch
