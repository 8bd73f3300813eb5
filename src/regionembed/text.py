"""Prompt embeddings shared by the modules (template averaging as in CLIP's zero-shot classification)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .backbones.base import Backbone

__all__ = ["DEFAULT_TEMPLATES", "encode_prompts"]

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
