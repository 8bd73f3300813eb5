"""MaskInversion as an explainer of region masks: the final maps of the optimised tokens.

Unlike the text-driven explainers it explains a *mask*, not a target embedding: ``maps(backbone, image [1, 3, S, S],
masks [N, S, S]) -> [N, S, S]``. The localization evaluation (:class:`~regionembed.modules.LocalizationModule`)
scores these maps next to the explainers', as an upper reference (they are fitted to the masks they explain).
"""

from __future__ import annotations

import torch

from ..backbones.base import Backbone
from ..regions import MaskInversionEmbedding

__all__ = ["MaskInversionMaps"]


class MaskInversionMaps(MaskInversionEmbedding):
    """MaskInversion's final explainability maps of each region's optimised token (the solver's ``maps``).

    ``maps(backbone, image [1, 3, S, S], masks [N, S, S]) -> [N, S, S]``; ``name`` is ``"mask_inversion"``.

    Args: those of :class:`~regionembed.regions.MaskInversionEmbedding`: ``solver`` (a
        :class:`~regionembed.inversion.MaskInversion`, default the official settings) and ``name``.
    """

    def __call__(self, backbone: Backbone, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.solver(backbone, image, masks).maps
