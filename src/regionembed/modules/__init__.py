"""LightningModules: they wire the plain-torch methods to Lightning's loops."""

from .contrastive import ContrastiveModule
from .mask_inversion import MaskInversionModule
from .region_classification import RegionClassificationModule

__all__ = ["ContrastiveModule", "MaskInversionModule", "RegionClassificationModule"]
