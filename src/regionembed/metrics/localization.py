"""Localization evaluators: referring-expression comprehension, map-vs-mask agreement and box localization (WSOL).

Predicted boxes are inputs here: turning a map into boxes for ``BoxLocalization`` is done elsewhere. Only
``MaxBoxAccV2`` thresholds maps itself, because the protocol sweeps the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from .functional import (
    _box_localization_compute,
    _box_localization_update,
    _cat_state,
    _check_max_box_acc_args,
    _check_top_k,
    _map_mask_compute,
    _max_box_acc_compute,
    _max_box_acc_update,
    _referring_compute,
    _referring_update,
    map_mask_scores,
)

__all__ = ["BoxLocalization", "MapMaskAgreement", "MaxBoxAccV2", "ReferringAccuracy"]


class ReferringAccuracy(Metric):
    """Referring-expression comprehension accuracy and mean IoU.

    ``update(pred, target)`` takes one of three forms, chosen by the shape of ``pred`` (see
    :func:`regionembed.metrics.functional.referring_accuracy`): boxes ``[N, 4]`` xyxy (hit: ``IoU > iou_threshold``),
    binary masks ``[N, H, W]`` (hit: mask ``IoU > iou_threshold``), or candidate indices ``[N]`` (hit: the chosen
    candidate is the correct one). Hits are summed; the IoUs of box/mask samples are kept as a ``"cat"`` state.

    Args:
        iou_threshold: IoU a box/mask must exceed.
        **kwargs: ``torchmetrics.Metric`` options.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    hits: torch.Tensor
    total: torch.Tensor
    ious: list[torch.Tensor] | torch.Tensor

    def __init__(self, iou_threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.iou_threshold = iou_threshold
        self.add_state("hits", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("ious", [], dist_reduce_fx="cat")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of expressions.

        Args:
            pred: boxes ``[N, 4]``, masks ``[N, H, W]`` or candidate indices ``[N]``.
            target: ground truth of the same shape.
        """
        hits, ious = _referring_update(pred, target, self.iou_threshold)
        self.hits += hits.sum()
        self.total += hits.numel()
        if ious is not None:
            self.ious.append(ious.to(self.dtype))

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"ref_acc", "ref_miou"}``: hit fraction, and mean IoU of box/mask samples (NaN if there are none)."""
        return _referring_compute(self.hits, self.total, _cat_state(self.ious))


class MapMaskAgreement(Metric):
    """Agreement of saliency maps with region masks: IoU, soft Dice, pointing game, energy pointing game.

    See :func:`regionembed.metrics.functional.map_mask_scores` for the per-map definitions (first-argmax tie rule,
    empty-mask conventions). Per-map float scores are ``"cat"`` states, pointing hits are summed counts.

    Args:
        threshold: a pixel is foreground where ``map >= threshold`` (for the IoU).
        **kwargs: ``torchmetrics.Metric`` options.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    iou: list[torch.Tensor] | torch.Tensor
    dice: list[torch.Tensor] | torch.Tensor
    energy: list[torch.Tensor] | torch.Tensor
    hits: torch.Tensor
    total: torch.Tensor

    def __init__(self, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        for name in ("iou", "dice", "energy"):
            self.add_state(name, [], dist_reduce_fx="cat")
        self.add_state("hits", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, maps: torch.Tensor, masks: torch.Tensor, present: torch.Tensor | None = None) -> None:
        """Add a batch of maps.

        Args:
            maps: ``[N, H, W]`` maps in [0, 1].
            masks: ``[N, H, W]`` binary masks (bool or 0/1).
            present: ``[N]`` bool; a map whose target was declared absent scores 0 everywhere and a pointing miss
                (see :func:`~regionembed.metrics.functional.map_mask_scores`). ``None``: all present.
        """
        scores = map_mask_scores(maps, masks, self.threshold, present)
        # "cat" states in the metric dtype: torchmetrics pads a rank without samples with an empty tensor of that dtype
        self.iou.append(scores["iou"].to(self.dtype))
        self.dice.append(scores["dice"].to(self.dtype))
        self.energy.append(scores["energy"].to(self.dtype))
        self.hits += scores["pointing"].sum()
        self.total += scores["pointing"].numel()

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"map_miou", "map_dice", "pointing_game", "energy_pointing_game"}`` means over maps, in [0, 1]."""
        return _map_mask_compute(
            _cat_state(self.iou), _cat_state(self.dice), self.hits, self.total, _cat_state(self.energy)
        )


class BoxLocalization(Metric):
    """GT-known and top-k localization accuracy from predicted boxes and predicted labels.

    See :func:`regionembed.metrics.functional.box_localization`. States are integer counts.

    Args:
        iou_threshold: IoU a box must reach (``>=``) with any ground-truth box of its image.
        top_k: the ``k`` values for "top-k Loc" (each clipped to the number of predicted labels).
        **kwargs: ``torchmetrics.Metric`` options.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    hits: torch.Tensor
    total: torch.Tensor

    def __init__(self, iou_threshold: float = 0.5, top_k: Sequence[int] = (1, 5), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.iou_threshold = iou_threshold
        self.top_k = _check_top_k(top_k)
        self.add_state("hits", torch.zeros(1 + len(self.top_k), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(
        self,
        pred_boxes: torch.Tensor,
        gt_boxes: Sequence[torch.Tensor] | torch.Tensor,
        pred_labels_topk: torch.Tensor,
        gt_labels: torch.Tensor,
    ) -> None:
        """Add a batch of images.

        Args:
            pred_boxes: ``[N, 4]`` xyxy, one predicted box per image.
            gt_boxes: ``N`` tensors ``[K_i, 4]`` xyxy (any may match), or ``[N, 4]``.
            pred_labels_topk: ``[N, K]`` predicted class indices, best first.
            gt_labels: ``[N]`` ground-truth class indices.
        """
        hits, total = _box_localization_update(
            pred_boxes, gt_boxes, pred_labels_topk, gt_labels, self.iou_threshold, self.top_k
        )
        self.hits += hits
        self.total += total

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"gt_known_loc", "top{k}_loc"}`` fractions in [0, 1] (NaN before any update)."""
        return _box_localization_compute(self.hits, self.total, self.top_k)


class MaxBoxAccV2(Metric):
    """MaxBoxAccV2 (and V1) of Choe et al. 2020, "Evaluating Weakly Supervised Object Localization Methods Right".

    Each map is thresholded at every CAM threshold; the boxes of the resulting connected components are compared to
    the image's ground-truth boxes (see :func:`regionembed.metrics.functional.cam_threshold_box_ious` for how boxes
    are derived and how this differs from the official OpenCV contours). The state is the number of correctly
    localised images per ``(cam_threshold, delta)``, summed across processes, so the best threshold is chosen on
    the whole dataset exactly as on one process.

    Args:
        iou_thresholds: the IoU thresholds ``delta`` (paper: 0.3, 0.5, 0.7); a box counts at ``IoU >= delta``.
        cam_thresholds: ``[T]`` map thresholds (default ``torch.linspace(0, 1, 101)``).
        multi_contour: best box over all components (V2, default) or the largest component only (V1: use
            ``iou_thresholds=(0.5,)`` and read ``"maxboxacc@50"``).
        normalize: min-max normalise each map first, as the paper does; otherwise maps must lie in [0, 1].
        **kwargs: ``torchmetrics.Metric`` options.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(
        self,
        iou_thresholds: Sequence[float] = (0.3, 0.5, 0.7),
        cam_thresholds: Sequence[float] | torch.Tensor | None = None,
        multi_contour: bool = True,
        normalize: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.iou_thresholds, self.cam_thresholds = _check_max_box_acc_args(iou_thresholds, cam_thresholds)
        self.multi_contour = multi_contour
        self.normalize = normalize
        shape = (len(self.cam_thresholds), len(self.iou_thresholds))
        self.add_state("correct", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, maps: torch.Tensor, gt_boxes: Sequence[torch.Tensor] | torch.Tensor) -> None:
        """Add a batch of images.

        Args:
            maps: ``[N, H, W]`` maps at the resolution of the boxes.
            gt_boxes: ``N`` tensors ``[K_i, 4]`` xyxy, or ``[N, 4]``.
        """
        correct, total = _max_box_acc_update(
            maps, gt_boxes, self.cam_thresholds, self.iou_thresholds, self.multi_contour, self.normalize
        )
        self.correct += correct.to(self.correct.device)
        self.total += total.to(self.total.device)

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"maxboxacc_v2", "maxboxacc@{round(100 * delta)}"}`` fractions in [0, 1] (NaN before any update)."""
        return _max_box_acc_compute(self.correct, self.total, self.iou_thresholds)

    def box_accuracy(self) -> torch.Tensor:
        """``[T, D]`` box accuracy per (CAM threshold, IoU threshold) of the *local* states, e.g. to plot curves."""
        return self.correct.double() / self.total.double()
