"""LightningModules: they wire the plain-torch methods to Lightning's loops."""

from .alpha_clip import AlphaCLIPModule
from .composed_retrieval import ComposedRetrievalModule, LearnedCombiner, SumCombiner
from .contrastive import ContrastiveModule
from .localization import LocalizationModule, MaskInversionMaps
from .mask_inversion import MaskInversionModule
from .referring import ReferringModule
from .region_classification import RegionClassificationModule

__all__ = [
    "AlphaCLIPModule",
    "ComposedRetrievalModule",
    "ContrastiveModule",
    "LearnedCombiner",
    "LocalizationModule",
    "MaskInversionMaps",
    "MaskInversionModule",
    "ReferringModule",
    "RegionClassificationModule",
    "SumCombiner",
]
