"""The synthetic world as a LightningDataModule (region classification, contrastive pretraining)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch.utils.data import ConcatDataset, Dataset

from ..backbones.base import PreprocessSpec
from .modules import RegionDataModule
from .synthetic import SyntheticReferring, SyntheticRegions, SyntheticWorld, WorldConfig, region_sample
from .transforms import Mode, RegionTransform, build_transform

__all__ = [
    "CurriculumDataset",
    "SyntheticDataModule",
    "SyntheticEditPairs",
    "SyntheticReferringDataModule",
    "SyntheticReferringRegions",
    "TransformedDataset",
]


class TransformedDataset(Dataset):
    """Apply a joint transform to the raw samples of ``dataset``; exposes ``class_names`` and ``transform``."""

    def __init__(
        self,
        dataset: Dataset,
        transform: Callable[[dict[str, Any]], dict[str, Any]],
        class_names: list[str],
        block: int = 1,
    ) -> None:
        self.dataset, self.transform, self.class_names = dataset, transform, list(class_names)
        self.block = block  # see ResumableSampler

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.transform(self.dataset[index])


class CurriculumDataset(ConcatDataset):
    """Phases read in order (``ordered = True`` tells the training sampler not to shuffle), e.g. single-object scenes
    before multi-object ones.

    Synthetic scenes are independent draws already, so reading them in order loses no randomness. Every phase's
    length must be a multiple of ``block`` (pairs of hard negatives stay together).
    """

    ordered = True

    def __init__(self, phases: list[Dataset], class_names: list[str], block: int = 1) -> None:
        for phase in phases:
            if len(phase) % block:
                raise ValueError(f"curriculum phase of {len(phase)} items is not a multiple of block={block}")
        super().__init__(phases)
        self.class_names, self.block = list(class_names), block


class _ClassCaptions(Dataset):
    """Replace each scene's caption by ``template.format(<class name of its object>)`` (single-object scenes)."""

    def __init__(self, dataset: Dataset, template: str) -> None:
        self.dataset, self.template = dataset, template

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        return {**item, "caption": self.template.format(item["texts"][0])}


class SyntheticEditPairs(Dataset):
    """Scenes in pairs: items ``2k`` and ``2k + 1`` are the reference and the edited target of ``world.triplet``.

    The two differ in one object's shape or colour (``WorldConfig.triplet_kinds``), so in a contrastive batch that
    keeps pairs together (``block = 2``) each image has a hard negative whose caption differs in one word: colour
    sets alone no longer separate the batch, and the model has to learn shapes. Items follow
    :class:`~regionembed.data.synthetic.SyntheticRegions`.
    """

    block = 2

    def __init__(self, world: SyntheticWorld, start: int = 0, length: int = 1000) -> None:
        if length < 2 or length % 2:
            raise ValueError(f"SyntheticEditPairs needs an even length >= 2, got {length}")
        self.world, self.start, self.length = world, start, length
        self._last: tuple[int, Any] | None = None  # the pair's two items are read one after the other

    def __len__(self) -> int:
        return self.length

    def _triplet(self, index: int):
        if self._last is None or self._last[0] != index:
            self._last = (index, self.world.triplet(index))
        return self._last[1]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        index = self.start + i // 2
        triplet = self._triplet(index)
        scene = triplet.reference if i % 2 == 0 else triplet.target
        suffix = "ref" if i % 2 == 0 else "edit"
        return region_sample(self.world, scene, f"synthetic-s{self.world.seed}-{index:08d}-{suffix}")


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
        hard_negatives: train on :class:`SyntheticEditPairs` (each scene with an edited copy in the same batch)
            instead of independent scenes; ``train_size`` counts images and ``batch_size`` must be even.
        single_object_images: a curriculum: training first reads this many single-object scenes (the same world
            with ``max_objects = 1``, from indices beyond every other split), in order, then the ``train_size``
            images above (``train_size`` may be 0: the curriculum alone). Shapes are far easier to learn from one
            object per caption; the step count grows by ``single_object_images / batch_size``.
        single_object_caption: caption template of the curriculum's scenes, filled with the object's class name
            (e.g. ``"a {}."``, the zero-shot prompt); None keeps the scene captions (templates and background).
        preprocess: see :class:`~regionembed.data.modules.RegionDataModule`.
        mode: see :class:`~regionembed.data.modules.RegionDataModule`.
        batch_size: see :class:`~regionembed.data.modules.RegionDataModule`.
        num_workers: see :class:`~regionembed.data.modules.RegionDataModule`.
        seed: see :class:`~regionembed.data.modules.RegionDataModule`.
        keep_original: see :class:`~regionembed.data.modules.RegionDataModule` (the CLIs link it from the model).
    """

    def __init__(
        self,
        world: WorldConfig | None = None,
        world_seed: int = 0,
        train_size: int = 20000,
        val_size: int = 500,
        test_size: int = 500,
        augment: bool = False,
        hard_negatives: bool = False,
        single_object_images: int = 0,
        single_object_caption: str | None = None,
        preprocess: PreprocessSpec | None = None,
        mode: Mode = "squash",
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        keep_original: bool = False,
    ) -> None:
        super().__init__(
            preprocess=preprocess,
            mode=mode,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            keep_original=keep_original,
        )
        if min(train_size, val_size, test_size, single_object_images) < 0:
            raise ValueError("split sizes and single_object_images must be >= 0")
        self.world = SyntheticWorld(world or WorldConfig(), seed=world_seed)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.augment = augment
        self.hard_negatives = hard_negatives
        self.single_object_images = single_object_images
        if single_object_caption is not None and "{}" not in single_object_caption:
            raise ValueError(f"single_object_caption needs a '{{}}' placeholder, got {single_object_caption!r}")
        self.single_object_caption = single_object_caption
        if hard_negatives and (batch_size % 2 or train_size % 2 or single_object_images % 2):
            raise ValueError(
                "hard_negatives needs an even batch_size, train_size and single_object_images (pairs stay together)"
            )

    #: scene indices of the hard-negative training pairs: far beyond any plain split, so never a val/test scene
    PAIRS_START = 10**8
    #: scene indices of the single-object curriculum phase (a world of its own, also never a val/test scene)
    SINGLE_START = 3 * 10**8

    def has_split(self, split: str) -> bool:
        if split == "train":  # a curriculum alone is a training set too
            return self.sizes[split] > 0 or self.single_object_images > 0
        return self.sizes[split] > 0

    def build_dataset(self, split: str, transform: RegionTransform) -> Dataset:
        start = {"train": 0, "val": self.sizes["train"], "test": self.sizes["train"] + self.sizes["val"]}[split]
        if split == "train" and not self.augment:
            transform = build_transform(self.preprocess, train=False, mode=self.mode)
        names = self.world.class_names
        phases: list[Dataset] = []
        if split == "train" and self.hard_negatives and self.sizes[split]:
            pairs = SyntheticEditPairs(self.world, start=self.PAIRS_START, length=self.sizes[split])
            phases.append(TransformedDataset(pairs, transform, names, block=2))
        elif self.sizes[split]:
            scenes = SyntheticRegions(self.world, start=start, length=self.sizes[split])
            phases.append(TransformedDataset(scenes, transform, names))
        if split != "train" or not self.single_object_images:
            return phases[0]
        config = dataclasses.replace(self.world.config, min_objects=1, max_objects=1)
        single = SyntheticRegions(
            SyntheticWorld(config, seed=self.world.seed), start=self.SINGLE_START, length=self.single_object_images
        )
        if self.single_object_caption is not None:
            single = _ClassCaptions(single, self.single_object_caption)
        single = TransformedDataset(single, transform, names)
        return CurriculumDataset([single, *phases], names, block=2 if self.hard_negatives and phases else 1)

    @property
    def class_names(self) -> list[str]:
        return list(self.world.class_names)


class SyntheticReferringRegions(SyntheticReferring):
    """:class:`~regionembed.data.synthetic.SyntheticReferring` in the schema of the referring data modules.

    One item per (scene, expression): the scene's region sample (``image``, ``masks`` and ``boxes`` of every object,
    i.e. the candidates, ``labels``, ``texts``, ``caption``, ``image_id``) plus ``text`` (the expression),
    ``target_index`` (the referred object among the candidates) and ``kind`` (``"attribute"``, ``"size"``,
    ``"ordinal"``, ``"relation"``, or ``"category"`` when ``ambiguous_only`` is off), as RefCOCO items.
    """

    def __getitem__(self, i: int) -> dict[str, Any]:
        index, k = self.pairs[i]
        scene = self.world.scene(index)
        ref = self.world.referring_expressions(scene, self.ambiguous_only)[k]
        sample = region_sample(self.world, scene, self._image_id(index))
        sample.update(text=ref.text, target_index=int(ref.target), kind=ref.kind)
        return sample


class SyntheticReferringDataModule(RegionDataModule):
    """Referring expressions of :class:`~regionembed.data.synthetic.SyntheticWorld` scenes, as ``RefCocoDataModule``.

    Splits are disjoint ranges of scene indices, as :class:`SyntheticDataModule`: train ``[start, start +
    train_size)``, then val, then test; every expression of a split's scenes is an item (so ``len`` counts
    expressions). Batches follow :func:`~regionembed.data.collate.collate_regions_batch` with the per-image ``text``,
    ``target_index`` and ``kind``.

    Args:
        world: the world's configuration.
        world_seed: the world's seed.
        start: first scene index of the train split (the others follow it).
        train_size: training scenes (0: no train split).
        val_size: validation scenes.
        test_size: test scenes.
        ambiguous_only: only objects whose bare shape is ambiguous (expressions that need attributes, sizes,
            ordinals or relations); ``False`` adds "the circle" and attribute expressions of unique shapes.
        preprocess: see :class:`~regionembed.data.modules.RegionDataModule`.
        mode: see :class:`~regionembed.data.modules.RegionDataModule`.
        batch_size: see :class:`~regionembed.data.modules.RegionDataModule`.
        num_workers: see :class:`~regionembed.data.modules.RegionDataModule`.
        seed: see :class:`~regionembed.data.modules.RegionDataModule`.
        keep_original: see :class:`~regionembed.data.modules.RegionDataModule` (the CLIs link it from the model).
    """

    def __init__(
        self,
        world: WorldConfig | None = None,
        world_seed: int = 0,
        start: int = 0,
        train_size: int = 0,
        val_size: int = 0,
        test_size: int = 200,
        ambiguous_only: bool = True,
        preprocess: PreprocessSpec | None = None,
        mode: Mode = "squash",
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        keep_original: bool = False,
    ) -> None:
        super().__init__(
            preprocess=preprocess,
            mode=mode,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            keep_original=keep_original,
        )
        if start < 0 or min(train_size, val_size, test_size) < 0:
            raise ValueError("start and the split sizes must be >= 0")
        self.world = SyntheticWorld(world or WorldConfig(), seed=world_seed)
        self.start = start
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.ambiguous_only = ambiguous_only

    def has_split(self, split: str) -> bool:
        return self.sizes[split] > 0

    def build_dataset(self, split: str, transform: RegionTransform) -> Dataset:
        offset = {"train": 0, "val": self.sizes["train"], "test": self.sizes["train"] + self.sizes["val"]}[split]
        referring = SyntheticReferringRegions(
            self.world, start=self.start + offset, length=self.sizes[split], ambiguous_only=self.ambiguous_only
        )
        if len(referring) == 0:
            raise ValueError(
                f"SyntheticReferringDataModule: the {self.sizes[split]} {split} scenes have no referring expression; "
                "use more scenes or ambiguous_only: false"
            )
        return TransformedDataset(referring, transform, self.world.class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self.world.class_names)
