"""Losses shared by the methods (plain torch, no Lightning)."""

from .dice import dice_loss

__all__ = ["dice_loss"]
