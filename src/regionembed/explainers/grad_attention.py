"""Multi-modal gradient attention: where on the reference image does a composed query-target score come from?

A reconstruction of the visual attention of MMGrad ("Learning with Multi-modal Gradient Attention for Explainable
Composed Image Retrieval", Udhayanan et al., 2023), whose full text we do not have. What the abstract states: the
map comes from gradients, is conditioned on the modifier text, and a training loss pulls it onto the modified
region. The choices below are ours:

* the score is the cosine between a *query* built from the reference image's embedding (``query_fn``, e.g. the
  composition with the modifier's text embedding) and a *target* embedding (the target image's, or for the
  "both" variant the target composed with the same modifier); the text enters only through the score;
* the map is the gradient of that score with respect to one block of the reference image tower, pooled either as
  LeGrad (w.r.t. the post-softmax attention probabilities: ReLU, mean over heads and query rows, prefix columns
  dropped) or as Grad-CAM (w.r.t. the block's output tokens: channel weights = the gradient's mean over patch
  tokens, ReLU of the weighted sum), upsampled by the patch size and min-max normalised per map;
* the score uses the model's own embedding (its pooling and projection), not LeGrad's per-layer head, so the map
  explains exactly the retrieval score that is trained.

With ``create_graph=True`` the map stays on the autograd graph with respect to the model's parameters, the
modifier's embedding and the target: an attention loss on it trains the model through a second-order backward.
Grad-CAM pooling needs a block before the last for [CLS]-pooled models (open_clip): the last block's patch tokens
never reach the embedding, so their gradient, and the map, are zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from ..backbones.attention import AttentionRecorder
from ..backbones.base import Backbone, TokenGridBackbone, require
from ..grad_mode import require_grad_mode
from .base import Explainer, min_max, relevance_to_map

__all__ = ["GradAttention", "Pooling", "grad_attention_maps"]

Pooling = Literal["legrad", "gradcam"]


def grad_attention_maps(
    backbone: Backbone,
    image: torch.Tensor,
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    layer: int = -1,
    pooling: Pooling = "legrad",
    create_graph: bool = False,
    eps: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of ``image`` and the gradient map of ``score_fn`` of its embedding.

    The image embedding is returned too, on the graph, so a training step can reuse this forward for its
    retrieval loss instead of encoding the reference image twice.

    Args:
        backbone: the model.
        image: ``[B, 3, H, W]`` normalised images.
        score_fn: ``[B, D]`` image embeddings (un-normalised, as ``backbone.encode_image``) -> ``[B]`` scores; each
            score must depend on its own image only (the maps are gradients of the batch sum).
        layer: the block whose attention (``legrad``) or output tokens (``gradcam``) the gradient is taken of.
        pooling: ``"legrad"`` or ``"gradcam"``, see the module docstring.
        create_graph: keep the maps on the autograd graph (needed to train with an attention loss).
        eps: floor of the min-max range (a constant map becomes zeros).

    Returns:
        ``(maps [B, H, W] in [0, 1], embeddings [B, D])``.
    """
    require(backbone, TokenGridBackbone, "Gradient attention")
    require_grad_mode("gradient attention")
    if pooling not in ("legrad", "gradcam"):
        raise ValueError(f"unknown pooling {pooling!r}; choose 'legrad' or 'gradcam'")
    (index,) = backbone.layer_indices([layer])
    grid = backbone.grid_size(tuple(image.shape[-2:]))
    prefix = backbone.num_prefix_tokens
    # The map's own backward (create_graph) runs through the backward of every block from `index` on and of the
    # pooling head: they need explicit attention (the recorder's, ``explicit_attention``), fused kernels have no
    # double backward.
    tail = list(range(index if pooling == "legrad" else index + 1, len(backbone.blocks)))
    recorded = tail if create_graph else ([index] if pooling == "legrad" else [])
    with torch.enable_grad(), AttentionRecorder(backbone.blocks, recorded) as rec:
        if pooling == "legrad":
            tokens = backbone.forward_blocks(backbone.embed_tokens(image))
            features = backbone.pool_tokens(tokens, explicit_attention=create_graph)  # an attention pool, too
            wrt = rec.records[index].probs
        else:
            tokens = backbone.forward_blocks(backbone.embed_tokens(image), stop=index + 1)
            if not tokens.requires_grad:  # frozen model, plain image: differentiate w.r.t. the activations only
                tokens = tokens.detach().requires_grad_(True)
            wrt = tokens
            for blk in list(backbone.blocks)[index + 1 :]:
                tokens = blk(tokens)
            features = backbone.pool_tokens(tokens, explicit_attention=create_graph)
    with torch.enable_grad():
        scores = score_fn(features)
        if scores.shape != (image.shape[0],):
            raise ValueError(f"score_fn must return [B] = [{image.shape[0]}] scores, got {tuple(scores.shape)}")
        # retain_graph: the caller may back-propagate through `features` (the retrieval loss) afterwards
        (grad,) = torch.autograd.grad(scores.sum(), wrt, create_graph=create_graph, retain_graph=True)
        if pooling == "legrad":
            relevance = grad.clamp_min(0).mean(dim=(1, 2))[:, prefix:]  # [B, h*w]
        else:
            weights = grad[:, prefix:].mean(dim=1, keepdim=True)  # [B, 1, C]
            relevance = (weights * wrt[:, prefix:]).sum(-1).clamp_min(0)  # [B, h*w]
        maps = min_max(relevance_to_map(relevance, grid, backbone.patch_size), eps)
    if not create_graph:
        maps = maps.detach()
    return maps, features


class GradAttention(Explainer):
    """Gradient attention of a (composed) query-target cosine on the query image; differentiable.

    ``explainer(backbone, image, targets)`` explains ``cos(f(image), target)`` (a plain image-text or image-image
    score); with ``query_fn`` it explains ``cos(query_fn(f(image)), target)``, e.g. a composed query::

        text = backbone.encode_text(backbone.tokenize(modifiers))
        maps = GradAttention()(backbone, reference, target_embeddings, query_fn=lambda f: combiner(f, text))

    Args:
        layer: the block to take the gradient at (negative allowed; default the last).
        pooling: ``"legrad"`` (attention probabilities) or ``"gradcam"`` (block output tokens).
        eps: floor of the min-max range.
    """

    differentiable = True

    def __init__(self, layer: int = -1, pooling: Pooling = "legrad", eps: float = 1e-12) -> None:
        if pooling not in ("legrad", "gradcam"):
            raise ValueError(f"unknown pooling {pooling!r}; choose 'legrad' or 'gradcam'")
        self.layer, self.pooling, self.eps = int(layer), pooling, float(eps)

    def explain(
        self,
        backbone: Backbone,
        image: torch.Tensor,
        targets: torch.Tensor,
        query_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        create_graph: bool | None = None,
    ) -> torch.Tensor:
        """Args:
        query_fn: ``[B, D]`` image embeddings -> ``[B, D]`` queries (e.g. composed with a modifier text); the
            identity when ``None``.
        create_graph: keep the maps on the autograd graph; default: when grad mode is on and the targets, the
            image or the model's parameters require grad.
        """
        if create_graph is None:
            trainable = any(p.requires_grad for p in backbone.parameters())
            create_graph = torch.is_grad_enabled() and (targets.requires_grad or image.requires_grad or trainable)
        target = F.normalize(targets, dim=-1)

        def score(features: torch.Tensor) -> torch.Tensor:
            query = query_fn(features) if query_fn is not None else features
            return (F.normalize(query, dim=-1) * target).sum(-1)

        maps, _ = grad_attention_maps(backbone, image, score, self.layer, self.pooling, create_graph, self.eps)
        return maps
