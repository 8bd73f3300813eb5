"""RefCOCO / RefCOCO+ / RefCOCOg referring expressions (the ``refer`` toolkit's files) as region samples.

Two files per dataset, as distributed with the ``refer`` toolkit:

* ``instances.json``: COCO-format ``images``, ``annotations`` (the candidate regions), ``categories``.
* ``refs(unc).p`` (or ``refs(umd).p``, ``refs(google).p``): a pickled list of dicts ``{ref_id, ann_id, image_id,
  split, category_id, sentences: [{sent, sent_id, ...}, ...], ...}``. The same list stored as JSON is accepted.

The pickle is *untrusted input*: unpickling can run arbitrary code through the globals a pickle names, so it is
read with :class:`RestrictedUnpickler`, which refuses every global (plain dicts, lists, strings and numbers need
none), except the harmless ``set`` and ``frozenset`` constructors.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import Dataset

from .coco import decode_masks, load_coco, read_image_array, region_fields

__all__ = ["RefCocoExpressions", "RestrictedUnpickler", "load_refs", "safe_pickle_load"]


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only builds plain data: dicts, lists, tuples, strings, numbers, bools, ``None``, sets.

    Apart from sets (the ``set``/``frozenset`` constructors), these need no global at all, so any pickle that names
    another global (a class, a function such as ``os.system`` or ``builtins.eval``, even ``_codecs.encode``, which
    Python 3 uses for ``bytes`` below protocol 3) is refused with ``pickle.UnpicklingError``. Python 2 pickles
    name builtins as ``__builtin__``, which is treated like ``builtins``.
    """

    SAFE_GLOBALS: ClassVar[frozenset[tuple[str, str]]] = frozenset({("builtins", "set"), ("builtins", "frozenset")})

    def find_class(self, module: str, name: str) -> Any:
        canonical = "builtins" if module == "__builtin__" else module
        if (canonical, name) in self.SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only plain data is allowed")


def safe_pickle_load(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (Python 2 strings decoded as UTF-8)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="utf-8").load()


def load_refs(refs_file: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a refs file (restricted pickle or JSON, detected from its content) and check its schema.

    Returns:
        The list of ref dicts.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unreadable, unsafe (the refused global is named), or not a list of refs with ``ref_id``,
            ``ann_id``, ``image_id``, ``split``, ``category_id`` and ``sentences`` (dicts with ``sent``).
    """
    path = Path(refs_file)
    if not path.is_file():
        raise FileNotFoundError(f"refs file not found: {path}")
    data = path.read_bytes()
    try:
        is_json = data.lstrip()[:1] in (b"[", b"{")  # a pickle starts with an opcode (b"\x80" from protocol 2)
        refs = json.loads(data.decode("utf-8")) if is_json else safe_pickle_load(data)
    except pickle.UnpicklingError as err:
        raise ValueError(f"refs file {path} was refused or is not a valid pickle: {err}") from err
    except Exception as err:  # a malformed pickle can raise almost anything (EOFError, KeyError, ValueError, ...)
        raise ValueError(f"cannot read refs file {path} (expected a pickle or JSON list of refs): {err}") from err
    if not isinstance(refs, list):
        raise ValueError(f"refs file {path} must hold a list of refs, got {type(refs).__name__}")
    fields = ("ref_id", "ann_id", "image_id", "split", "category_id", "sentences")
    for ref in refs:
        missing = [f for f in fields if not isinstance(ref, dict) or f not in ref]
        if missing:
            raise ValueError(f"refs file {path}: a ref lacks {missing}: {ref!r:.200}")
        sentences = ref["sentences"]
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and "sent" in s for s in sentences):
            raise ValueError(f"refs file {path}: ref {ref['ref_id']} needs 'sentences' as a list of {{'sent': ...}}")
    return refs


class RefCocoExpressions(Dataset):
    """Referring expressions: one item per (ref, sentence) of a split.

    Every annotation of the image in ``instances_file`` is a candidate region (sorted by annotation id), so a
    "best mask" evaluation can rank all of them against the expression; ``target_index`` points at the referred
    one, i.e. the target mask and box are ``masks[target_index]`` and ``boxes[target_index]``. Labels are
    contiguous over the sorted category ids of ``instances_file``; ``texts`` are the candidates' category names.

    Args:
        root_images: folder of the COCO images (``file_name`` of ``instances_file`` is relative to it).
        instances_file: the dataset's ``instances.json``.
        refs_file: ``refs(unc).p`` (restricted pickle) or the same list as JSON.
        split: ``"train"``, ``"val"``, ``"testA"``, ``"testB"`` (RefCOCO/+), ``"test"`` (RefCOCOg umd), ...
        transform: applied to the raw sample; it re-indexes ``target_index`` (``-1`` if a crop dropped it).

    Raw item: ``image`` uint8 ``[H, W, 3]``, ``masks`` uint8 ``[N, H, W]`` (candidates), ``boxes`` float32
    ``[N, 4]`` xyxy, ``labels`` int64 ``[N]``, ``texts`` (N category names), ``text`` (the sentence),
    ``target_index`` int, ``image_id`` str, ``ann_ids`` int64 ``[N]``, ``ref_id`` int, ``sent_id`` int (``-1``
    when the file has none), ``image_path`` str.
    """

    def __init__(
        self,
        root_images: str | os.PathLike,
        instances_file: str | os.PathLike,
        refs_file: str | os.PathLike,
        split: str = "val",
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.root_images = Path(root_images)
        self.instances_file = Path(instances_file)
        self.refs_file = Path(refs_file)
        self.split = split
        self.transform = transform
        self.coco = load_coco(instances_file)
        refs = load_refs(refs_file)
        splits = sorted({str(r["split"]) for r in refs})
        self.refs = [r for r in refs if r["split"] == split]
        if not self.refs:
            raise ValueError(f"refs file {self.refs_file} has no ref in split {split!r}; splits: {splits}")
        cats = sorted(self.coco.cats.values(), key=lambda c: c["id"])
        self.class_names = [str(c["name"]) for c in cats]
        self.cat_to_label = {c["id"]: i for i, c in enumerate(cats)}
        for ref in self.refs:
            ann = self.coco.anns.get(ref["ann_id"])
            if ann is None or ann["image_id"] != ref["image_id"]:
                raise ValueError(
                    f"ref {ref['ref_id']} of {self.refs_file} points at annotation {ref['ann_id']} of image "
                    f"{ref['image_id']}, which {self.instances_file} does not have"
                )
        self.items = [(r, i) for r in self.refs for i in range(len(r["sentences"]))]

    def __len__(self) -> int:
        return len(self.items)

    def raw_sample(self, index: int) -> dict[str, Any]:
        """The untransformed sample of item ``index`` (see the class docstring)."""
        ref, sent_index = self.items[index]
        img_id = ref["image_id"]
        info = self.coco.imgs[img_id]
        path = self.root_images / info["file_name"]
        image = read_image_array(path, (info["height"], info["width"]), self.instances_file)
        anns = sorted(self.coco.imgToAnns[img_id], key=lambda a: a["id"])
        masks = decode_masks(self.coco, img_id, anns, self.instances_file)
        sentence = ref["sentences"][sent_index]
        return {
            "image": image,
            **region_fields(anns, masks, self.cat_to_label, self.class_names),
            "text": str(sentence["sent"]),
            "target_index": [a["id"] for a in anns].index(ref["ann_id"]),
            "image_id": str(img_id),
            "ref_id": int(ref["ref_id"]),
            "sent_id": int(sentence.get("sent_id", -1)),
            "image_path": str(path),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.raw_sample(index)
        return self.transform(sample) if self.transform is not None else sample
