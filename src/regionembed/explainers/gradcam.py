"""Text-conditioned Grad-CAM (Selvaraju et al., 2017) for CLIP-like ViTs and ResNets.

Also home of :func:`layer_activations`, the one place where the CAM explainers (Grad-CAM, Score-CAM, VL-Score) read a
layer's activations as a feature map ``[B, C, h, w]``: the patch tokens of a ViT block (prefix tokens dropped) or a
stage of a :class:`~regionembed.backbones.base.FeatureMapBackbone` (e.g.
:class:`~regionembed.backbones.resnet.OpenCLIPResNetBackbone`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbones.attention import AttentionRecorder
from ..backbones.base import Backbone, FeatureMapBackbone, TokenGridBackbone, require
from ..grad_mode import require_grad_mode
from .base import Explainer, min_max

__all__ = ["GradCAM", "LayerActivations", "layer_activations", "resolve_layer"]


def resolve_layer(backbone: Backbone, layer: int | str | None) -> int | str:
    """Validate ``layer`` for ``backbone``: a stage name or index for a ResNet, a block index for a ViT.

    ``None`` is the CAM default: ``layer4`` of a ResNet; the *penultimate* block of a ViT, i.e. the input of the last
    block (pytorch-grad-cam's ``blocks[-1].norm1`` recipe). Not the last block: a [CLS]-pooled ViT's output patch
    tokens do not reach the embedding at all, so their gradients (and Grad-CAM maps) are zero.
    """
    if isinstance(backbone, FeatureMapBackbone):
        return backbone.stage_name(-1 if layer is None else layer)
    # a CAM reads feature maps or block tokens: a backbone with neither capability is refused here
    require(backbone, TokenGridBackbone, "Grad-CAM/Score-CAM/VL-Score (without feature maps)")
    if layer is None:
        layer = -2 if len(backbone.blocks) > 1 else -1
    if isinstance(layer, str):
        raise ValueError(f"layer {layer!r}: {type(backbone).__name__} takes a block index (e.g. -1), not a name")
    return backbone.layer_indices([int(layer)])[0]


@dataclass
class LayerActivations:
    """A layer's activations and, optionally, the image embedding computed from them.

    Attributes:
        source: the tensor the rest of the network was run from (ViT: block output tokens ``[B, T, C]``; ResNet:
            the stage's feature map ``[B, C, h, w]``); differentiate with respect to it.
        embedding: ``[B, D]`` image embedding computed from ``source`` (not normalised), or ``None``.
        prefix: number of prefix tokens to drop (ViT), 0 for feature maps.
        grid: ``(h, w)`` of the feature map.
    """

    source: torch.Tensor
    embedding: torch.Tensor | None
    prefix: int
    grid: tuple[int, int]

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like :attr:`source` (the source itself, or its gradient) as ``[B, C, h, w]``."""
        if x.ndim == 4:
            return x
        b, _, c = x.shape
        return x[:, self.prefix :].transpose(1, 2).reshape(b, c, *self.grid)

    @property
    def maps(self) -> torch.Tensor:
        """The activations as a feature map ``[B, C, h, w]``."""
        return self.to_grid(self.source)


def layer_activations(
    backbone: Backbone,
    image: torch.Tensor,
    layer: int | str | None,
    with_embedding: bool = True,
    leaf: bool = True,
    twice_differentiable: bool = False,
) -> LayerActivations:
    """Run ``image`` to ``layer`` (and, with ``with_embedding``, on to the image embedding).

    Args:
        backbone: a ViT backbone (``layer`` = block index, patch tokens of its output) or a convolutional one
            (``layer`` = stage name or index).
        image: ``[B, 3, H, W]`` normalised image.
        layer: see above; ``None`` for the CAM default (:func:`resolve_layer`).
        with_embedding: also compute the embedding from the activations (on the same graph).
        leaf: when grad mode is on and nothing upstream requires grad (frozen model, plain image), make the
            activations an autograd leaf so that gradients with respect to them exist.
        twice_differentiable: make the embedding twice differentiable with respect to the activations (needed when
            gradients are taken with ``create_graph``; attention after ``layer``, the pooling head's included, then
            runs with an explicit softmax: ``pool_tokens``/``pool_features`` with ``explicit_attention``).
    """
    layer = resolve_layer(backbone, layer)
    convolutional = isinstance(backbone, FeatureMapBackbone)
    if convolutional:
        source = backbone.feature_maps(image, layer)
        prefix, grid = 0, tuple(source.shape[-2:])
    else:
        source = backbone.forward_blocks(backbone.embed_tokens(image), stop=layer + 1)
        prefix, grid = backbone.num_prefix_tokens, backbone.grid_size(tuple(image.shape[-2:]))
    if leaf and torch.is_grad_enabled() and not source.requires_grad:
        source.requires_grad_(True)
    embedding = None
    if with_embedding:
        if convolutional:
            embedding = backbone.pool_features(source, layer, explicit_attention=twice_differentiable)
        else:
            blocks = list(backbone.blocks)
            rest = list(range(layer + 1, len(blocks)))
            # Fused attention kernels (SDPA) have no double backward: with ``twice_differentiable`` the blocks after
            # ``layer`` run the recorder's explicit attention (same parameters, same outputs).
            with AttentionRecorder(blocks, rest if twice_differentiable else [], leaf_probs=False):
                x = source
                for blk in blocks[layer + 1 :]:
                    x = blk(x)
            embedding = backbone.pool_tokens(x, explicit_attention=twice_differentiable)
    return LayerActivations(source=source, embedding=embedding, prefix=prefix, grid=grid)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of grid maps ``[B, h, w] -> [B, H, W]``."""
    return F.interpolate(maps.unsqueeze(1), size=tuple(size), mode="bilinear")[:, 0]


class GradCAM(Explainer):
    """Grad-CAM with a text (or any embedding) target.

    The score is ``s = <e, normalize(f(image))>`` for the target ``e`` and the image embedding ``f``. With ``A`` the
    chosen layer's activations ``[C, h, w]`` (a ViT block's output patch tokens, prefix tokens dropped; a ResNet
    stage's feature map), the channel weights are the spatially averaged gradients ``w_c = mean_ij ds/dA_cij``, the
    map is ``ReLU(sum_c w_c A_c)``, bilinearly upsampled to the image size and min-max normalised per map.

    Batched (every item has its own target) and differentiable: with ``create_graph`` the maps stay on the autograd
    graph with respect to the targets (and the image/model when they require grad), so Grad-CAM can drive
    MaskInversion through the solver's generic autograd path. Use ``normalize=False`` there:
    ``MaskInversion(explainer=GradCAM(normalize=False))``. MaskInversion starts from the image's own
    embedding, where the gradient of the cosine ``<e, f/|f|>`` vanishes (``e`` is parallel to ``f``): the first map
    is rounding noise, its huge min-max-amplified gradient fills Adam's second moment and the following steps barely
    move (observed on re-small-vit: the loss stalls after one step; with ``normalize=False`` it keeps falling).

    Args:
        layer: ViT block index or ResNet stage (name or index); ``None`` (default) = the penultimate ViT block (the
            last block's output patch tokens do not reach a [CLS]-pooled embedding: zero gradients) or the last
            stage (``layer4``).
        normalize: score against the normalised image embedding (the cosine, default) or the raw one ``<e, f>``.
        eps: floor of the min-max range (a constant map becomes zeros instead of NaN).
    """

    differentiable = True

    def __init__(self, layer: int | str | None = None, normalize: bool = True, eps: float = 1e-12) -> None:
        self.layer = layer
        self.normalize = bool(normalize)
        self.eps = float(eps)

    def explain(
        self, backbone: Backbone, image: torch.Tensor, targets: torch.Tensor, create_graph: bool | None = None
    ) -> torch.Tensor:
        """Args:
        create_graph: keep the maps on the autograd graph; default: when ``targets`` or ``image`` require grad
            and grad mode is on.
        """
        require_grad_mode("Grad-CAM")
        if create_graph is None:
            create_graph = torch.is_grad_enabled() and (targets.requires_grad or image.requires_grad)
        with torch.enable_grad():
            act = layer_activations(backbone, image, self.layer, twice_differentiable=create_graph)
            embedding = F.normalize(act.embedding, dim=-1) if self.normalize else act.embedding
            score = (targets * embedding).sum()
            (grad,) = torch.autograd.grad(score, act.source, create_graph=create_graph)
            maps = act.maps if create_graph else act.maps.detach()
            weights = act.to_grid(grad).mean(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]
            cam = (weights * maps).sum(dim=1).clamp_min(0)  # [B, h, w]
            return min_max(upsample(cam, tuple(image.shape[-2:])), self.eps)

    def __repr__(self) -> str:
        return f"GradCAM(layer={self.layer!r}, normalize={self.normalize})"
