"""Faithfulness of saliency maps: the mean deletion / insertion AUC (Petsiuk et al., RISE, 2018) and its
contrastive variant ("why A and not B").

The curves come from :func:`regionembed.metrics.functional.deletion_insertion_curves` (it runs the model); this
module only accumulates them.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from .functional import _cat_state, _check_finite, _mean, _shape, auc

__all__ = ["ContrastiveDeletionGap", "DeletionInsertionAUC"]


class DeletionInsertionAUC(Metric):
    """Mean over samples of the area under deletion or insertion curves.

    Use one instance per curve kind (deletion: lower is better; insertion: higher is better). Per-sample AUCs are
    kept as a ``"cat"`` state, so the distributed mean is over exactly the samples seen, in rank order.

    Args:
        **kwargs: ``torchmetrics.Metric`` options.

    Example:
        >>> metric = DeletionInsertionAUC()
        >>> metric.update(torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]]))  # curves [B, S + 1]
        >>> float(metric.compute())
        0.75
    """

    is_differentiable = False
    higher_is_better = None  # depends on the curve: deletion lower, insertion higher
    full_state_update = False

    values: list[torch.Tensor] | torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("values", [], dist_reduce_fx="cat")

    def update(self, values: torch.Tensor) -> None:
        """Add a batch of samples.

        Args:
            values: curves ``[B, S + 1]`` (their :func:`~regionembed.metrics.functional.auc` is taken) or
                per-sample values ``[B]`` (precomputed AUCs, or
                :func:`~regionembed.metrics.functional.contrastive_deletion_gap` gaps).
        """
        if values.ndim == 2:
            values = auc(values)
        elif values.ndim == 1:
            _check_finite("values", values)
        else:
            raise ValueError(f"values must be curves [B, S + 1] or per-sample values [B], got {tuple(values.shape)}")
        # the metric dtype: torchmetrics pads a rank without samples with an empty tensor of that dtype
        self.values.append(values.to(self.dtype))

    def compute(self) -> torch.Tensor:
        """Scalar mean of the per-sample values (NaN before any update)."""
        return _mean(_cat_state(self.values))


class ContrastiveDeletionGap(Metric):
    """Mean contrastive deletion gap: does the map ``A - B`` delete class A's score faster than class B's?

    For each sample, both curves come from :func:`~regionembed.metrics.functional.deletion_insertion_curves`
    (``mode="deletion"``) run on the *same* contrastive map ``map_A - map_B``, one scoring class A (the target) and
    one class B (the contrast). A curve's mean drop is ``curve[:, 0] - auc(curve)``; the gap is
    ``drop_A - drop_B`` (:func:`~regionembed.metrics.functional.contrastive_deletion_gap`). Positive: the pixels
    the map attributes to A rather than B matter more to A than to B. Higher is better; score units.

    The per-sample drops are ``"cat"`` states, so the distributed result is the mean over exactly the samples seen.

    Args:
        **kwargs: ``torchmetrics.Metric`` options.

    Example:
        >>> metric = ContrastiveDeletionGap()
        >>> metric.update(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0]]))
        >>> {k: float(v) for k, v in metric.compute().items()}
        {'contrastive_gap': 0.75, 'target_drop': 0.75, 'contrast_drop': 0.0}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    target_drops: list[torch.Tensor] | torch.Tensor
    contrast_drops: list[torch.Tensor] | torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("target_drops", [], dist_reduce_fx="cat")
        self.add_state("contrast_drops", [], dist_reduce_fx="cat")

    def update(self, curve_a: torch.Tensor, curve_b: torch.Tensor) -> None:
        """Add a batch of samples.

        Args:
            curve_a: ``[B, S + 1]`` deletion curves of the target class A along ``map_A - map_B``.
            curve_b: ``[B, S + 1]`` deletion curves of the contrast class B along the same maps.
        """
        if curve_a.shape != curve_b.shape:
            raise ValueError(f"curve_a {_shape(curve_a)} and curve_b {_shape(curve_b)} differ in shape")
        area_a, area_b = auc(curve_a), auc(curve_b)  # validates [B, S + 1] and finiteness
        drop_a, drop_b = curve_a[:, 0] - area_a, curve_b[:, 0] - area_b
        # the metric dtype: torchmetrics pads a rank without samples with an empty tensor of that dtype
        self.target_drops.append(drop_a.to(self.dtype))
        self.contrast_drops.append(drop_b.to(self.dtype))

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"contrastive_gap", "target_drop", "contrast_drop"}``: means over samples (NaN before any update)."""
        drop_a, drop_b = _cat_state(self.target_drops), _cat_state(self.contrast_drops)
        return {
            "contrastive_gap": _mean(drop_a.double() - drop_b.double()),
            "target_drop": _mean(drop_a),
            "contrast_drop": _mean(drop_b),
        }
