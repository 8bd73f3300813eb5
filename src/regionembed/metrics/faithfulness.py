"""Faithfulness of saliency maps: the mean deletion / insertion AUC (Petsiuk et al., RISE, 2018).

The curves come from :func:`regionembed.metrics.functional.deletion_insertion_curves` (it runs the model); this
module only accumulates them.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from .functional import _cat_state, _check_finite, _mean, auc

__all__ = ["DeletionInsertionAUC"]


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
