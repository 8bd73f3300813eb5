"""Reader of FashionIQ (Wu et al., CVPR 2021) composed-retrieval annotations, in the official JSON formats.

Layout (``root``)::

    captions/cap.<category>.<split>.json        [{"candidate": name, "target": name, "captions": [c1, c2]}, ...]
    image_splits/split.<category>.<split>.json  [name, ...]
    images/<name><image_ext>                    the images

``category`` is ``dress``, ``shirt`` or ``toptee``; each pair has two relative captions, joined into one modifier
(``" and "`` by default, as CLIP4Cir). FashionIQ has no changed-region masks: grounding metrics are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..io import load_image
from .cirr import annotation_entries, load_annotation_json

__all__ = ["FashionIqPair", "FashionIqTriplets", "join_captions", "read_fashioniq_captions", "read_fashioniq_split"]


@dataclass(frozen=True)
class FashionIqPair:
    """One FashionIQ query: ``candidate`` (the reference) + ``captions`` -> ``target``."""

    candidate: str
    target: str | None
    captions: tuple[str, ...]


def join_captions(captions: Sequence[str], sep: str = " and ") -> str:
    """The modifier of a pair: its captions stripped of trailing punctuation and joined with ``sep``."""
    parts = [c.strip().strip(".?, ") for c in captions]
    return sep.join(p for p in parts if p)


def read_fashioniq_captions(path: str | Path) -> list[FashionIqPair]:
    """Read ``cap.<category>.<split>.json``: a list of ``{"candidate", "target", "captions"}``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: not JSON, not a list, or an entry misses a field or has the wrong type (naming the entry).
    """
    path = Path(path)
    pairs = []
    for i, entry in annotation_entries(path, "FashionIQ captions", ("candidate", "captions")):
        caps = entry["captions"]
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
            raise ValueError(f"{path}: entry {i}: `captions` must be a non-empty list of strings")
        target = entry.get("target")
        if not isinstance(entry["candidate"], str) or (target is not None and not isinstance(target, str)):
            raise ValueError(f"{path}: entry {i}: `candidate` and `target` must be strings")
        pairs.append(FashionIqPair(entry["candidate"], target, tuple(caps)))
    return pairs


def read_fashioniq_split(path: str | Path) -> list[str]:
    """Read ``split.<category>.<split>.json``: the list of image names of the split (the gallery)."""
    path = Path(path)
    data = load_annotation_json(path, "FashionIQ image split")
    if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
        raise ValueError(f"{path}: expected a JSON list of image names")
    return list(data)


class FashionIqTriplets(Dataset):
    """FashionIQ queries of one category as raw composed-retrieval samples (see :mod:`regionembed.data.composed`).

    Items: ``reference`` (the candidate) and ``target`` uint8 ``[H, W, 3]``, ``modifier`` (joined captions),
    ``changed_mask`` ``None``, ``reference_key`` / ``target_key`` (index in the sorted split listing, extended by
    names only the captions mention), ``image_id`` (``fashioniq-<category>-<i>``).

    Args:
        root: folder with ``captions/``, ``image_splits/`` and ``images/``.
        category: ``dress``, ``shirt`` or ``toptee``.
        split: ``train``, ``val`` or ``test``.
        image_ext: file extension of the images.
        caption_sep: how the two captions are joined.
        require_targets: raise when a pair has no target.
    """

    def __init__(
        self,
        root: str | Path,
        category: str = "dress",
        split: str = "val",
        image_ext: str = ".png",
        caption_sep: str = " and ",
        require_targets: bool = True,
    ) -> None:
        root = Path(root)
        self.category, self.split, self.image_ext, self.caption_sep = category, split, image_ext, caption_sep
        self.pairs = read_fashioniq_captions(root / "captions" / f"cap.{category}.{split}.json")
        names = read_fashioniq_split(root / "image_splits" / f"split.{category}.{split}.json")
        self.images = root / "images"
        mentioned = {n for p in self.pairs for n in (p.candidate, p.target) if n is not None}
        self.names = sorted(set(names) | mentioned)
        self.keys = {name: i for i, name in enumerate(self.names)}
        if require_targets:
            for i, pair in enumerate(self.pairs):
                if pair.target is None:
                    raise ValueError(f"FashionIQ {category}/{split}: pair {i} has no target")

    def __len__(self) -> int:
        return len(self.pairs)

    def _image(self, name: str) -> np.ndarray:
        return np.asarray(load_image(self.images / f"{name}{self.image_ext}"))

    def __getitem__(self, i: int) -> dict[str, Any]:
        pair = self.pairs[i]
        if pair.target is None:
            raise ValueError(f"FashionIQ {self.category}/{self.split}: pair {i} has no target")
        return {
            "reference": self._image(pair.candidate),
            "target": self._image(pair.target),
            "modifier": join_captions(pair.captions, self.caption_sep),
            "changed_mask": None,
            "reference_key": self.keys[pair.candidate],
            "target_key": self.keys[pair.target],
            "image_id": f"fashioniq-{self.category}-{i}",
        }
