"""The on-disk dataset formats (COCO instances, RefCOCO refs, VOC XML) written exactly, for readers and CLI tests.

Each ``write_*`` builds a small dataset under a folder and returns the paths (and expected masks) as a dict.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

H, W = 40, 50


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major flattening, starting with zeros."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def box_mask(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def write_image(path, seed: int, size=(H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def write_coco(tmp_path: Path) -> dict:
    """Images 1 (four annotations), 2 (one), 3 (none); categories with non-contiguous ids."""
    images = tmp_path / "images"
    for i in (1, 2, 3):
        write_image(images / f"{i:012d}.png", seed=i)
    rle_mask = np.zeros((H, W), np.uint8)
    rle_mask[20:35, 5:15] = 1
    rle_mask[22:30, 15:25] = 1  # an L shape
    compressed = mask_utils.encode(np.asfortranarray(rle_mask))
    compressed["counts"] = compressed["counts"].decode("ascii")
    unc_mask = box_mask(30, 2, 48, 12)
    crowd_mask = box_mask(26, 25, 46, 38)
    anns = [
        {
            "id": 11,
            "image_id": 1,
            "category_id": 5,
            "segmentation": [[10.0, 5.0, 20.0, 5.0, 20.0, 15.0, 10.0, 15.0]],
            "area": 100.0,
            "bbox": [10.0, 5.0, 10.0, 10.0],
            "iscrowd": 0,
        },
        {
            "id": 12,
            "image_id": 1,
            "category_id": 1,
            "segmentation": {"size": [H, W], "counts": compressed["counts"]},
            "area": float(rle_mask.sum()),
            "bbox": [5.0, 20.0, 20.0, 15.0],
            "iscrowd": 0,
        },
        {
            "id": 13,
            "image_id": 1,
            "category_id": 3,
            "segmentation": uncompressed_rle(unc_mask),
            "area": float(unc_mask.sum()),
            "bbox": [30.0, 2.0, 18.0, 10.0],
            "iscrowd": 0,
        },
        {
            "id": 14,
            "image_id": 1,
            "category_id": 1,
            "segmentation": uncompressed_rle(crowd_mask),
            "area": float(crowd_mask.sum()),
            "bbox": [26.0, 25.0, 20.0, 13.0],
            "iscrowd": 1,
        },
        {
            "id": 21,
            "image_id": 2,
            "category_id": 3,
            "segmentation": [[2.0, 2.0, 12.0, 2.0, 12.0, 6.0, 2.0, 6.0]],
            "area": 40.0,
            "bbox": [2.0, 2.0, 10.0, 4.0],
            "iscrowd": 0,
        },
    ]
    data = {
        "images": [{"id": i, "file_name": f"{i:012d}.png", "height": H, "width": W} for i in (1, 2, 3)],
        "annotations": anns,
        "categories": [{"id": 5, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "cat"}],
    }
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data))
    expected = {12: rle_mask, 13: unc_mask, 14: crowd_mask, 11: box_mask(10, 5, 20, 15)}
    return {"images": images, "ann_file": ann_file, "data": data, "masks": expected}


# ---------------------------------------------------------------- RefCOCO

REFS = [
    {
        "ref_id": 0,
        "ann_id": 12,
        "image_id": 1,
        "split": "val",
        "category_id": 1,
        "sentences": [{"sent": "man on the left", "sent_id": 100}, {"sent": "person bottom left", "sent_id": 101}],
        "file_name": "COCO_train2014_000000000001_12.jpg",
    },
    {
        "ref_id": 1,
        "ann_id": 13,
        "image_id": 1,
        "split": "val",
        "category_id": 3,
        "sentences": [{"sent": "cat top right", "sent_id": 102}],
    },
    {"ref_id": 2, "ann_id": 21, "image_id": 2, "split": "train", "category_id": 3, "sentences": [{"sent": "cat"}]},
]


def write_refcoco(coco: dict, tmp_path: Path) -> dict:
    """A refs file over the images and annotations of :func:`write_coco`."""
    refs_file = tmp_path / "refs(unc).p"
    refs_file.write_bytes(pickle.dumps(REFS, protocol=2))  # the toolkit's files come from Python 2
    return {**coco, "refs_file": refs_file}


# ---------------------------------------------------------------- VOC XML

VOC_XML = """<annotation>
  <folder>VOC2012</folder>
  <filename>{filename}</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  <object><name>person</name><pose>Left</pose><truncated>0</truncated><difficult>0</difficult>
    <bndbox><xmin>11</xmin><ymin>6</ymin><xmax>20</xmax><ymax>15</ymax></bndbox></object>
  <object><name>bird</name><difficult>1</difficult>
    <bndbox><xmin>30.5</xmin><ymin>21</ymin><xmax>45</xmax><ymax>40</ymax></bndbox></object>
</annotation>
"""


def write_voc(tmp_path: Path) -> dict:
    """Two images with two boxes each: a VOC one and an ImageNet-style one (no extension, in a class folder)."""
    images, anns = tmp_path / "JPEGImages", tmp_path / "Annotations"
    anns.mkdir(parents=True)
    write_image(images / "2007_000001.png", seed=1)
    (anns / "2007_000001.xml").write_text(VOC_XML.format(filename="2007_000001.png", w=W, h=H))
    # ImageNet style: no extension in <filename>, image under <folder>/
    write_image(images / "n01440764" / "n01440764_18.JPEG", seed=2, size=(30, 36))
    xml = VOC_XML.format(filename="n01440764_18", w=36, h=30).replace("VOC2012", "n01440764")
    (anns / "n01440764_18.xml").write_text(xml.replace("<name>person</name>", "<name>tench</name>"))
    return {"images": images, "anns": anns}
