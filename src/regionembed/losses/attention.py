"""Attention losses: how far an explainability map is from the region it should look at (plain torch).

Used by the gradient-attention loss for composed retrieval (:class:`~regionembed.modules.ComposedRetrievalModule`):
the map of the query-target score on the reference image should cover the region the modifier text changes.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .dice import dice_loss

__all__ = ["ATTENTION_LOSSES", "AttentionLossKind", "attention_loss", "energy_outside_loss"]

AttentionLossKind = Literal["dice", "bce", "energy"]
ATTENTION_LOSSES: tuple[str, ...] = ("dice", "bce", "energy")


def energy_outside_loss(maps: torch.Tensor, masks: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``1 - sum(map * mask) / sum(map)`` per map: the fraction of the map's energy outside the mask, ``[N]``.

    The complement of the energy-based pointing game (Score-CAM's "energy inside the box"), so minimising it
    maximises that metric. An all-zero map has loss 1.
    """
    m = maps.flatten(1)
    inside = (m * masks.flatten(1)).sum(1)
    return 1 - inside / (m.sum(1) + eps)


def _check(maps: torch.Tensor, masks: torch.Tensor) -> None:
    if maps.ndim != 3:
        raise ValueError(f"maps must be [N, H, W], got shape {tuple(maps.shape)}")
    if maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ in shape")
    if not torch.isfinite(maps).all():
        raise ValueError("maps contain NaN or infinite values")
    if not torch.isfinite(masks).all():
        raise ValueError("masks contain NaN or infinite values")
    if maps.numel() and (maps.min() < 0 or maps.max() > 1):
        raise ValueError(f"maps must lie in [0, 1], got [{float(maps.min()):.3g}, {float(maps.max()):.3g}]")
    if masks.numel() and (masks.min() < 0 or masks.max() > 1):
        raise ValueError("masks must lie in [0, 1] (binary, or soft targets)")
    empty = masks.flatten(1).sum(1) == 0
    if bool(empty.any()):
        raise ValueError(f"masks {torch.nonzero(empty)[:, 0].tolist()} are empty: nothing to attend to")


def attention_loss(
    maps: torch.Tensor,
    masks: torch.Tensor,
    kind: AttentionLossKind = "dice",
    reduction: Literal["mean", "none"] = "mean",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Loss between explainability maps and the ground-truth regions they should cover.

    Args:
        maps: ``[N, H, W]`` maps in [0, 1] (e.g. min-max normalised gradient-attention maps), differentiable.
        masks: ``[N, H, W]`` target masks in [0, 1], none empty.
        kind: ``"dice"``: soft Dice, ``1 - (2 |P*M| + 1) / (|P| + |M| + 1)`` (:func:`~regionembed.losses.dice_loss`,
            as MaskInversion); ``"bce"``: per-pixel binary cross-entropy, mean over pixels; ``"energy"``: the
            fraction of the map's energy outside the mask (:func:`energy_outside_loss`).
        reduction: ``"mean"`` over maps or ``"none"`` for ``[N]``.
        eps: clamp of the BCE's probabilities and floor of the energy's denominator.

    Returns:
        A scalar, or ``[N]`` with ``reduction="none"``.

    Raises:
        ValueError: mismatched shapes, NaN, values outside [0, 1], an empty mask, an unknown kind or reduction.
    """
    if kind not in ATTENTION_LOSSES:
        raise ValueError(f"unknown attention loss {kind!r}; choose from {list(ATTENTION_LOSSES)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}")
    _check(maps, masks)
    masks = masks.to(maps.dtype)
    if kind == "dice":
        per_map = dice_loss(maps, masks, reduction="none")
    elif kind == "bce":
        p = maps.clamp(eps, 1 - eps)
        per_map = F.binary_cross_entropy(p, masks, reduction="none").flatten(1).mean(1)
    else:
        per_map = energy_outside_loss(maps, masks, eps)
    return per_map.mean() if reduction == "mean" else per_map
