"""Region classification accuracy (top-k per instance and mean per class)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from .functional import _check_top_k, _region_accuracy_compute, _region_accuracy_update

__all__ = ["IterationCurve", "RegionAccuracy"]


class RegionAccuracy(Metric):
    """Top-k accuracy of region classification, per instance and averaged over the classes present.

    States are per-class integer counts summed across processes, so a distributed result equals the
    single-process one exactly. See :func:`regionembed.metrics.functional.region_accuracy` for tie handling.

    Args:
        num_classes: number of classes ``C``.
        top_k: the ``k`` values (each clipped to ``C``; the keys keep the requested ``k``).
        **kwargs: ``torchmetrics.Metric`` options (``sync_on_compute``, ``process_group``, ...).

    Example:
        >>> metric = RegionAccuracy(num_classes=3, top_k=(1, 2))
        >>> metric.update(torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]), torch.tensor([0, 1]))
        >>> {k: round(float(v), 2) for k, v in metric.compute().items()}
        {'top1': 0.5, 'top2': 1.0, 'mean_class_top1': 0.5, 'mean_class_top2': 1.0}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: torch.Tensor
    count: torch.Tensor

    def __init__(self, num_classes: int, top_k: Sequence[int] = (1, 5), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.top_k = _check_top_k(top_k)
        self.add_state("correct", torch.zeros(num_classes, len(self.top_k), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of region instances.

        Args:
            logits: ``[N, C]`` class scores.
            target: ``[N]`` integer class indices in ``[0, C)``.
        """
        correct, count = _region_accuracy_update(logits, target, self.num_classes, self.top_k)
        self.correct += correct
        self.count += count

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"top{k}", "mean_class_top{k}"}`` scalar fractions in [0, 1] (NaN before any update)."""
        return _region_accuracy_compute(self.correct, self.count, self.top_k)


class IterationCurve(Metric):
    """Top-1 region accuracy and mean Dice loss at every iteration of an optimisation (e.g. MaskInversion).

    ``update(logits [T, N, C], labels [N], dice [T, N])``; ``compute()`` returns ``{"top1": [T], "dice": [T]}``.
    States are sums reduced across processes, so the curves over several ranks equal those of one.

    Args:
        steps: ``T``, the number of recorded iterations (``iterations + 1`` for MaskInversion).
    """

    full_state_update = False

    def __init__(self, steps: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = int(steps)
        self.add_state("correct", torch.zeros(self.steps, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("dice", torch.zeros(self.steps, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor, dice: torch.Tensor) -> None:
        if logits.ndim != 3 or logits.shape[0] != self.steps or logits.shape[1] != labels.shape[0]:
            raise ValueError(f"logits must be [{self.steps}, N, C] for {labels.shape[0]} labels, got {logits.shape}")
        if dice.shape != logits.shape[:2]:
            raise ValueError(f"dice must be {list(logits.shape[:2])}, got {list(dice.shape)}")
        self.correct += (logits.argmax(-1) == labels[None]).sum(1).double()
        self.dice += dice.sum(1).double()
        self.total += labels.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.total.clamp_min(1)
        return {"top1": self.correct / total, "dice": self.dice / total}
