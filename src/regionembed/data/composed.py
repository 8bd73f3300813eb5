"""Composed-retrieval data: (reference image, modifier text, target image, changed-region mask) and DataModules.

A *raw* composed sample (from :class:`SyntheticComposed`, :class:`~regionembed.data.cirr.CirrTriplets` or
:class:`~regionembed.data.fashioniq.FashionIqTriplets`) holds ``reference`` and ``target`` uint8 ``[H, W, 3]``,
``modifier`` (str), ``changed_mask`` uint8 ``[H, W]`` or ``None``, ``reference_key`` and ``target_key`` (int gallery
keys: equal keys mean the same image), ``image_id``. :class:`ComposedDataset` transforms it with the backbone's
deterministic eval transform (the same geometry for both images and the mask; no augmentation, which would have to
move the pair together) into ``reference``/``target`` ``[3, S, S]``, ``mask`` ``[S, S]`` float 0/1 or ``None``, and
:func:`collate_composed` batches those.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..backbones.base import PreprocessSpec
from .cirr import CirrTriplets
from .fashioniq import FashionIqTriplets
from .modules import RegionDataModule
from .synthetic import SyntheticWorld, WorldConfig, _SceneRange
from .transforms import Mode, RegionTransform, build_transform

__all__ = [
    "CirrDataModule",
    "ComposedDataModule",
    "ComposedDataset",
    "FashionIqDataModule",
    "SyntheticComposed",
    "SyntheticComposedDataModule",
    "collate_composed",
]


class SyntheticComposed(_SceneRange):
    """Composed-retrieval triplets of the synthetic world (:meth:`SyntheticWorld.triplet`), raw.

    Item ``i`` is the triplet of scene ``start + i``; its gallery keys are ``2 * scene`` (reference) and
    ``2 * scene + 1`` (target), so every image has its own key. ``changed_mask`` is the triplet's union of the
    edited object's visible region before and after the edit (the only pixels that differ).

    Args:
        world: the synthetic world.
        start: first scene index.
        length: number of triplets.
    """

    def __getitem__(self, i: int) -> dict[str, Any]:
        scene = self._index(i)
        t = self.world.triplet(scene)
        return {
            "reference": t.reference.image,
            "target": t.target.image,
            "modifier": t.modifier,
            "changed_mask": t.changed_mask,
            "kind": t.kind,
            "reference_key": 2 * scene,
            "target_key": 2 * scene + 1,
            "image_id": self._image_id(scene),
        }


def _mask_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)


class ComposedDataset(Dataset):
    """Transform raw composed samples of ``dataset`` (see the module docstring) with one eval ``transform``.

    Items: ``reference``, ``target`` ``[3, S, S]``; ``mask`` ``[S, S]`` float 0/1 or ``None``; ``modifier``;
    ``reference_key``, ``target_key``, ``index`` (ints); ``image_id``.

    Raises (per item):
        ValueError: images that are not uint8 RGB, a mask of another size than the reference, an empty or
            non-binary mask.
    """

    class_names: list[str] = []  # noqa: RUF012 - RegionDataModule compares the classes of its splits

    def __init__(self, dataset: Dataset, transform: RegionTransform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def _image(self, image: np.ndarray, mask: np.ndarray | None, image_id: str) -> tuple[torch.Tensor, Any]:
        sample: dict[str, Any] = {"image": image, "image_id": image_id}
        if mask is None:
            sample.update(masks=np.zeros((0, *image.shape[:2]), np.uint8), boxes=np.zeros((0, 4)), labels=[], texts=[])
        else:
            sample.update(masks=mask[None], boxes=_mask_box(mask), labels=[0], texts=[""])
        out = self.transform(sample)
        if mask is None:
            return out["image"], None
        if len(out["masks"]) != 1:
            raise ValueError(f"{image_id}: the changed-region mask vanished in the transform (too small?)")
        return out["image"], out["masks"][0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw = self.dataset[index]
        image_id = str(raw["image_id"])
        mask = raw.get("changed_mask")
        for name in ("reference", "target"):
            img = np.asarray(raw[name])
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"{image_id}: {name} must be a uint8 [H, W, 3] image, got {img.dtype} {img.shape}")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != np.asarray(raw["reference"]).shape[:2]:
                raise ValueError(
                    f"{image_id}: changed_mask {mask.shape} does not match the reference image "
                    f"{np.asarray(raw['reference']).shape[:2]}"
                )
            values = np.unique(mask)
            if not np.isin(values, (0, 1, 255)).all():
                raise ValueError(f"{image_id}: changed_mask must be binary (0/1 or 0/255), got values {values[:5]}")
            if not values.max(initial=0):
                raise ValueError(f"{image_id}: changed_mask is empty")
            mask = (mask > 0).astype(np.uint8)
        reference, out_mask = self._image(np.asarray(raw["reference"]), mask, image_id)
        target, _ = self._image(np.asarray(raw["target"]), None, image_id)
        return {
            "reference": reference,
            "target": target,
            "mask": out_mask,
            "modifier": str(raw["modifier"]),
            "reference_key": int(raw["reference_key"]),
            "target_key": int(raw["target_key"]),
            "index": int(index),
            "image_id": image_id,
        }


def collate_composed(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch transformed composed samples.

    Returns:
        ``reference``, ``target`` ``[B, 3, S, S]``; ``mask`` ``[B, S, S]`` (``None`` when no sample has one);
        ``modifier`` (B strings); ``reference_key``, ``target_key``, ``index`` ``[B]`` int64; ``image_ids``.

    Raises:
        ValueError: an empty batch, or some samples with a mask and others without.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    has_mask = [s["mask"] is not None for s in samples]
    if any(has_mask) and not all(has_mask):
        raise ValueError("some samples of the batch have a changed-region mask and others do not")
    return {
        "reference": torch.stack([s["reference"] for s in samples]),
        "target": torch.stack([s["target"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]) if all(has_mask) else None,
        "modifier": [s["modifier"] for s in samples],
        "reference_key": torch.tensor([s["reference_key"] for s in samples], dtype=torch.long),
        "target_key": torch.tensor([s["target_key"] for s in samples], dtype=torch.long),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "image_ids": [s["image_id"] for s in samples],
    }


class ComposedDataModule(RegionDataModule):
    """Shared plumbing of the composed-retrieval DataModules (on :class:`RegionDataModule`: the backbone's
    preprocessing passed in as ``preprocess``, seeded resumable shuffling, evaluation without duplicate padding under
    DDP); subclasses return raw composed datasets from :meth:`raw_dataset`. Every split uses the deterministic eval
    transform.
    """

    def raw_dataset(self, split: str) -> Dataset:
        """The raw composed samples of a configured ``split``."""
        raise NotImplementedError

    def build_dataset(self, split: str, transform: RegionTransform) -> Dataset:
        # the pair and its mask must share one geometry: no random crops here, whatever the split
        return ComposedDataset(self.raw_dataset(split), build_transform(self.preprocess, train=False, mode=self.mode))

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        loader = super()._loader(split, train)
        loader.collate_fn = collate_composed  # read when an iterator is created, so setting it here is enough
        return loader


class SyntheticComposedDataModule(ComposedDataModule):
    """Composed-retrieval triplets of the synthetic world with changed-region masks.

    Splits are disjoint ranges of scene indices starting at ``start``: train, then val, then test. The default
    ``start`` lies beyond every scene the synthetic CLIP (``configs/train/clip_synthetic.yaml``) was trained on.

    Args:
        world: the world's configuration (``triplet_kinds`` chooses the edits).
        world_seed: the world's seed.
        start: first scene index of the train split.
        train_size: training triplets (0: no train split).
        val_size: validation triplets.
        test_size: test triplets.
        preprocess: see :class:`~regionembed.data.modules.RegionDataModule`.
        mode: see :class:`~regionembed.data.modules.RegionDataModule`.
        batch_size: see :class:`~regionembed.data.modules.RegionDataModule`.
        num_workers: see :class:`~regionembed.data.modules.RegionDataModule`.
        seed: see :class:`~regionembed.data.modules.RegionDataModule`.
    """

    def __init__(
        self,
        world: WorldConfig | None = None,
        world_seed: int = 0,
        start: int = 200_000_000,
        train_size: int = 10000,
        val_size: int = 256,
        test_size: int = 500,
        preprocess: PreprocessSpec | None = None,
        mode: Mode = "squash",
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(preprocess=preprocess, mode=mode, batch_size=batch_size, num_workers=num_workers, seed=seed)
        if min(train_size, val_size, test_size) < 0 or start < 0:
            raise ValueError("split sizes and start must be >= 0")
        self.world = SyntheticWorld(world or WorldConfig(), seed=world_seed)
        self.start = start
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}

    def has_split(self, split: str) -> bool:
        return self.sizes[split] > 0

    def raw_dataset(self, split: str) -> Dataset:
        offset = {"train": 0, "val": self.sizes["train"], "test": self.sizes["train"] + self.sizes["val"]}[split]
        return SyntheticComposed(self.world, start=self.start + offset, length=self.sizes[split])


class CirrDataModule(ComposedDataModule):
    """CIRR (:class:`~regionembed.data.cirr.CirrTriplets`); ``test`` defaults to ``val`` (test1 targets are hidden).

    Args:
        root: folder with ``captions/`` and ``image_splits/``.
        image_root: folder of the images (default ``root``).
        train_split: split for ``fit`` (``None``: no training).
        val_split: validation split.
        test_split: split for ``test`` (default ``val_split``).
        preprocess: see :class:`~regionembed.data.modules.RegionDataModule`.
        mode: see :class:`~regionembed.data.modules.RegionDataModule`.
        batch_size: see :class:`~regionembed.data.modules.RegionDataModule`.
        num_workers: see :class:`~regionembed.data.modules.RegionDataModule`.
        seed: see :class:`~regionembed.data.modules.RegionDataModule`.
    """

    def __init__(
        self,
        root: str,
        image_root: str | None = None,
        train_split: str | None = "train",
        val_split: str | None = "val",
        test_split: str | None = None,
        preprocess: PreprocessSpec | None = None,
        mode: Mode = "shortest_crop",
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(preprocess=preprocess, mode=mode, batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.root, self.image_root = root, image_root
        splits = {"train": train_split, "val": val_split, "test": test_split or val_split}
        self.splits = {k: v for k, v in splits.items() if v}

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def raw_dataset(self, split: str) -> Dataset:
        return CirrTriplets(self.root, self.splits[split], image_root=self.image_root)


class FashionIqDataModule(ComposedDataModule):
    """FashionIQ, one category (:class:`~regionembed.data.fashioniq.FashionIqTriplets`); ``test`` defaults to ``val``.

    Args:
        root: folder with ``captions/``, ``image_splits/`` and ``images/``.
        category: ``dress``, ``shirt`` or ``toptee``.
        train_split: split for ``fit`` (``None``: no training).
        val_split: validation split.
        test_split: split for ``test`` (default ``val_split``).
        image_ext: file extension of the images.
        preprocess: see :class:`~regionembed.data.modules.RegionDataModule`.
        mode: see :class:`~regionembed.data.modules.RegionDataModule`.
        batch_size: see :class:`~regionembed.data.modules.RegionDataModule`.
        num_workers: see :class:`~regionembed.data.modules.RegionDataModule`.
        seed: see :class:`~regionembed.data.modules.RegionDataModule`.
    """

    def __init__(
        self,
        root: str,
        category: str = "dress",
        train_split: str | None = "train",
        val_split: str | None = "val",
        test_split: str | None = None,
        image_ext: str = ".png",
        preprocess: PreprocessSpec | None = None,
        mode: Mode = "shortest_crop",
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(preprocess=preprocess, mode=mode, batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.root, self.category, self.image_ext = root, category, image_ext
        splits = {"train": train_split, "val": val_split, "test": test_split or val_split}
        self.splits = {k: v for k, v in splits.items() if v}

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def raw_dataset(self, split: str) -> Dataset:
        return FashionIqTriplets(self.root, self.category, self.splits[split], image_ext=self.image_ext)
