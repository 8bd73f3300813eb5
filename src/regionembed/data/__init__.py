"""LightningDataModules and datasets."""

from .folder import ImageMaskDataset, RegionFolderDataModule, collate_regions, scan_folder

__all__ = ["ImageMaskDataset", "RegionFolderDataModule", "collate_regions", "scan_folder"]
