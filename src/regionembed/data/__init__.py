"""LightningDataModules and datasets."""

from .coco import CocoRegions
from .collate import RegionBatch, collate_regions_batch, image_views
from .composed import (
    CirrDataModule,
    ComposedDataModule,
    ComposedDataset,
    FashionIqDataModule,
    SyntheticComposed,
    SyntheticComposedDataModule,
    collate_composed,
)
from .folder import ImageMaskDataset, RegionFolderDataModule, scan_folder
from .modules import CocoRegionDataModule, RefCocoDataModule, RegionDataModule, VocBoxDataModule, require_preprocess
from .refcoco import RefCocoExpressions
from .synthetic import (
    SyntheticCaptions,
    SyntheticReferring,
    SyntheticRegions,
    SyntheticTriplets,
    SyntheticWorld,
    WorldConfig,
)
from .synthetic_module import (
    SyntheticDataModule,
    SyntheticReferringDataModule,
    SyntheticReferringRegions,
    TransformedDataset,
)
from .transforms import RegionTransform, build_transform
from .voc import VocBoxes

__all__ = [
    "CirrDataModule",
    "CocoRegionDataModule",
    "CocoRegions",
    "ComposedDataModule",
    "ComposedDataset",
    "FashionIqDataModule",
    "ImageMaskDataset",
    "RefCocoDataModule",
    "RefCocoExpressions",
    "RegionBatch",
    "RegionDataModule",
    "RegionFolderDataModule",
    "RegionTransform",
    "SyntheticCaptions",
    "SyntheticComposed",
    "SyntheticComposedDataModule",
    "SyntheticDataModule",
    "SyntheticReferring",
    "SyntheticReferringDataModule",
    "SyntheticReferringRegions",
    "SyntheticRegions",
    "SyntheticTriplets",
    "SyntheticWorld",
    "TransformedDataset",
    "VocBoxDataModule",
    "VocBoxes",
    "WorldConfig",
    "build_transform",
    "collate_composed",
    "collate_regions_batch",
    "image_views",
    "require_preprocess",
    "scan_folder",
]
