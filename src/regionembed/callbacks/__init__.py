"""Callbacks: prediction writers and W&B media."""

from .composed_media import ComposedRetrievalMedia
from .wandb_media import WandbRegionMedia
from .writer import InversionWriter, write_inversion

__all__ = ["ComposedRetrievalMedia", "InversionWriter", "WandbRegionMedia", "write_inversion"]
