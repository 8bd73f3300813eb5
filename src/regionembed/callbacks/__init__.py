"""Callbacks: prediction writers (and, later, W&B media)."""

from .writer import InversionWriter, write_inversion

__all__ = ["InversionWriter", "write_inversion"]
