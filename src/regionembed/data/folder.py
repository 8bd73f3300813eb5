"""A plain folder of images and region masks, for inference (MaskInversion over your own data).

Layout::

    root/
      images/<id>.<jpg|png|...>
      masks/<id>/<region>.<png|...>   one file per region, same size as the image (grey, RGB, RGBA, palette;
                                      0/255 or 0/1); any image suffix, in any case

Every file is accounted for: a file that is neither an image nor hidden (``.DS_Store``), two files with the same
name but different suffixes, or a mask folder without an image stop the scan with an error naming them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.ops import masks_to_boxes

from ..backbones.base import PreprocessSpec
from ..io import IMAGE_SUFFIXES, InputError, MissingInputError, load_image, load_mask, preprocess_image
from ..outputs import fingerprint_inputs
from .collate import collate_regions_batch
from .modules import require_preprocess
from .samplers import world

__all__ = ["ImageMaskDataset", "RegionFolderDataModule", "ShareSampler", "scan_folder"]

log = logging.getLogger(__name__)


def _list_images(folder: Path, what: str) -> list[Path]:
    """Image files of ``folder`` (any case of :data:`IMAGE_SUFFIXES`); anything else is an error, hidden files a
    warning, so that nothing is dropped silently."""
    files, others, hidden = [], [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            hidden.append(p.name)
        elif p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            files.append(p)
        else:
            others.append(p.name)
    if others:
        raise InputError(
            f"{folder} holds {len(others)} entr{'y' if len(others) == 1 else 'ies'} that {what} cannot use: {others}; "
            f"{what} must be image files ({', '.join(IMAGE_SUFFIXES)}, any case): move the others elsewhere"
        )
    if hidden:
        log.warning("ignoring hidden files in %s: %s", folder, hidden)
    stems = [p.stem for p in files]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise InputError(f"files in {folder} share a name with different suffixes (names must be unique): {clashes}")
    return files


def scan_folder(root: str | os.PathLike) -> list[tuple[Path, list[Path]]]:
    """List ``(image, [mask, ...])`` pairs of a region folder; raise naming the missing, extra or clashing files.

    Only files inside ``root/images`` and ``root/masks/<id>`` are read. Hidden files (names starting with ``.``,
    which includes ``..png`` whose id ``.`` could not name a mask folder) are skipped with a warning; ids that
    differ only in case are refused (their output folders would merge on macOS and Windows).
    """
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise MissingInputError(f"region folder {root} has no {d.name}/ directory (expected {d})")
    images = _list_images(images_dir, "images/")
    if not images:
        raise MissingInputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}")
    folded: dict[str, list[str]] = {}
    for p in images:
        folded.setdefault(p.stem.casefold(), []).append(p.name)
    clashes = [names for names in folded.values() if len(names) > 1]
    if clashes:
        raise InputError(f"images in {images_dir} have ids that differ only in case (ids must be unique): {clashes}")
    orphans = sorted(
        d.name for d in masks_dir.iterdir() if not d.name.startswith(".") and d.name not in {p.stem for p in images}
    )
    if orphans:
        raise InputError(
            f"{masks_dir} has entries that are no image's mask folder (no such image in {images_dir}): {orphans}"
        )
    items = []
    for image in images:
        region_dir = masks_dir / image.stem
        masks = _list_images(region_dir, "masks/") if region_dir.is_dir() else []
        if not masks:
            raise MissingInputError(f"no masks for image {image}: expected mask images in {region_dir}/")
        items.append((image, masks))
    return items


class ShareSampler(DistributedSampler):
    """Each rank gets every ``world``-th index, once; ranks may get unequal or empty shares (idle ranks).

    Lightning's predict sampler asserts that every rank has work; MaskInversion prediction needs no collective
    calls per batch, so more ranks than images is allowed (the extra ranks idle).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class ImageMaskDataset(Dataset):
    """Images with one or more region masks each, as transformed samples (see :mod:`.transforms`).

    Each item: ``image`` ``[3, S, S]`` (:func:`~regionembed.io.preprocess_image`, the data modules' eval ``squash``
    path), ``masks`` ``[N, S, S]`` (nearest resize of the masks, soft values kept), ``boxes`` ``[N, 4]`` (of the
    resized masks, xyxy, exclusive; zeros for a region too small to survive the resize), ``labels`` ``[N]`` (``-1``:
    no classes), ``texts`` and ``region_names`` (the mask file names, N strings), ``original_masks`` ``[N, H, W]``
    float in [0, 1] at the image's own resolution (what MaskInversion fits), ``image_id``, ``image_path``,
    ``orig_size`` ``(H, W)``, ``inputs_sha256`` (of the image's and masks' file bytes and the mask names: what a re-run
    must match). :func:`~regionembed.data.collate.collate_regions_batch` batches them like every region dataset.
    """

    def __init__(
        self, items: Sequence[tuple[str | os.PathLike, Sequence[str | os.PathLike]]], preprocess: PreprocessSpec
    ):
        if not items:
            raise ValueError("ImageMaskDataset needs at least one image")
        self.items = [(Path(img), [Path(m) for m in masks]) for img, masks in items]
        for img, masks in self.items:
            if not masks:
                raise ValueError(f"image {img} has no masks")
        self.preprocess = preprocess
        self.class_names: list[str] = []  # no classes: labels are -1

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, mask_paths = self.items[index]
        image = load_image(image_path)
        masks = torch.stack([torch.from_numpy(load_mask(p, size=image.size)) for p in mask_paths])  # [N, H, W]
        names = [p.stem for p in mask_paths]
        if len(set(names)) != len(names):
            raise InputError(f"mask names of {image_path} are not unique: {names}")
        inputs = fingerprint_inputs(
            image_path.read_bytes(), [(n, p.read_bytes()) for n, p in zip(names, mask_paths, strict=True)]
        )
        size = int(self.preprocess.size)
        # nearest, as the joint transform resizes masks (cv2.INTER_NEAREST picks the same source pixels)
        resized = F.interpolate(masks[:, None], size=(size, size), mode="nearest")[:, 0]
        return {
            "image": preprocess_image(image, self.preprocess),
            "masks": resized,
            "boxes": _mask_boxes(resized),
            "labels": torch.full((len(names),), -1, dtype=torch.long),
            "texts": names,
            "region_names": names,
            "original_masks": masks,
            "image_id": image_path.stem,
            "image_path": str(image_path),
            "orig_size": (image.height, image.width),
            "inputs_sha256": inputs,
        }


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """xyxy boxes ``[N, 4]`` (``x1``/``y1`` exclusive) of masks ``[N, S, S]``; zeros for an empty mask."""
    boxes = torch.zeros(len(masks), 4)
    present = masks.flatten(1).amax(1) > 0
    if present.any():
        boxes[present] = masks_to_boxes(masks[present] > 0).float() + torch.tensor([0.0, 0.0, 1.0, 1.0])
    return boxes


class RegionFolderDataModule(L.LightningDataModule):
    """Images and masks for ``infer.py test/predict``: a region folder, or one image with explicit mask files.

    Batches are :class:`~regionembed.data.collate.RegionBatch` es, as every region data module's.

    Args:
        root: a region folder (see module docstring).
        image: a single image file (instead of ``root``).
        masks: the mask files of ``image``.
        batch_size: images per step (each image is inverted on its own; batching only groups loading).
        num_workers: DataLoader workers.
        preprocess: the backbone's preprocessing (``backbone.preprocess``); ``infer.py`` and ``train.py`` link it
            from ``model.init_args.backbone``, so configs leave it out. Needed by :meth:`setup`.
    """

    def __init__(
        self,
        root: str | None = None,
        image: str | None = None,
        masks: list[str] | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        preprocess: PreprocessSpec | None = None,
    ) -> None:
        super().__init__()
        if (root is None) == (image is None):
            raise ValueError("give either `root` (a region folder) or `image` with `masks`")
        if image is not None and not masks:
            raise ValueError("`image` needs at least one mask file in `masks`")
        self.root, self.image, self.masks = root, image, masks
        self.batch_size, self.num_workers = batch_size, num_workers
        self.preprocess = preprocess
        self.dataset: ImageMaskDataset | None = None

    @property
    def class_names(self) -> list[str]:
        """No classes: region folders name their regions, they do not label them."""
        return []

    def setup(self, stage: str | None = None) -> None:
        self.preprocess = require_preprocess(self)
        items = scan_folder(self.root) if self.root is not None else [(self.image, self.masks)]
        self.dataset = ImageMaskDataset(items, self.preprocess)
        ranks = self.trainer.world_size if self.trainer is not None else 1
        if ranks > len(self.dataset):
            if stage == "test":  # metrics are synchronised across ranks: an idle rank would hang the others
                raise InputError(
                    f"`test` over {len(self.dataset)} image(s) cannot use {ranks} processes (every process needs at "
                    f"least one image): set --trainer.devices to at most {len(self.dataset)}"
                )
            # prediction needs no collective per batch: extra ranks may idle (Lightning asks to be told)
            self.allow_zero_length_dataloader_with_multiple_devices = True
            if self.trainer.global_rank == 0:
                log.warning(
                    "%d image(s) over %d processes: %d process(es) will idle",
                    len(self.dataset),
                    ranks,
                    ranks - len(self.dataset),
                )

    def _loader(self) -> DataLoader:
        replicas, rank = world()
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=ShareSampler(self.dataset, num_replicas=replicas, rank=rank),
            num_workers=self.num_workers,
            collate_fn=collate_regions_batch,
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
