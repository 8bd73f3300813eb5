"""Prompt embeddings shared by the modules (template averaging as in CLIP's zero-shot classification)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .backbones.base import Backbone

__all__ = ["DEFAULT_TEMPLATES", "TextEmbeddingCache", "encode_prompts"]

DEFAULT_TEMPLATES = ("a photo of a {}.",)

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_prompts(
    backbone: Backbone, prompts: Sequence[str], templates: Sequence[str] = ("{}",), device: torch.device | None = None
) -> torch.Tensor:
    """Normalised text embeddings ``[P, D]``: each prompt filled into every template, averaged, re-normalised."""
    if not prompts:
        raise ValueError("no prompts to encode")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every template needs a '{{}}' placeholder, got {list(templates)}")
    texts = [t.format(p) for p in prompts for t in templates]
    for text, n, context in backbone.overlong_texts(texts):
        # CLIP tokenizers truncate silently; the end of a long prompt would be ignored without anyone knowing
        log.warning("prompt %r has %d tokens, more than the text context of %d: it is truncated", text, n, context)
    rows = []
    for prompt in prompts:
        tokens = backbone.tokenize([t.format(prompt) for t in templates])
        if device is not None:
            tokens = tokens.to(device)
        rows.append(F.normalize(backbone.encode_text(tokens, normalize=True).mean(0), dim=-1))
    return torch.stack(rows)


class TextEmbeddingCache:
    """Prompt embeddings of a frozen text tower, computed once per distinct prompt and kept.

    Each prompt is encoded on its own (:func:`encode_prompts` with this cache's templates), so an embedding never
    depends on which other prompts were new in the same call (batched matmuls round differently): a resumed
    training run gets the same embeddings as a straight one. Embeddings are returned on the requested device.
    The cache must only serve one backbone whose text tower does not change (call :meth:`clear` otherwise).

    Args:
        templates: prompt templates averaged per prompt (each with a ``{}`` placeholder).
        max_size: forget everything when more prompts than this would be kept (bounded memory on open-vocabulary
            data such as referring expressions).

    Example:
        >>> cache = TextEmbeddingCache(templates=["a photo of a {}."])
        >>> text = cache(backbone, ["cat", "dog"])  # [2, D], normalised  # doctest: +SKIP
    """

    def __init__(self, templates: Sequence[str] = ("{}",), max_size: int = 200_000) -> None:
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"every template needs a '{{}}' placeholder, got {list(templates)}")
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.templates = tuple(templates)
        self.max_size = int(max_size)
        self._embeddings: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._embeddings)

    def clear(self) -> None:
        """Forget every embedding (e.g. after the text tower changed)."""
        self._embeddings.clear()

    def __call__(
        self, backbone: Backbone, prompts: Sequence[str], device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Normalised embeddings ``[P, D]`` of ``prompts`` (template-averaged), on ``device``.

        Args:
            backbone: the model whose text tower encodes the prompts.
            prompts: ``P`` prompts (repeats allowed).
            device: where the prompts are encoded and the result lives (default: the backbone's device).
        """
        if not prompts:
            raise ValueError("no prompts to encode")
        if device is None:
            device = next(backbone.parameters()).device
        todo = sorted({p for p in prompts if p not in self._embeddings})
        if len(self._embeddings) + len(todo) > self.max_size:
            self._embeddings.clear()
        for prompt in todo:
            self._embeddings[prompt] = encode_prompts(backbone, [prompt], self.templates, device=device)[0]
        return torch.stack([self._embeddings[p].to(device) for p in prompts])
