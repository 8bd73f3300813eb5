"""Query combiners of composed image retrieval: ``combine(image [B, D], text [B, D]) -> query [B, D]`` (unit norm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["COMBINERS", "LearnedCombiner", "SumCombiner", "build_combiner"]

COMBINERS = ("sum", "learned")


class SumCombiner(nn.Module):
    """``normalize(normalize(image) + normalize(text))``: the training-free baseline.

    Args:
        dim: embedding dimension D (unused; for a signature shared with :class:`LearnedCombiner`).
    """

    def __init__(self, dim: int = 0) -> None:
        super().__init__()

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` image and text embeddings -> ``[B, D]`` unit-norm queries."""
        return F.normalize(F.normalize(image, dim=-1) + F.normalize(text, dim=-1), dim=-1)


class LearnedCombiner(nn.Module):
    """The CLIP4Cir combiner (Baldrati et al., 2022), small.

    Image and text embeddings are projected (Linear, ReLU, dropout) and concatenated; one branch maps the pair to an
    output embedding, another to a mixing weight ``lam`` in (0, 1); the query is
    ``normalize(out + lam * text + (1 - lam) * image)`` (unit-norm inputs). Our choice: the output layer starts at
    zero, so training starts from a weighted sum (the :class:`SumCombiner` direction at ``lam = 0.5``).

    Args:
        dim: embedding dimension D.
        proj_dim: width of the two projections.
        hidden_dim: width of the combining layers.
        dropout: dropout after the projections and hidden layers.
    """

    def __init__(self, dim: int, proj_dim: int = 256, hidden_dim: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"LearnedCombiner needs the embedding dimension, got dim={dim}")
        self.image_proj = nn.Sequential(nn.Linear(dim, proj_dim), nn.ReLU(), nn.Dropout(dropout))
        self.text_proj = nn.Sequential(nn.Linear(dim, proj_dim), nn.ReLU(), nn.Dropout(dropout))
        self.combine = nn.Sequential(nn.Linear(2 * proj_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.output = nn.Linear(hidden_dim, dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        self.mix = nn.Sequential(
            nn.Linear(2 * proj_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, 1), nn.Sigmoid()
        )

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` image and text embeddings -> ``[B, D]`` unit-norm queries."""
        if image.shape != text.shape or image.ndim != 2:
            raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} must both be [B, D]")
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        pair = torch.cat([self.image_proj(image), self.text_proj(text)], dim=-1)
        lam = self.mix(pair)
        return F.normalize(self.output(self.combine(pair)) + lam * text + (1 - lam) * image, dim=-1)


def build_combiner(
    kind: str, dim: int, proj_dim: int = 256, hidden_dim: int = 512, dropout: float = 0.1
) -> SumCombiner | LearnedCombiner:
    """``"sum"`` -> :class:`SumCombiner`, ``"learned"`` -> :class:`LearnedCombiner` ``(dim, proj_dim, ...)``."""
    if kind == "sum":
        return SumCombiner(dim)
    if kind == "learned":
        return LearnedCombiner(dim, proj_dim, hidden_dim, dropout)
    raise ValueError(f"unknown combiner {kind!r}; choose from {list(COMBINERS)}")
