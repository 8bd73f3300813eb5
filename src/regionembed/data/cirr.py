"""Reader of CIRR (Liu et al., ICCV 2021) composed-retrieval annotations, in the official release's JSON formats.

Layout (``root``)::

    captions/cap.rc2.<split>.json        [{"pairid", "reference", "target_hard", "caption", "img_set": {...}}, ...]
    image_splits/split.rc2.<split>.json  {"<image name>": "./<split>/<dir>/<file>.png", ...}
    <image_root>/<relative path>         the images (``image_root`` defaults to ``root``)

``split`` is ``train``, ``val`` or ``test1``; the test split's targets are not public (no ``target_hard``), so it
can only be read with ``require_targets=False``. CIRR has no changed-region masks: items carry ``changed_mask =
None`` and grounding metrics are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..io import load_image

__all__ = [
    "CirrPair",
    "CirrTriplets",
    "annotation_entries",
    "load_annotation_json",
    "read_cirr_captions",
    "read_cirr_split",
]


@dataclass(frozen=True)
class CirrPair:
    """One CIRR query: ``reference`` + ``caption`` -> ``target`` (``None`` in the hidden test split)."""

    pairid: int
    reference: str
    target: str | None
    caption: str
    members: tuple[str, ...] = ()


def load_annotation_json(path: Path, what: str) -> Any:
    """Parse an annotation file; ``FileNotFoundError``/``ValueError`` naming ``what`` and the file otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def annotation_entries(path: Path, what: str, required: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(index, entry)`` of a JSON list of objects that each have the ``required`` keys; a ``ValueError`` naming the
    file and the entry otherwise (and the errors of :func:`load_annotation_json`)."""
    data = load_annotation_json(path, what)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of pairs, got {type(data).__name__}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {i} is not an object")
        missing = [k for k in required if k not in entry]
        if missing:
            raise ValueError(f"{path}: entry {i} misses {missing}")
        yield i, entry


def read_cirr_captions(path: str | Path) -> list[CirrPair]:
    """Read ``cap.rc2.<split>.json``: a list of pairs with ``pairid``, ``reference``, ``caption``, optional
    ``target_hard`` and ``img_set.members``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: not JSON, not a list, or an entry misses a field or has the wrong type (naming the entry).
    """
    path = Path(path)
    pairs = []
    for i, entry in annotation_entries(path, "CIRR captions", ("pairid", "reference", "caption")):
        target = entry.get("target_hard")
        if not isinstance(entry["reference"], str) or not isinstance(entry["caption"], str):
            raise ValueError(f"{path}: entry {i}: `reference` and `caption` must be strings")
        if target is not None and not isinstance(target, str):
            raise ValueError(f"{path}: entry {i}: `target_hard` must be a string")
        members = entry.get("img_set", {}).get("members", []) if isinstance(entry.get("img_set"), dict) else []
        pairs.append(CirrPair(int(entry["pairid"]), entry["reference"], target, entry["caption"], tuple(members)))
    return pairs


def read_cirr_split(path: str | Path) -> dict[str, str]:
    """Read ``split.rc2.<split>.json``: image name -> relative image path.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: not JSON or not an object of strings.
    """
    path = Path(path)
    data = load_annotation_json(path, "CIRR image split")
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"{path}: expected a JSON object mapping image names to relative paths")
    return dict(data)


class CirrTriplets(Dataset):
    """CIRR queries as raw composed-retrieval samples (see :mod:`regionembed.data.composed`).

    Items: ``reference`` and ``target`` uint8 ``[H, W, 3]``, ``modifier`` (the caption), ``changed_mask`` ``None``,
    ``reference_key`` / ``target_key`` (index of the image name in the sorted split listing: the gallery key),
    ``image_id`` (``cirr-<pairid>``).

    Args:
        root: folder with ``captions/`` and ``image_splits/``.
        split: ``train``, ``val`` or ``test1``.
        image_root: folder the split file's relative paths start from (default ``root``).
        require_targets: raise when a pair has no target (the hidden test split).
    """

    def __init__(
        self, root: str | Path, split: str = "val", image_root: str | Path | None = None, require_targets: bool = True
    ) -> None:
        root = Path(root)
        self.split = split
        self.pairs = read_cirr_captions(root / "captions" / f"cap.rc2.{split}.json")
        self.paths = read_cirr_split(root / "image_splits" / f"split.rc2.{split}.json")
        self.image_root = Path(image_root) if image_root is not None else root
        self.names = sorted(self.paths)
        self.keys = {name: i for i, name in enumerate(self.names)}
        for pair in self.pairs:
            if pair.target is None and require_targets:
                raise ValueError(f"CIRR {split}: pair {pair.pairid} has no target_hard (hidden test labels)")
            for name in (pair.reference, pair.target):
                if name is not None and name not in self.paths:
                    raise ValueError(f"CIRR {split}: pair {pair.pairid} names image {name!r}, not in the split file")

    def __len__(self) -> int:
        return len(self.pairs)

    def _image(self, name: str) -> np.ndarray:
        return np.asarray(load_image(self.image_root / self.paths[name]))

    def __getitem__(self, i: int) -> dict[str, Any]:
        pair = self.pairs[i]
        if pair.target is None:
            raise ValueError(f"CIRR {self.split}: pair {pair.pairid} has no target")
        return {
            "reference": self._image(pair.reference),
            "target": self._image(pair.target),
            "modifier": pair.caption,
            "changed_mask": None,
            "reference_key": self.keys[pair.reference],
            "target_key": self.keys[pair.target],
            "image_id": f"cirr-{pair.pairid}",
        }
