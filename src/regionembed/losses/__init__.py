"""Losses shared by the methods (plain torch, no Lightning)."""

from .attention import attention_loss, energy_outside_loss
from .contrastive import multi_positive_clip_loss
from .dice import dice_loss

__all__ = ["attention_loss", "dice_loss", "energy_outside_loss", "multi_positive_clip_loss"]
