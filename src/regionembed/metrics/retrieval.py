"""Retrieval: Recall@K with one correct gallery item per query."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from .functional import _check_top_k, _recall_compute, _recall_update

__all__ = ["RecallAtK"]


class RecallAtK(Metric):
    """Recall@K: the fraction of queries whose correct gallery item ranks among the first ``k``.

    Each update brings its own gallery (``scores [Q, G]``), typically all queries of a batch against the full
    gallery. States are integer hit counts summed across processes. Ties count against the query (see
    :func:`regionembed.metrics.functional.retrieval_ranks`).

    Args:
        k: the cut-offs.
        **kwargs: ``torchmetrics.Metric`` options.

    Example:
        >>> metric = RecallAtK(k=(1, 2))
        >>> metric.update(torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]]), torch.tensor([0, 1]))
        >>> {k: float(v) for k, v in metric.compute().items()}
        {'R@1': 0.5, 'R@2': 1.0}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    hits: torch.Tensor
    total: torch.Tensor

    def __init__(self, k: Sequence[int] = (1, 5, 10, 50), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.k = _check_top_k(k)
        self.add_state("hits", torch.zeros(len(self.k), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None = None) -> None:
        """Add a batch of queries.

        Args:
            scores: ``[Q, G]`` query-gallery similarities (higher is better).
            target: ``[Q]`` index of the correct gallery item.
            exclude: ``[Q]`` gallery index to ignore per query (e.g. the reference image in composed retrieval),
                ``-1`` for none.
        """
        hits, total = _recall_update(scores, target, exclude, self.k)
        self.hits += hits
        self.total += total

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"R@{k}": ...}`` fractions in [0, 1], not percent (NaN before any update)."""
        return _recall_compute(self.hits, self.total, self.k)
