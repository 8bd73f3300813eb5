"""LeGrad (Bousselham et al., 2024): gradients of a per-layer score with respect to attention probabilities.

Two recipes, as the official implementation has them:

* a [CLS]- or mean-pooled ViT: for each explained block ``l``, the score ``<e, normalize(head(mean tokens of
  block l))>`` is differentiated with respect to block ``l``'s own self-attention probabilities;
* a model with an attention-pool head (:class:`~regionembed.backbones.base.AttentionPoolHead`: CoCa, SigLIP's "map",
  PE), the official recipes for SigLIP and CoCa: for each explained block ``l``, the *pool* is applied to block
  ``l``'s output tokens and the score is differentiated with respect to the **pool's** attention probabilities
  ``[B, H, Q, T]``; ReLU, mean over heads and queries, the last ``h*w`` (patch) columns summed over layers.
  SigLIP (``compute_legrad_siglip``): ``s = <e, normalize(head(tokens_l))>`` (the pool with its norm and
  projection), min-max normalised on the token grid, then upsampled bilinearly by the patch size. CoCa
  (``compute_legrad_coca``, chosen by the backbone's ``legrad_recipe``): the raw ``s = <e, pool(tokens_l)[:, 0] @
  proj>`` (no ``ln_post``, no normalisation; only the first query's row has a gradient), upsampled, then min-max
  normalised. The official SigLIP code's optional "empty text" correction (``apply_correction``) is not applied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..backbones.attention import AttentionRecorder
from ..backbones.base import Backbone, TokenGridBackbone, require, uses_attention_pool
from ..grad_mode import require_grad_mode
from .base import Explainer, min_max, relevance_to_map

__all__ = ["LeGrad", "attention_pool_features", "attention_pool_map", "legrad_layer_features", "record_layers"]


def record_layers(backbone: Backbone, image: torch.Tensor, layers: Sequence[int]) -> AttentionRecorder:
    """Run ``image`` through the blocks up to the last of ``layers`` with attention recorded (grad enabled).

    Returns the (already exited) recorder holding the records of ``layers``.
    """
    require(backbone, TokenGridBackbone, "LeGrad", alternative="GradCAM, ScoreCAM or VLScore")
    require_grad_mode("LeGrad")
    with torch.enable_grad(), AttentionRecorder(backbone.blocks, layers) as rec:
        backbone.forward_blocks(backbone.embed_tokens(image), stop=max(rec.layers) + 1)
    return rec


def legrad_layer_features(
    backbone: Backbone, block_out: torch.Tensor, pooling: str = "mean", explicit_attention: bool = False
) -> torch.Tensor:
    """LeGrad's per-layer image feature, ``[B, T, C] -> [B, D]``.

    ``pooling="mean"``: ``normalize(head(mean over all tokens))``, as the official LeGrad. ``"model"``: the model's
    own pooling and projection (``backbone.pool_tokens``: the [CLS] token for CLIP ViTs, the patch mean for
    average-pooled ones, the attention pool of CoCa/SigLIP/PE), so the score follows the route the model classifies
    through; ``explicit_attention`` makes an attention pool twice differentiable (maps taken with ``create_graph``).
    """
    if pooling == "model":
        return F.normalize(backbone.pool_tokens(block_out, explicit_attention=explicit_attention), dim=-1)
    return F.normalize(backbone.legrad_head(block_out.mean(dim=1)), dim=-1)


class LeGrad(Explainer):
    """LeGrad, as the official implementation computes it.

    For each chosen block ``l``: ``s = <e, normalize(head(mean_tokens(block_l output)))>``; the gradient of ``s`` with
    respect to block ``l``'s post-softmax attention ``[B, H, T, T]``; ReLU; mean over heads and query rows; drop the
    prefix ([CLS]) key columns; reshape to the patch grid; bilinear upsampling by the patch size. Maps of all layers
    are summed and min-max normalised per map. On a backbone with an attention-pool head (``pooling="mean"``) the
    score goes through the pool and the gradient is taken with respect to the pool's attention (the official
    SigLIP or CoCa recipe, see the module docstring).

    Args:
        layers: block indices to explain (negative allowed); the official default for MaskInversion is the last.
        eps: floor of the min-max range (a constant map becomes zeros instead of NaN).
        pooling: ``"mean"`` (official: the mean of all tokens through the head) or ``"model"`` (the model's own
            pooling and projection, see :func:`legrad_layer_features`). On a [CLS]-pooled CLIP the mean-token route
            can carry little class information (issue 13); ``"model"`` scores through the route the model uses.
            Only ``"mean"`` has MaskInversion's fast decomposed strategies; ``"model"`` runs the autograd path.
    """

    differentiable = True

    def __init__(self, layers: Sequence[int] = (-1,), eps: float = 1e-12, pooling: str = "mean") -> None:
        if not layers:
            raise ValueError("LeGrad needs at least one layer")
        if pooling not in ("mean", "model"):
            raise ValueError(f"pooling must be 'mean' or 'model', got {pooling!r}")
        self.layers = tuple(int(layer) for layer in layers)
        self.eps = float(eps)
        self.pooling = pooling

    def explain(
        self,
        backbone: Backbone,
        image: torch.Tensor,
        targets: torch.Tensor,
        create_graph: bool | None = None,
        recorder: AttentionRecorder | None = None,
    ) -> torch.Tensor:
        """Args:
        create_graph: keep the maps on the autograd graph; default: when ``targets`` or ``image`` require grad
            and grad mode is on.
        recorder: reuse a recorded forward (``record_layers``) of ``image``, e.g. across optimisation steps.
        """
        require(backbone, TokenGridBackbone, "LeGrad", alternative="GradCAM, ScoreCAM or VLScore")
        if create_graph is None:
            create_graph = torch.is_grad_enabled() and (targets.requires_grad or image.requires_grad)
        rec = recorder if recorder is not None else record_layers(backbone, image, self.layers)
        grid = backbone.grid_size(tuple(image.shape[-2:]))
        layers = backbone.layer_indices(self.layers)
        # an attention-pool head (official SigLIP/CoCa recipe): the gradient goes into the pool's attention over the
        # block's output instead of the block's own attention
        pool = self.pooling == "mean" and uses_attention_pool(backbone)
        patches = grid[0] * grid[1]  # the last h*w columns (a pool may or may not read the prefix tokens)
        total = 0.0
        with torch.enable_grad():
            for i, layer in enumerate(layers):
                record = rec.records[layer]
                if pool:
                    features, probs = attention_pool_features(backbone, record.out)  # probs [B, H, Q, T']
                else:
                    # create_graph differentiates through the pooling head twice: an attention pool runs explicitly
                    features = legrad_layer_features(backbone, record.out, self.pooling, create_graph)
                    probs = record.probs
                score = (targets * features).sum()
                retain = create_graph or recorder is not None or i < len(layers) - 1
                (grad,) = torch.autograd.grad(score, probs, create_graph=create_graph, retain_graph=retain)
                relevance = grad.clamp_min(0).mean(dim=(1, 2))[:, -patches:]
                total = total + (relevance if pool else relevance_to_map(relevance, grid, backbone.patch_size))
        if pool:
            return attention_pool_map(backbone, total, grid, self.eps)
        return min_max(total, self.eps)


def attention_pool_features(backbone: Backbone, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LeGrad's per-layer feature on an attention-pool head and the pool's attention it is differentiated by.

    Args:
        tokens: ``[B, T, C]`` output of a block.

    Returns:
        ``(features [B, D], probs [B, H, Q, T'])``: ``normalize(attention_pool_embed(tokens))`` (official SigLIP
        recipe) or, on a ``legrad_recipe == "coca"`` head, ``legrad_pool_embed(tokens)`` as it is (official
        ``compute_legrad_coca`` scores ``<e, pool(tokens)[:, 0] @ proj>``: no ``ln_post``, no normalisation).
    """
    embedding, probs = backbone.legrad_pool_embed(tokens)
    if backbone.legrad_recipe == "coca":
        return embedding, probs
    return F.normalize(embedding, dim=-1), probs


def attention_pool_map(backbone: Backbone, relevance: torch.Tensor, grid: tuple[int, int], eps: float) -> torch.Tensor:
    """Patch relevance summed over layers ``[B, h*w]`` -> maps ``[B, h*p, w*p]`` in the official recipe's order.

    SigLIP: min-max on the token grid, then bilinear upsampling by the patch size; CoCa: upsampling, then min-max
    (bilinear upsampling is linear, so upsampling the sum equals the official sum of upsampled layer maps).
    """
    grid_map = relevance.reshape(-1, 1, *grid)
    if backbone.legrad_recipe == "coca":
        return min_max(F.interpolate(grid_map, scale_factor=backbone.patch_size, mode="bilinear")[:, 0], eps)
    return F.interpolate(min_max(grid_map, eps), scale_factor=backbone.patch_size, mode="bilinear")[:, 0]
