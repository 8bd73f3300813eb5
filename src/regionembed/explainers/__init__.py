"""Explainers: ``(backbone, image [B, 3, H, W], targets [B, D]) -> maps [B, H, W]``."""

from .base import Explainer, min_max, relevance_to_map
from .legrad import LeGrad

__all__ = ["Explainer", "LeGrad", "min_max", "relevance_to_map"]
