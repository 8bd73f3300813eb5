"""Attention rollout (Abnar & Zuidema, 2020) for ViT backbones: gradient-free and *not* target-conditioned."""

from __future__ import annotations

import torch

from ..backbones.attention import AttentionRecorder
from ..backbones.base import Backbone, TokenGridBackbone, require, uses_attention_pool
from .base import Explainer, min_max, relevance_to_map

__all__ = ["AttentionRollout"]


class AttentionRollout(Explainer):
    """Attention rollout: how much the [CLS] token attends to each patch through the blocks.

    For each block (from the first, up to the last of ``layers``'s range) the post-softmax attention is averaged over
    heads, mixed with the identity for the residual path, ``A' = (1 - r) A + r I``, and re-normalised by rows;
    the product ``A'_L ... A'_1`` is taken and its [CLS] row, restricted to the patch columns, is the map (bilinearly
    upsampled by the patch size, min-max normalised).

    The target is **ignored** (rollout explains the image embedding, not a text): every target gives the same map
    for an image. It is here as the classic class-agnostic reference; it needs a ViT (the attention recorder reads the
    probabilities, :class:`~regionembed.backbones.AttentionRecorder`).

    On a model whose embedding comes from an attention-pool head (:func:`~regionembed.backbones.uses_attention_pool`:
    SigLIP, PE-Core, CoCa, HF SigLIP) the [CLS] row is not what the embedding reads: the pool's attention as the model
    pools (:meth:`~regionembed.backbones.AttentionPoolHead.attention_pool_embed`, over the last block's tokens, mean
    over heads and queries) is the last step of the product, ``P_pool A'_L ... A'_1``, and its row is the map.

    Args:
        start_layer: first block included (0: all blocks; some works skip the first few).
        residual: weight ``r`` of the identity (0.5 as in the paper).
        eps: floor of the min-max range.
    """

    differentiable = False

    def __init__(self, start_layer: int = 0, residual: float = 0.5, eps: float = 1e-12) -> None:
        if not 0.0 <= residual <= 1.0:
            raise ValueError(f"residual must be in [0, 1], got {residual}")
        self.start_layer = int(start_layer)
        self.residual = float(residual)
        self.eps = float(eps)

    @torch.no_grad()
    def explain(self, backbone: Backbone, image: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        require(backbone, TokenGridBackbone, "Attention rollout", alternative="GradCAM, ScoreCAM or VLScore")
        n = len(backbone.blocks)
        start = backbone.layer_indices([self.start_layer])[0]
        layers = list(range(start, n))
        # the target is ignored: compute the rollout once per distinct image (a broadcast image counts once)
        shared = image.shape[0] > 1 and image.stride(0) == 0
        images = image[:1] if shared else image
        with AttentionRecorder(backbone.blocks, layers, leaf_probs=False) as rec:
            tokens = backbone.forward_blocks(backbone.embed_tokens(images))
        rollout = None
        for layer in layers:
            probs = rec.records[layer].probs.mean(dim=1)  # [G, T, T], heads fused by the mean
            eye = torch.eye(probs.shape[-1], dtype=probs.dtype, device=probs.device)
            mixed = (1 - self.residual) * probs + self.residual * eye
            mixed = mixed / mixed.sum(dim=-1, keepdim=True)
            rollout = mixed if rollout is None else mixed @ rollout
        if uses_attention_pool(backbone):
            relevance = _pool_row(backbone, tokens, rollout)
        else:
            relevance = rollout[:, 0, backbone.num_prefix_tokens :]  # [G, h*w]: the [CLS] row, patch columns
        grid = backbone.grid_size(tuple(image.shape[-2:]))
        maps = min_max(relevance_to_map(relevance, grid, backbone.patch_size), self.eps)
        return maps.expand(image.shape[0], -1, -1).contiguous() if shared else maps

    def __repr__(self) -> str:
        return f"AttentionRollout(start_layer={self.start_layer}, residual={self.residual})"


def _pool_row(backbone: Backbone, tokens: torch.Tensor, rollout: torch.Tensor) -> torch.Tensor:
    """The attention-pool head's row of the rollout: its attention over the tokens it reads ``[G, T']`` (mean over
    heads and queries; no residual, the pool has none around its attention) times those tokens' rows of the rollout
    ``[G, T, T]``; the patch columns (the last ``h*w``) ``[G, h*w]``."""
    _, probs = backbone.attention_pool_embed(tokens)  # [G, H, Q, T']: T' = T, or the patch tokens only
    row = probs.mean(dim=(1, 2)).unsqueeze(1)  # [G, 1, T']
    patches = tokens.shape[1] - backbone.num_prefix_tokens
    return (row @ rollout[:, -row.shape[-1] :])[:, 0, -patches:]
