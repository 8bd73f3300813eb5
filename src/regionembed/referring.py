"""Zero-shot referring-expression comprehension (REC) by ranking candidate regions (plain torch, no Lightning).

The usual zero-shot protocol (e.g. ReCLIP, red-circle prompting, MaskInversion's REC evaluation): every candidate
region of the image (here the image's instance masks) is embedded by a region method
(:mod:`regionembed.regions`), the expression is encoded by the text tower, and the candidate whose embedding has
the highest cosine with the expression is the answer. :class:`~regionembed.modules.ReferringModule` wires this to
the test loop and scores the answers with :class:`~regionembed.metrics.ReferringAccuracy`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .backbones.base import Backbone
from .regions import RegionEmbedder

__all__ = ["MATCHES", "Match", "answer_targets", "candidate_scores", "comprehend"]

Match = Literal["box", "mask", "index"]
MATCHES: tuple[str, ...] = ("box", "mask", "index")


def candidate_scores(
    method: RegionEmbedder,
    backbone: Backbone,
    image: torch.Tensor,
    candidates: torch.Tensor,
    expressions: torch.Tensor,
) -> torch.Tensor:
    """Cosine of every expression with every candidate region's embedding.

    Args:
        method: a region embedding method (``(backbone, image, masks) -> [N, D]``).
        backbone: the model the method embeds with.
        image: ``[3, S, S]`` normalised image.
        candidates: ``[N, S, S]`` candidate region masks in [0, 1], ``N >= 1``.
        expressions: ``[E, D]`` expression embeddings (normalised here).

    Returns:
        ``[E, N]`` cosines.
    """
    if expressions.ndim != 2:
        raise ValueError(f"expressions must be [E, D], got {tuple(expressions.shape)}")
    if candidates.ndim != 3 or candidates.shape[0] == 0:
        raise ValueError(f"candidates must be [N, S, S] with N >= 1, got {tuple(candidates.shape)}")
    regions = F.normalize(method(backbone, image, candidates).detach(), dim=-1)  # [N, D]
    if regions.shape[-1] != expressions.shape[-1]:
        raise ValueError(f"{method.name} gives D = {regions.shape[-1]}, the expressions D = {expressions.shape[-1]}")
    return F.normalize(expressions, dim=-1).to(regions.dtype) @ regions.T


def comprehend(scores: torch.Tensor, tie_tolerance: float = 1e-5) -> torch.Tensor:
    """The chosen candidate of each expression: ``[E, N]`` scores -> ``[E]`` int64 indices.

    A best score shared by several candidates gives no answer (``-1``, a miss), as ties count against the
    prediction everywhere in :mod:`regionembed.metrics`: a method that cannot tell the candidates apart (the global
    embedding gives every candidate the same embedding) must not look right by picking the first one. Scores within
    ``tie_tolerance`` of the best count as tied: identical embeddings do not give bit-identical cosines (a matrix
    product rounds its columns differently), while different regions differ by far more.

    Args:
        scores: ``[E, N]`` finite scores (cosines), ``N >= 1``.
        tie_tolerance: absolute tolerance of the tie test, in score units (``0``: exact ties only).
    """
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must be [E, N] with N >= 1, got {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or infinite values")
    if not tie_tolerance >= 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    best = scores.max(dim=1, keepdim=True).values
    unique = (scores >= best - tie_tolerance).sum(dim=1) == 1
    return torch.where(unique, scores.argmax(dim=1), torch.full_like(unique, -1, dtype=torch.long))


def answer_targets(
    chosen: torch.Tensor,
    target: torch.Tensor,
    boxes: torch.Tensor,
    masks: torch.Tensor,
    match: Match = "box",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(pred, target)`` pair that :class:`~regionembed.metrics.ReferringAccuracy` scores, in one of its forms.

    Args:
        chosen: ``[E]`` chosen candidate per expression, ``-1`` for no answer (a zero-area box, an empty mask: a
            miss in every form).
        target: ``[E]`` referred candidate per expression.
        boxes: ``[N, 4]`` xyxy boxes of the candidates.
        masks: ``[N, S, S]`` candidate masks (binarised at 0.5 for ``"mask"``).
        match: ``"box"``: the chosen and the referred candidate's boxes (hit: IoU > 0.5, RefCOCO's Acc@0.5);
            ``"mask"``: their masks (hit: mask IoU > 0.5); ``"index"``: the indices (hit: the referred candidate).

    Returns:
        ``(pred, target)``: ``[E, 4]`` boxes, ``[E, S, S]`` bool masks or ``[E]`` indices.
    """
    answered = chosen >= 0
    safe = chosen.clamp_min(0)
    if match == "box":
        return torch.where(answered[:, None], boxes[safe], torch.zeros_like(boxes[safe])), boxes[target]
    if match == "mask":
        binary = masks > 0.5
        return binary[safe] & answered[:, None, None], binary[target]
    if match == "index":
        return chosen, target
    raise ValueError(f"unknown match {match!r}; choose from {list(MATCHES)}")
