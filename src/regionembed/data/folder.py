"""A plain folder of images and region masks, for inference (MaskInversion over your own data).

Layout::

    root/
      images/<id>.<jpg|png|...>
      masks/<id>/<region>.png      one file per region, same size as the image (grey, RGB, RGBA; 0/255 or 0/1)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ..backbones.base import PreprocessSpec
from ..io import IMAGE_SUFFIXES, load_image, load_mask, preprocess_image

__all__ = ["ImageMaskDataset", "RegionFolderDataModule", "collate_regions", "scan_folder"]


def scan_folder(root: str | os.PathLike) -> list[tuple[Path, list[Path]]]:
    """List ``(image, [mask, ...])`` pairs of a region folder; raise naming the missing or empty part."""
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"region folder {root} has no {d.name}/ directory (expected {d})")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}")
    stems = [p.stem for p in images]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise ValueError(f"images in {images_dir} share a name with different suffixes (ids must be unique): {clashes}")
    items = []
    for image in images:
        region_dir = masks_dir / image.stem
        masks = sorted(region_dir.glob("*.png")) if region_dir.is_dir() else []
        if not masks:
            raise FileNotFoundError(f"no masks for image {image}: expected PNG files in {region_dir}/")
        items.append((image, masks))
    return items


class ImageMaskDataset(Dataset):
    """Images with one or more region masks each.

    Each item is a dict: ``image`` ``[3, S, S]`` (preprocessed), ``masks`` ``[N, H, W]`` float in [0, 1] at the
    image's original resolution, ``mask_names`` (N strings), ``image_id``, ``image_path``, ``size`` ``(W, H)``.
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

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, mask_paths = self.items[index]
        image = load_image(image_path)
        masks = [torch.from_numpy(load_mask(p, size=image.size)) for p in mask_paths]
        names = [p.stem for p in mask_paths]
        if len(set(names)) != len(names):
            raise ValueError(f"mask names of {image_path} are not unique: {names}")
        return {
            "image": preprocess_image(image, self.preprocess),
            "masks": torch.stack(masks),
            "mask_names": names,
            "image_id": image_path.stem,
            "image_path": str(image_path),
            "size": image.size,
        }


def collate_regions(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep samples as a list: each image has its own number and size of masks."""
    return list(batch)


class RegionFolderDataModule(L.LightningDataModule):
    """Images and masks for ``infer.py test/predict``: a region folder, or one image with explicit mask files.

    Args:
        root: a region folder (see module docstring).
        image: a single image file (instead of ``root``).
        masks: the mask files of ``image``.
        batch_size: images per step (each image is inverted on its own; batching only groups loading).
        num_workers: DataLoader workers.
        preprocess: the backbone's preprocessing; by default taken from the LightningModule's backbone.
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

    def setup(self, stage: str | None = None) -> None:
        if self.preprocess is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            if module is None or not hasattr(module, "backbone"):
                raise RuntimeError("RegionFolderDataModule needs `preprocess` or a LightningModule with a backbone")
            self.preprocess = module.backbone.preprocess
        items = scan_folder(self.root) if self.root is not None else [(self.image, self.masks)]
        self.dataset = ImageMaskDataset(items, self.preprocess)

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_regions,
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
