"""Losses shared by the methods (plain torch, no Lightning)."""

from .attention import attention_loss, energy_outside_loss
from .contrastive import ClipLoss, composed_info_nce, gather_features, masked_contrastive_loss, multi_positive_clip_loss
from .dice import dice_loss

__all__ = [
    "ClipLoss",
    "attention_loss",
    "composed_info_nce",
    "dice_loss",
    "energy_outside_loss",
    "gather_features",
    "masked_contrastive_loss",
    "multi_positive_clip_loss",
]
