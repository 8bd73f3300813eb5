"""Soft Dice loss between explainability maps and region masks."""

from __future__ import annotations

import torch


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """``1 - (2 |P*T| + smooth) / (|P| + |T| + smooth)`` per map, as MaskInversion's official ``batched_dice_loss``.

    Args:
        pred: ``[N, ...]`` maps in [0, 1].
        target: ``[N, ...]`` masks in [0, 1], same shape.
        smooth: additive smoothing (1 in the official code).
        reduction: ``"mean"`` over maps or ``"none"`` for ``[N]``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    p = pred.flatten(1)
    t = target.flatten(1)
    per_map = 1 - (2 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)
    if reduction == "none":
        return per_map
    if reduction == "mean":
        return per_map.mean()
    raise ValueError(f"unknown reduction {reduction!r}")
