"""The explainer interface shared by every explainability method in regionembed.

An explainer maps ``(backbone, image [B, 3, H, W], targets [B, D]) -> maps [B, H, W]``: for each image, where does
the model see the target embedding (a text embedding, a class prompt, a MaskInversion token)? Maps are min-max
normalised to [0, 1] per map. ``differentiable`` says whether the maps stay on the autograd graph (needed to use the
explainer inside MaskInversion or as a training loss). :meth:`Explainer.explain_with_presence` also returns
whether each target was found (``[B]`` bool; only VL-Score ever answers "not present").
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F

from ..backbones.base import Backbone

__all__ = ["Explainer", "min_max", "relevance_to_map"]


def min_max(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min-max normalise each map of ``[B, ...]`` to [0, 1]; a constant map becomes all zeros, never NaN."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(maps)


def relevance_to_map(relevance: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Patch relevance ``[B, h*w]`` -> ``[B, h*p, w*p]`` by bilinear upsampling with the patch size as the factor."""
    b = relevance.shape[0]
    grid_map = relevance.reshape(b, 1, *grid)
    return F.interpolate(grid_map, scale_factor=patch_size, mode="bilinear")[:, 0]


class Explainer(abc.ABC):
    """Base class: validates inputs, broadcasts one image over several targets, and defers to :meth:`explain`."""

    #: whether maps stay on the autograd graph (w.r.t. the targets, and the model/image when they require grad)
    differentiable: bool = False

    def __call__(self, backbone: Backbone, image: torch.Tensor, targets: torch.Tensor, **kwargs) -> torch.Tensor:
        """Explain ``targets`` ``[B, D]`` on ``image`` ``[B or 1, 3, H, W]``; returns maps ``[B, H, W]`` in [0, 1]."""
        return self.explain(backbone, self._validate(backbone, image, targets), targets, **kwargs)

    def explain_with_presence(
        self, backbone: Backbone, image: torch.Tensor, targets: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like calling the explainer, also saying whether each target was found: ``(maps [B, H, W], present [B])``.

        ``present[b]`` False means the explainer decided the target is not in the image (its map is then all
        zeros); explainers that never decide (all but :class:`~regionembed.explainers.VLScore`) return all True.
        """
        return self.explain_presence(backbone, self._validate(backbone, image, targets), targets, **kwargs)

    def explain_presence(
        self, backbone: Backbone, image: torch.Tensor, targets: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps and presence ``[B]`` bool for validated inputs (the hook of explainers that decide presence)."""
        maps = self.explain(backbone, image, targets, **kwargs)
        return maps, torch.ones(maps.shape[0], dtype=torch.bool, device=maps.device)

    def _validate(self, backbone: Backbone, image: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Check the inputs; returns ``image`` broadcast to one row per target."""
        backbone.check_image(image)
        if targets.ndim != 2 or targets.shape[1] != backbone.embed_dim:
            raise ValueError(
                f"targets must have shape [B, {backbone.embed_dim}] for this backbone, got {tuple(targets.shape)}"
            )
        if not torch.isfinite(targets).all():
            raise ValueError("targets contain NaN or infinite values")
        if image.shape[0] == 1 and targets.shape[0] > 1:
            image = image.expand(targets.shape[0], -1, -1, -1)
        if image.shape[0] != targets.shape[0]:
            raise ValueError(f"{image.shape[0]} images but {targets.shape[0]} targets")
        return image

    @abc.abstractmethod
    def explain(self, backbone: Backbone, image: torch.Tensor, targets: torch.Tensor, **kwargs) -> torch.Tensor:
        """Compute maps ``[B, H, W]`` for validated inputs of equal batch size."""

    def __repr__(self) -> str:
        # the settings, not an address: reprs name explainers in error messages and MaskInversion's repr
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"
