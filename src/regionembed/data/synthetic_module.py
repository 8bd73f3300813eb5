"""The synthetic world as a LightningDataModule (region classification, contrastive pretraining)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from ..backbones.base import PreprocessSpec
from .modules import RegionDataModule
from .synthetic import SyntheticRegions, SyntheticWorld, WorldConfig
from .transforms import Mode, RegionTransform, build_transform

__all__ = ["SyntheticDataModule", "TransformedDataset"]


class TransformedDataset(Dataset):
    """Apply a joint transform to the raw samples of ``dataset``; exposes ``class_names`` and ``transform``."""

    def __init__(self, dataset: Dataset, transform: Callable[[dict[str, Any]], dict[str, Any]], class_names: list[str]):
        self.dataset, self.transform, self.class_names = dataset, transform, list(class_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.transform(self.dataset[index])


class SyntheticDataModule(RegionDataModule):
    """Scenes of :class:`~regionembed.data.synthetic.SyntheticWorld` with all regions, class labels and captions.

    Splits are disjoint ranges of scene indices: train ``[0, train_size)``, then val, then test. Batches follow
    :func:`~regionembed.data.collate.collate_regions_batch` (``caption`` comes as a list of strings), so the same
    data module serves contrastive pretraining (image, caption) and region classification (masks, labels).

    Args:
        world: the world's configuration (shapes, colours, objects per scene, occlusion, backgrounds...).
        world_seed: the world's seed (scene ``i`` is a function of ``(world_seed, i)`` only).
        train_size: training scenes (0: no train split).
        val_size: validation scenes.
        test_size: test scenes.
        augment: random resized crops for training; off by default because a crop can cut an object named in the
            caption.
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
        train_size: int = 20000,
        val_size: int = 500,
        test_size: int = 500,
        augment: bool = False,
        preprocess: PreprocessSpec | None = None,
        mode: Mode = "squash",
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(preprocess=preprocess, mode=mode, batch_size=batch_size, num_workers=num_workers, seed=seed)
        if min(train_size, val_size, test_size) < 0:
            raise ValueError("split sizes must be >= 0")
        self.world = SyntheticWorld(world or WorldConfig(), seed=world_seed)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.augment = augment

    def has_split(self, split: str) -> bool:
        return self.sizes[split] > 0

    def build_dataset(self, split: str, transform: RegionTransform) -> Dataset:
        start = {"train": 0, "val": self.sizes["train"], "test": self.sizes["train"] + self.sizes["val"]}[split]
        if split == "train" and not self.augment:
            transform = build_transform(self.preprocess, train=False, mode=self.mode)
        scenes = SyntheticRegions(self.world, start=start, length=self.sizes[split])
        return TransformedDataset(scenes, transform, self.world.class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self.world.class_names)
