"""LightningDataModules and datasets."""

from .coco import CocoRegions
from .collate import collate_regions_batch
from .folder import ImageMaskDataset, RegionFolderDataModule, collate_regions, scan_folder
from .modules import CocoRegionDataModule, RefCocoDataModule, RegionDataModule, VocBoxDataModule
from .refcoco import RefCocoExpressions
from .synthetic import (
    SyntheticCaptions,
    SyntheticReferring,
    SyntheticRegions,
    SyntheticTriplets,
    SyntheticWorld,
    WorldConfig,
)
from .synthetic_module import SyntheticDataModule, TransformedDataset
from .transforms import RegionTransform, build_transform
from .voc import VocBoxes

__all__ = [
    "CocoRegionDataModule",
    "CocoRegions",
    "ImageMaskDataset",
    "RefCocoDataModule",
    "RefCocoExpressions",
    "RegionDataModule",
    "RegionFolderDataModule",
    "RegionTransform",
    "SyntheticCaptions",
    "SyntheticDataModule",
    "SyntheticReferring",
    "SyntheticRegions",
    "SyntheticTriplets",
    "SyntheticWorld",
    "TransformedDataset",
    "VocBoxDataModule",
    "VocBoxes",
    "WorldConfig",
    "build_transform",
    "collate_regions",
    "collate_regions_batch",
    "scan_folder",
]
