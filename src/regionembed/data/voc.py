"""Pascal VOC / ImageNet-style XML box annotations as region samples (masks are the filled boxes).

One XML file per image::

    <annotation>
      <folder>VOC2012</folder>              optional; ImageNet puts the synset here
      <filename>2007_000027.jpg</filename>  ImageNet omits the extension
      <size><width>486</width><height>500</height><depth>3</depth></size>   optional, checked when present
      <object><name>person</name><difficult>0</difficult>
        <bndbox><xmin>174</xmin><ymin>101</ymin><xmax>349</xmax><ymax>351</ymax></bndbox></object>
    </annotation>

The XML is parsed with ``xml.etree.ElementTree`` after refusing any file that contains a ``<!DOCTYPE`` or
``<!ENTITY`` declaration: annotation files never need one, and refusing them rules out entity-expansion attacks
("billion laughs") and external entities without depending on ``defusedxml``.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..io import IMAGE_SUFFIXES, load_image

__all__ = ["VocBoxes", "VocRecord", "parse_voc_xml"]


@dataclass(frozen=True)
class VocObject:
    """One ``<object>``: class name, box ``(xmin, ymin, xmax, ymax)`` as written, ``difficult`` flag."""

    name: str
    box: tuple[float, float, float, float]
    difficult: int


@dataclass(frozen=True)
class VocRecord:
    """One parsed annotation file."""

    xml_path: Path
    filename: str
    folder: str | None
    size: tuple[int, int] | None  # (width, height), None when absent or zero
    objects: tuple[VocObject, ...]


def _text(elem: ET.Element, tag: str, path: Path) -> str:
    value = elem.findtext(tag)
    if value is None or not value.strip():
        raise ValueError(f"VOC annotation {path}: <{elem.tag}> has no <{tag}>")
    return value.strip()


def _number(elem: ET.Element, tag: str, path: Path) -> float:
    value = _text(elem, tag, path)
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"VOC annotation {path}: <{tag}> is not a number: {value!r}") from None


def parse_voc_xml(path: str | os.PathLike) -> VocRecord:
    """Parse one VOC/ImageNet XML annotation file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a DOCTYPE/ENTITY declaration, non-UTF-8 bytes, malformed XML, or a missing or non-numeric
            field; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VOC annotation file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"VOC annotation {path} is not UTF-8: {err}") from err
    upper = text.upper()
    if "<!DOCTYPE" in upper or "<!ENTITY" in upper:
        raise ValueError(f"VOC annotation {path} declares a DOCTYPE or ENTITY, which is refused (unsafe XML)")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as err:
        raise ValueError(f"VOC annotation {path} is not well-formed XML: {err}") from err
    if root.tag != "annotation":
        raise ValueError(f"VOC annotation {path}: the root element is <{root.tag}>, expected <annotation>")
    size = None
    size_elem = root.find("size")
    if size_elem is not None:
        width, height = int(_number(size_elem, "width", path)), int(_number(size_elem, "height", path))
        size = (width, height) if width > 0 and height > 0 else None
    objects = []
    for obj in root.findall("object"):
        box_elem = obj.find("bndbox")
        if box_elem is None:
            raise ValueError(f"VOC annotation {path}: an <object> has no <bndbox>")
        box = tuple(_number(box_elem, tag, path) for tag in ("xmin", "ymin", "xmax", "ymax"))
        difficult = obj.findtext("difficult")
        objects.append(VocObject(_text(obj, "name", path), box, int(float(difficult)) if difficult else 0))
    folder = root.findtext("folder")
    return VocRecord(path, _text(root, "filename", path), folder.strip() if folder else None, size, tuple(objects))


class VocBoxes(Dataset):
    """Box annotations in VOC/ImageNet XML: one item per image, every object a region with a filled-box mask.

    Boxes are converted to the package's xyxy pixel frame: VOC writes 1-based inclusive pixel indices, so by
    default ``(xmin - 1, ymin - 1, xmax, ymax)`` (detectron2's convention); pass ``one_based=False`` for files
    that already hold 0-based exclusive coordinates. Boxes are clipped to the image. Masks are the filled boxes
    (covering every pixel the box touches), as boxes carry no shape: use them for box-level tasks only.

    Args:
        root_images: image folder. ``<filename>`` is looked up as ``root/filename`` and ``root/folder/filename``,
            adding an image suffix when the name has none (ImageNet).
        annotations_dir: folder of ``*.xml`` files (one per image, sorted by name).
        classes: class names; labels index into this list and objects of other classes are skipped. ``None``:
            the sorted set of all names in the annotations.
        one_based: the XML coordinates are 1-based inclusive (VOC).
        transform: applied to the raw sample.

    Images without a (kept) object are skipped. Raw item: ``image`` uint8 ``[H, W, 3]``, ``masks`` uint8
    ``[N, H, W]``, ``boxes`` float32 ``[N, 4]`` xyxy, ``labels`` int64 ``[N]``, ``texts`` (class names),
    ``image_id`` (the XML file stem), ``difficult`` int64 ``[N]``, ``file_name``,
    ``image_path`` (the file found).
    """

    def __init__(
        self,
        root_images: str | os.PathLike,
        annotations_dir: str | os.PathLike,
        classes: Sequence[str] | None = None,
        one_based: bool = True,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.root_images = Path(root_images)
        self.annotations_dir = Path(annotations_dir)
        if not self.annotations_dir.is_dir():
            raise FileNotFoundError(f"VOC annotations directory not found: {self.annotations_dir}")
        xml_files = sorted(self.annotations_dir.glob("*.xml"))
        if not xml_files:
            raise FileNotFoundError(f"no *.xml annotation files in {self.annotations_dir}")
        records = [parse_voc_xml(p) for p in xml_files]
        if classes is None:
            classes = sorted({o.name for r in records for o in r.objects})
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes must be unique, got {list(classes)}")
        self.class_names = [str(c) for c in classes]
        self.class_to_label = {c: i for i, c in enumerate(self.class_names)}
        self.one_based = one_based
        self.transform = transform
        self.records = []
        for record in records:
            kept = tuple(o for o in record.objects if o.name in self.class_to_label)
            if kept:
                self.records.append(VocRecord(record.xml_path, record.filename, record.folder, record.size, kept))

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, record: VocRecord) -> Path:
        """Find the image file of ``record``; raise ``FileNotFoundError`` listing the paths tried."""
        bases = [self.root_images / record.filename]
        if record.folder:
            bases.append(self.root_images / record.folder / record.filename)
        suffixes = (*IMAGE_SUFFIXES, *(s.upper() for s in IMAGE_SUFFIXES))
        for base in bases:
            if base.suffix.lower() in IMAGE_SUFFIXES:
                candidates = [base]
            else:  # ImageNet writes the file name without its extension
                candidates = [base.with_name(base.name + suffix) for suffix in suffixes]
            for candidate in candidates:
                if candidate.is_file():
                    return candidate
        tried = " or ".join(str(b) for b in bases)
        raise FileNotFoundError(f"image of {record.xml_path} not found: tried {tried} (adding image suffixes)")

    def raw_sample(self, index: int) -> dict[str, Any]:
        """The untransformed sample of item ``index`` (see the class docstring)."""
        record = self.records[index]
        path = self.image_path(record)
        image = np.asarray(load_image(path))
        height, width = image.shape[:2]
        if record.size is not None and record.size != (width, height):
            raise ValueError(
                f"image {path} is {width}x{height} but {record.xml_path} says {record.size[0]}x{record.size[1]}"
            )
        shift = 1.0 if self.one_based else 0.0
        boxes = np.array(
            [(o.box[0] - shift, o.box[1] - shift, o.box[2], o.box[3]) for o in record.objects], np.float32
        ).reshape(-1, 4)
        np.clip(boxes, 0, [width, height, width, height], out=boxes)
        masks = np.zeros((len(boxes), height, width), np.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes, strict=True):
            mask[math.floor(y0) : math.ceil(y1), math.floor(x0) : math.ceil(x1)] = 1
        return {
            "image": image,
            "masks": masks,
            "boxes": boxes,
            "labels": np.array([self.class_to_label[o.name] for o in record.objects], np.int64),
            "texts": [o.name for o in record.objects],
            "image_id": record.xml_path.stem,
            "difficult": np.array([o.difficult for o in record.objects], np.int64),
            "file_name": record.filename,
            "image_path": str(path),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.raw_sample(index)
        return self.transform(sample) if self.transform is not None else sample
