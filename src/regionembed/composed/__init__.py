"""Composed image retrieval, the plain-torch parts (no Lightning): query combiners and the evaluation gallery.

The loss is :func:`regionembed.losses.composed_info_nce`, the map :func:`regionembed.explainers.grad_attention_maps`,
the metric :class:`regionembed.metrics.RecallAtK`; :class:`regionembed.modules.ComposedRetrievalModule` wires them.
"""

from .combiners import COMBINERS, LearnedCombiner, SumCombiner, build_combiner
from .gallery import build_gallery, gather_rows

__all__ = ["COMBINERS", "LearnedCombiner", "SumCombiner", "build_combiner", "build_gallery", "gather_rows"]
