"""COCO instance annotations as region samples (one item per image, all its instances as regions).

The annotation file is the standard COCO ``instances_*.json`` (``images``, ``annotations``, ``categories``);
segmentations may be polygons, compressed RLE (``counts`` a string) or uncompressed RLE (``counts`` a list, as
COCO uses for crowd regions). Masks are decoded with ``pycocotools`` (``COCO.annToMask``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from ..io import load_image

__all__ = ["CocoRegions", "load_coco"]


def load_coco(ann_file: str | os.PathLike) -> COCO:
    """Read a COCO-format annotation file into a ``pycocotools`` ``COCO`` index, with errors naming the file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not JSON, or lacks the ``images`` / ``annotations`` / ``categories`` lists or
            the fields this package reads (image ``id``, ``file_name``, ``height``, ``width``; annotation ``id``,
            ``image_id``, ``category_id``, ``segmentation``; category ``id``, ``name``).
    """
    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"COCO annotation file {path} is not valid JSON: {err}") from err
    required = {
        "images": ("id", "file_name", "height", "width"),
        "annotations": ("id", "image_id", "category_id", "segmentation"),
        "categories": ("id", "name"),
    }
    if not isinstance(data, dict):
        raise ValueError(f"COCO annotation file {path} must hold a JSON object, got {type(data).__name__}")
    for key, fields in required.items():
        entries = data.get(key)
        if not isinstance(entries, list):
            raise ValueError(f"COCO annotation file {path} has no '{key}' list")
        for entry in entries:
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise ValueError(f"COCO annotation file {path}: an entry of '{key}' lacks {missing}: {entry!r:.200}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def decode_masks(coco: COCO, img_id: int, anns: Sequence[dict[str, Any]], source: str | os.PathLike) -> np.ndarray:
    """Decode annotations of image ``img_id`` to uint8 ``[N, H, W]`` 0/1 masks, with errors naming ``source``."""
    info = coco.imgs[img_id]
    masks = [np.zeros((0, info["height"], info["width"]), np.uint8)]
    for ann in anns:
        try:
            mask = coco.annToMask(ann)
        except Exception as err:  # pycocotools raises bare Exceptions for malformed segmentations
            raise ValueError(f"{source}: cannot decode the segmentation of annotation {ann['id']}: {err}") from err
        if mask.shape != (info["height"], info["width"]):
            raise ValueError(
                f"{source}: the mask of annotation {ann['id']} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{img_id} is {info['width']}x{info['height']} (width x height)"
            )
        masks.append((mask > 0).astype(np.uint8)[None])
    return np.concatenate(masks)


def boxes_xyxy(anns: Sequence[dict[str, Any]], masks: np.ndarray) -> np.ndarray:
    """Boxes float32 ``[N, 4]`` xyxy from the annotations' ``bbox`` (xywh), or from the mask when absent."""
    boxes = np.zeros((len(anns), 4), np.float32)
    for i, ann in enumerate(anns):
        if "bbox" in ann:
            x, y, w, h = (float(v) for v in ann["bbox"])
            boxes[i] = (x, y, x + w, y + h)
        elif masks[i].any():
            ys, xs = np.nonzero(masks[i])
            boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    if len(masks):
        h, w = masks.shape[1:]
        np.clip(boxes, 0, [w, h, w, h], out=boxes)
    return boxes


def region_fields(
    anns: Sequence[dict[str, Any]], masks: np.ndarray, cat_to_label: dict[int, int], class_names: Sequence[str]
) -> dict[str, Any]:
    """The per-region fields of a raw sample from annotations and their decoded masks ``[N, H, W]``.

    Returns:
        ``masks`` (as given), ``boxes`` float32 ``[N, 4]``, ``labels`` int64 ``[N]``, ``texts`` (class names),
        ``ann_ids`` int64 ``[N]``.
    """
    labels = np.array([cat_to_label[a["category_id"]] for a in anns], np.int64)
    return {
        "masks": masks,
        "boxes": boxes_xyxy(anns, masks),
        "labels": labels,
        "texts": [class_names[i] for i in labels],
        "ann_ids": np.array([a["id"] for a in anns], np.int64),
    }


def read_image_array(path: Path, expected_hw: tuple[int, int], ann_file: str | os.PathLike) -> np.ndarray:
    """Load an RGB image as uint8 ``[H, W, 3]``; its size must match the annotation file (else masks misalign)."""
    array = np.asarray(load_image(path))
    if array.shape[:2] != tuple(expected_hw):
        raise ValueError(
            f"image {path} is {array.shape[1]}x{array.shape[0]} but {ann_file} says "
            f"{expected_hw[1]}x{expected_hw[0]} (width x height)"
        )
    return array


class CocoRegions(Dataset):
    """COCO instances: one item per image, every selected instance a region.

    Labels are contiguous indices over the *sorted category ids* of the file (or of ``categories``); texts are
    the category names. Images with no selected annotation are skipped (they have no region to embed); an image
    can still end with ``N = 0`` if all its segmentations decode to empty masks.

    Args:
        root_images: folder of the images (``file_name`` is relative to it).
        ann_file: COCO ``instances_*.json``.
        min_area: keep annotations whose ``area`` (or mask area when absent) is at least this, in pixels.
        categories: keep only these category names (all when ``None``); labels are contiguous over them.
        include_crowd: also keep ``iscrowd=1`` annotations (their masks are usually uncompressed RLE).
        transform: applied to the raw sample, e.g. :func:`~regionembed.data.transforms.build_transform`.

    Raw item: ``image`` uint8 ``[H, W, 3]``, ``masks`` uint8 ``[N, H, W]``, ``boxes`` float32 ``[N, 4]`` xyxy,
    ``labels`` int64 ``[N]``, ``texts`` (category names), ``image_id`` (str of the COCO id), ``ann_ids`` int64
    ``[N]``, ``iscrowd`` int64 ``[N]``, ``file_name``, ``image_path``.
    """

    def __init__(
        self,
        root_images: str | os.PathLike,
        ann_file: str | os.PathLike,
        min_area: float = 0.0,
        categories: Sequence[str] | None = None,
        include_crowd: bool = False,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.root_images = Path(root_images)
        self.ann_file = Path(ann_file)
        self.coco = load_coco(ann_file)
        self.transform = transform
        cats = sorted(self.coco.cats.values(), key=lambda c: c["id"])
        if categories is not None:
            by_name = {c["name"]: c for c in cats}
            unknown = [name for name in categories if name not in by_name]
            if unknown:
                raise ValueError(f"categories {unknown} are not in {ann_file}; known: {sorted(by_name)}")
            wanted = set(categories)
            cats = [c for c in cats if c["name"] in wanted]
        self.category_ids = [c["id"] for c in cats]
        self.class_names = [str(c["name"]) for c in cats]
        self.cat_to_label = {cid: i for i, cid in enumerate(self.category_ids)}

        self.items: list[tuple[int, list[dict[str, Any]]]] = []
        for img_id in sorted(self.coco.imgs):
            anns = [
                a
                for a in self.coco.imgToAnns.get(img_id, [])
                if a["category_id"] in self.cat_to_label
                and (include_crowd or not a.get("iscrowd", 0))
                and float(a.get("area", np.inf)) >= min_area
            ]
            if anns:
                self.items.append((img_id, sorted(anns, key=lambda a: a["id"])))
        self.min_area = min_area

    def __len__(self) -> int:
        return len(self.items)

    def raw_sample(self, index: int) -> dict[str, Any]:
        """The untransformed sample of item ``index`` (see the class docstring)."""
        img_id, anns = self.items[index]
        info = self.coco.imgs[img_id]
        path = self.root_images / info["file_name"]
        image = read_image_array(path, (info["height"], info["width"]), self.ann_file)
        masks = decode_masks(self.coco, img_id, anns, self.ann_file)
        if any("area" not in a for a in anns):
            # ``area`` missing from the file: apply ``min_area`` to the decoded masks instead.
            keep = [i for i, a in enumerate(anns) if "area" in a or masks[i].sum() >= self.min_area]
            anns, masks = [anns[i] for i in keep], masks[keep]
        nonempty = [i for i in range(len(anns)) if masks[i].any()]
        anns, masks = [anns[i] for i in nonempty], masks[nonempty]
        return {
            "image": image,
            **region_fields(anns, masks, self.cat_to_label, self.class_names),
            "image_id": str(img_id),
            "iscrowd": np.array([int(a.get("iscrowd", 0)) for a in anns], np.int64),
            "file_name": str(info["file_name"]),
            "image_path": str(path),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.raw_sample(index)
        return self.transform(sample) if self.transform is not None else sample
