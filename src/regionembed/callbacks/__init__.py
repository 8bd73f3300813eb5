"""Callbacks: prediction writers and W&B media."""

from .wandb_media import WandbRegionMedia
from .writer import InversionWriter, write_inversion

__all__ = ["InversionWriter", "WandbRegionMedia", "write_inversion"]
