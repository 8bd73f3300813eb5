"""Datasets, the joint transform, the region batch format, and the LightningDataModules over them.

The datasets, :mod:`.transforms` and :mod:`.collate` are plain torch/numpy and import without Lightning. The
LightningDataModules (and the datasets that live next to them) load on first access (PEP 562), so
``import regionembed.data.collate`` in a notebook does not import Lightning, while
``from regionembed.data import RegionFolderDataModule`` and ``class_path: regionembed.data.SyntheticDataModule``
keep working.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .coco import CocoRegions
from .collate import RegionBatch, collate_regions_batch, image_views
from .refcoco import RefCocoExpressions
from .synthetic import (
    SyntheticCaptions,
    SyntheticReferring,
    SyntheticRegions,
    SyntheticTriplets,
    SyntheticWorld,
    WorldConfig,
)
from .transforms import RegionTransform, build_transform
from .voc import VocBoxes

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
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
    from .synthetic_module import (
        SyntheticDataModule,
        SyntheticReferringDataModule,
        SyntheticReferringRegions,
        TransformedDataset,
    )

#: names defined in submodules that import Lightning: ``name -> submodule``, imported on first access
_LAZY = {
    **dict.fromkeys(
        [
            "CirrDataModule",
            "ComposedDataModule",
            "ComposedDataset",
            "FashionIqDataModule",
            "SyntheticComposed",
            "SyntheticComposedDataModule",
            "collate_composed",
        ],
        "composed",
    ),
    **dict.fromkeys(["ImageMaskDataset", "RegionFolderDataModule", "scan_folder"], "folder"),
    **dict.fromkeys(
        ["CocoRegionDataModule", "RefCocoDataModule", "RegionDataModule", "VocBoxDataModule", "require_preprocess"],
        "modules",
    ),
    **dict.fromkeys(
        ["SyntheticDataModule", "SyntheticReferringDataModule", "SyntheticReferringRegions", "TransformedDataset"],
        "synthetic_module",
    ),
}


def __getattr__(name: str) -> Any:
    """Import a Lightning-dependent name on first access (PEP 562) and cache it in the package."""
    submodule = _LAZY.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{submodule}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
