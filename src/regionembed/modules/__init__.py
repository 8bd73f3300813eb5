"""LightningModules: they wire the plain-torch methods to Lightning's loops."""

from .mask_inversion import MaskInversionModule

__all__ = ["MaskInversionModule"]
