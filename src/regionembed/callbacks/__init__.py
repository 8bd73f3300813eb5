"""Callbacks: prediction writers, W&B media and progress."""

from .composed_media import ComposedRetrievalMedia
from .progress import EtaLogger
from .wandb_media import WandbRegionMedia
from .writer import InversionWriter, write_inversion

__all__ = ["ComposedRetrievalMedia", "EtaLogger", "InversionWriter", "WandbRegionMedia", "write_inversion"]
