"""LightningDataModules over the on-disk formats: COCO instances, RefCOCO expressions, VOC/ImageNet XML boxes.

All three share one recipe (:class:`RegionDataModule`): the joint transform is built from the backbone's
:class:`~regionembed.backbones.base.PreprocessSpec`, passed in as ``preprocess`` (``infer.py`` and ``train.py`` link
it from ``model.init_args.backbone``; library code passes ``backbone.preprocess``); whether evaluation samples keep
the original pixels is passed in as ``keep_original`` (linked from the model's ``needs_original_image``); batches
are :class:`~regionembed.data.collate.RegionBatch` es (:func:`~regionembed.data.collate.collate_regions_batch`), and
training augmentation is seeded explicitly. Data modules never read the LightningModule.

Seeding: the train transform is seeded with ``seed + global_rank``; in DataLoader workers it is reseeded from
the worker's torch seed, which the loader draws from a ``torch.Generator`` seeded the same way. So augmentations
differ between workers, ranks and epochs, yet a run is reproducible for a given ``seed`` and worker count.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from ..backbones.base import PreprocessSpec
from ..distributed import world
from .coco import CocoRegions
from .collate import collate_regions_batch
from .refcoco import RefCocoExpressions
from .samplers import ResumableLoader, ResumableSampler
from .transforms import Mode, RegionTransform, build_transform, check_keep_original
from .voc import VocBoxes, parse_voc_xml

__all__ = ["CocoRegionDataModule", "RefCocoDataModule", "RegionDataModule", "VocBoxDataModule", "require_preprocess"]


def _seed_worker_transform(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker's copy of the transform its own seed.

    Without it every worker would start from the same albumentations state (and, with non-persistent workers,
    restart from it every epoch), repeating the same augmentations.
    """
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if isinstance(transform, RegionTransform):
        transform.set_seed(info.seed % 2**32)


def require_preprocess(datamodule: L.LightningDataModule) -> PreprocessSpec:
    """The data module's ``preprocess`` spec, or an error saying how to give it.

    Data modules never look into the LightningModule for it: the CLIs link it from ``model.init_args.backbone``
    (see :mod:`regionembed.cli`), library code passes ``preprocess=backbone.preprocess``.
    """
    spec = getattr(datamodule, "preprocess", None)
    if spec is None:
        raise ValueError(
            f"{type(datamodule).__name__} has no `preprocess` spec: pass the backbone's "
            f"({type(datamodule).__name__}(..., preprocess=backbone.preprocess)); infer.py and train.py set it from "
            "model.init_args.backbone"
        )
    if not isinstance(spec, PreprocessSpec):
        raise TypeError(f"{type(datamodule).__name__}.preprocess must be a PreprocessSpec, got {type(spec).__name__}")
    return spec


def _split_paths(owner: str, what: str, splits: dict[str, tuple[str | None, str | None]]) -> dict[str, tuple[str, str]]:
    """The configured ``split -> (images, annotations)``; ``test`` defaults to ``val``."""
    paths = {}
    for split, (images, ann) in splits.items():
        if (images is None) != (ann is None):
            raise ValueError(f"{owner}: give both `{split}_images` and `{split}_{what}`, or neither")
        if images is not None and ann is not None:
            paths[split] = (images, ann)
    if "test" not in paths and "val" in paths:
        paths["test"] = paths["val"]
    if not paths:
        raise ValueError(f"{owner} needs at least one split (e.g. `val_images` and `val_{what}`)")
    return paths


class RegionDataModule(L.LightningDataModule, abc.ABC):
    """Shared plumbing of the region DataModules; subclasses only say how to build a split's dataset.

    Args:
        preprocess: the backbone's preprocessing (``backbone.preprocess``); the CLIs link it from
            ``model.init_args.backbone``, so configs leave it out. Needed by :meth:`setup`.
        mode: eval resize, ``"squash"`` (MaskInversion) or ``"shortest_crop"`` (open_clip); see
            :func:`~regionembed.data.transforms.build_transform`.
        train_scale: ``RandomResizedCrop`` area range for training.
        hflip: random horizontal flips for training (off: flips corrupt "left"/"right" in texts).
        batch_size: images per batch (each with its own number of regions).
        num_workers: DataLoader workers.
        seed: seed of the training augmentation and shuffling.
        keep_original: evaluation samples also carry the raw image and its regions' masks at the raw resolution
            (``original``, ``original_masks``; see :class:`~regionembed.data.transforms.RegionTransform`), for
            region methods that crop from the original pixels (``needs_original_image``, e.g.
            :class:`~regionembed.regions.ContextCropEmbedding`). The CLIs link it from the model's
            ``needs_original_image``, so configs leave it out; a LightningModule that needs it refuses batches
            without it. Needs ``mode="squash"``: after ``"shortest_crop"`` the raw image and masks would show more
            than the model input.
    """

    def __init__(
        self,
        preprocess: PreprocessSpec | None = None,
        mode: Mode = "squash",
        train_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        keep_original: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        check_keep_original(type(self).__name__, mode, keep_original)
        self.preprocess = preprocess
        self.keep_original = bool(keep_original)
        self.mode = mode
        self.train_scale = tuple(train_scale)
        self.hflip = hflip
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.datasets: dict[str, Dataset] = {}

    @abc.abstractmethod
    def has_split(self, split: str) -> bool:
        """Whether ``split`` (``"train"``, ``"val"``, ``"test"``) is configured."""

    @abc.abstractmethod
    def build_dataset(self, split: str, transform: RegionTransform) -> Dataset:
        """Build the dataset of a configured ``split`` with ``transform``."""

    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def setup(self, stage: str | None = None) -> None:
        self.preprocess = require_preprocess(self)
        wanted = {
            "fit": ["train", "val"],
            "validate": ["val"],
            "test": ["test"],
            "predict": ["test"],
            None: ["train", "val", "test"],
        }[stage]
        if stage == "fit" and not self.has_split("train"):
            raise ValueError(f"{type(self).__name__}: `fit` needs the train split to be configured")
        for split in wanted:
            if split in self.datasets or not self.has_split(split):
                continue
            if split == "train":
                transform = build_transform(
                    self.preprocess, train=True, seed=self.seed + self.rank, scale=self.train_scale, hflip=self.hflip
                )
            else:
                transform = build_transform(
                    self.preprocess, train=False, mode=self.mode, keep_original=self.keep_original
                )
            self.datasets[split] = self.build_dataset(split, transform)
        names = {tuple(ds.class_names) for ds in self.datasets.values()}
        if len(names) > 1:
            raise ValueError(f"{type(self).__name__}: the splits have different classes: {sorted(names)}")

    @property
    def class_names(self) -> list[str]:
        """Class names, indexed by label (available after :meth:`setup`)."""
        if not self.datasets:
            raise RuntimeError(f"{type(self).__name__}.class_names is known only after setup()")
        return list(next(iter(self.datasets.values())).class_names)

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"{type(self).__name__}: split {split!r} is not configured or not set up")
        kwargs: dict[str, Any] = {}
        loader_cls = DataLoader
        if train:
            kwargs["generator"] = torch.Generator().manual_seed(self.seed + self.rank)
            kwargs["worker_init_fn"] = _seed_worker_transform
            kwargs["sampler"] = self._train_sampler(self.datasets[split])
            kwargs["progress_fn"] = self._progress
            loader_cls = ResumableLoader
            train = False  # the sampler shuffles
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            # Evaluation must count every sample once: Lightning's default DistributedSampler pads the last batch
            # with duplicates, this one gives the ranks uneven shares instead (and Lightning keeps it).
            kwargs["sampler"] = UnrepeatedDistributedSampler(self.datasets[split], shuffle=False)
        return loader_cls(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            collate_fn=collate_regions_batch,
            **kwargs,
        )

    def _train_sampler(self, dataset: Dataset) -> ResumableSampler:
        """Seeded shuffling whose order is a function of (seed, epoch) and that can skip already trained batches.

        A dataset with ``ordered = True`` (a curriculum) is read in order instead.
        """
        num_replicas, rank = world()
        return ResumableSampler(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=not getattr(dataset, "ordered", False),
            seed=self.seed,
            block=getattr(dataset, "block", 1),
        )

    def _progress(self) -> tuple[int, int]:
        """``(epoch, batches processed in it)`` as the trainer reports them (saved with checkpoints)."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


class CocoRegionDataModule(RegionDataModule):
    """COCO instances (:class:`~regionembed.data.coco.CocoRegions`) per split; ``test`` falls back to ``val``.

    Args:
        val_images: image folder of the validation split.
        val_ann_file: its ``instances_*.json``.
        train_images: image folder of the training split (needed for ``fit``).
        train_ann_file: its ``instances_*.json``.
        test_images: image folder of the test split (default: the validation split).
        test_ann_file: its ``instances_*.json``.
        min_area: drop annotations smaller than this (pixels).
        categories: keep only these category names (all when ``None``).
        include_crowd: keep ``iscrowd`` annotations.
        preprocess: see :class:`RegionDataModule`.
        mode: see :class:`RegionDataModule`.
        train_scale: see :class:`RegionDataModule`.
        hflip: see :class:`RegionDataModule`.
        batch_size: see :class:`RegionDataModule`.
        num_workers: see :class:`RegionDataModule`.
        seed: see :class:`RegionDataModule`.
        keep_original: see :class:`RegionDataModule` (the CLIs link it from the model).
    """

    def __init__(
        self,
        val_images: str | None = None,
        val_ann_file: str | None = None,
        train_images: str | None = None,
        train_ann_file: str | None = None,
        test_images: str | None = None,
        test_ann_file: str | None = None,
        min_area: float = 0.0,
        categories: list[str] | None = None,
        include_crowd: bool = False,
        preprocess: PreprocessSpec | None = None,
        mode: Mode = "squash",
        train_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        keep_original: bool = False,
    ) -> None:
        super().__init__(preprocess, mode, train_scale, hflip, batch_size, num_workers, seed, keep_original)
        self.files = _split_paths(
            type(self).__name__,
            "ann_file",
            {
                "train": (train_images, train_ann_file),
                "val": (val_images, val_ann_file),
                "test": (test_images, test_ann_file),
            },
        )
        self.min_area, self.categories, self.include_crowd = min_area, categories, include_crowd

    def has_split(self, split: str) -> bool:
        return split in self.files

    def build_dataset(self, split: str, transform: RegionTransform) -> CocoRegions:
        images, ann = self.files[split]
        return CocoRegions(images, ann, self.min_area, self.categories, self.include_crowd, transform=transform)


class RefCocoDataModule(RegionDataModule):
    """RefCOCO-style expressions (:class:`~regionembed.data.refcoco.RefCocoExpressions`), splits of one refs file.

    Args:
        images: folder of the COCO images.
        instances_file: the dataset's ``instances.json``.
        refs_file: ``refs(unc).p`` (or JSON).
        train_split: refs split for ``fit`` (``None``: no training).
        val_split: refs split for validation.
        test_split: refs split for ``test``/``predict`` (default: ``val_split``), e.g. ``"testA"``.
        preprocess: see :class:`RegionDataModule`.
        mode: see :class:`RegionDataModule`.
        train_scale: see :class:`RegionDataModule`.
        hflip: see :class:`RegionDataModule`; flips make "left"/"right" expressions wrong.
        batch_size: see :class:`RegionDataModule`.
        num_workers: see :class:`RegionDataModule`.
        seed: see :class:`RegionDataModule`.
        keep_original: see :class:`RegionDataModule` (the CLIs link it from the model).
    """

    def __init__(
        self,
        images: str,
        instances_file: str,
        refs_file: str,
        train_split: str | None = None,
        val_split: str | None = "val",
        test_split: str | None = None,
        preprocess: PreprocessSpec | None = None,
        mode: Mode = "squash",
        train_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        keep_original: bool = False,
    ) -> None:
        super().__init__(preprocess, mode, train_scale, hflip, batch_size, num_workers, seed, keep_original)
        self.images, self.instances_file, self.refs_file = images, instances_file, refs_file
        self.splits = {
            k: v for k, v in {"train": train_split, "val": val_split, "test": test_split or val_split}.items() if v
        }

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def build_dataset(self, split: str, transform: RegionTransform) -> RefCocoExpressions:
        return RefCocoExpressions(
            self.images, self.instances_file, self.refs_file, split=self.splits[split], transform=transform
        )


class VocBoxDataModule(RegionDataModule):
    """VOC/ImageNet XML boxes (:class:`~regionembed.data.voc.VocBoxes`) per split; ``test`` falls back to ``val``.

    Args:
        val_images: image folder of the validation split.
        val_annotations: its folder of XML files.
        train_images: image folder of the training split (needed for ``fit``).
        train_annotations: its folder of XML files.
        test_images: image folder of the test split (default: the validation split).
        test_annotations: its folder of XML files.
        classes: class names (labels index into it). ``None``: the sorted union of the names in all configured
            splits, so labels agree between splits and runs.
        one_based: the XML coordinates are 1-based inclusive (VOC).
        preprocess: see :class:`RegionDataModule`.
        mode: see :class:`RegionDataModule`.
        train_scale: see :class:`RegionDataModule`.
        hflip: see :class:`RegionDataModule`.
        batch_size: see :class:`RegionDataModule`.
        num_workers: see :class:`RegionDataModule`.
        seed: see :class:`RegionDataModule`.
        keep_original: see :class:`RegionDataModule` (the CLIs link it from the model).
    """

    def __init__(
        self,
        val_images: str | None = None,
        val_annotations: str | None = None,
        train_images: str | None = None,
        train_annotations: str | None = None,
        test_images: str | None = None,
        test_annotations: str | None = None,
        classes: list[str] | None = None,
        one_based: bool = True,
        preprocess: PreprocessSpec | None = None,
        mode: Mode = "squash",
        train_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        keep_original: bool = False,
    ) -> None:
        super().__init__(preprocess, mode, train_scale, hflip, batch_size, num_workers, seed, keep_original)
        self.dirs = _split_paths(
            type(self).__name__,
            "annotations",
            {
                "train": (train_images, train_annotations),
                "val": (val_images, val_annotations),
                "test": (test_images, test_annotations),
            },
        )
        self.classes, self.one_based = classes, one_based

    def has_split(self, split: str) -> bool:
        return split in self.dirs

    def _resolve_classes(self) -> list[str]:
        if self.classes is None:
            names = set()
            for _, ann_dir in set(self.dirs.values()):
                for xml in sorted(Path(ann_dir).glob("*.xml")):
                    names.update(o.name for o in parse_voc_xml(xml).objects)
            self.classes = sorted(names)
        return list(self.classes)

    def build_dataset(self, split: str, transform: RegionTransform) -> VocBoxes:
        images, ann = self.dirs[split]
        return VocBoxes(images, ann, classes=self._resolve_classes(), one_based=self.one_based, transform=transform)
