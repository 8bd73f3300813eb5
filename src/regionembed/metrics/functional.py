"""Stateless metric functions: one per evaluator, plus the per-sample building blocks the ``Metric`` classes share.

Each modular metric (``RegionAccuracy``, ``RecallAtK``, ...) calls the private ``_*_update`` helper here to turn a
batch into *sufficient statistics* (integer counts, or one float per sample) and the private ``_*_compute`` helper to
reduce them; the public function of the same name runs both on one batch. So the class on a whole dataset, the class
over several processes, and the function on all data give the same number.

Conventions shared by every function:

* Boxes are ``[N, 4]`` ``xyxy`` in continuous pixel coordinates (pixel ``(r, c)`` covers ``[c, c + 1] x [r, r + 1]``),
  the convention of ``torchvision.ops.box_iou``; a box with zero union against another has IoU 0.
* Rank-based hits (top-k, Recall@K) count ties *against* the prediction: a constant score never looks perfect.
* Inputs are validated; shape mismatches, NaN/inf values and out-of-range maps raise ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.ops import box_iou

from ..boxes import component_boxes

__all__ = [
    "auc",
    "best_box_iou",
    "binary_mask_iou",
    "box_localization",
    "cam_threshold_box_ious",
    "contrastive_deletion_gap",
    "deletion_insertion_curves",
    "map_mask_agreement",
    "map_mask_scores",
    "max_box_acc",
    "paired_box_iou",
    "recall_at_k",
    "referring_accuracy",
    "region_accuracy",
    "retrieval_ranks",
    "topk_hits",
]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------------------------
def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_finite(name: str, x: torch.Tensor) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_ndim(name: str, x: torch.Tensor, ndim: int, layout: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {_shape(x)}")


def _check_integer(name: str, x: torch.Tensor) -> None:
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {x.dtype}")


def _check_unit_interval(name: str, x: torch.Tensor) -> None:
    _check_finite(name, x)
    if x.numel() and (bool(x.min() < 0) or bool(x.max() > 1)):
        raise ValueError(f"{name} must lie in [0, 1], got values in [{float(x.min())}, {float(x.max())}]")


def _as_bool_mask(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.bool:
        return x
    _check_finite(name, x)
    if not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(f"{name} must be binary (bool or 0/1 values)")
    return x.bool()


def _check_boxes(name: str, boxes: torch.Tensor) -> None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [N, 4] (xyxy), got {_shape(boxes)}")
    _check_finite(name, boxes)
    if bool((boxes[:, 2] < boxes[:, 0]).any()) or bool((boxes[:, 3] < boxes[:, 1]).any()):
        raise ValueError(f"{name} must be xyxy with x2 >= x1 and y2 >= y1")


def _check_labels(name: str, labels: torch.Tensor, n: int, num_classes: int | None = None) -> None:
    _check_integer(name, labels)
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}], got {_shape(labels)}")
    if num_classes is not None and labels.numel() and (bool(labels.min() < 0) or bool(labels.max() >= num_classes)):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}]")


def _check_top_k(top_k: Sequence[int]) -> tuple[int, ...]:
    top_k = tuple(int(k) for k in top_k)
    if not top_k or any(k < 1 for k in top_k) or len(set(top_k)) != len(top_k):
        raise ValueError(f"top_k must be distinct positive integers, got {top_k}")
    return top_k


def _check_gt_boxes(gt_boxes: Sequence[torch.Tensor] | torch.Tensor, n: int) -> list[torch.Tensor]:
    if len(gt_boxes) != n:
        raise ValueError(f"gt_boxes must hold one entry per sample ({n}), got {len(gt_boxes)}")
    out = []
    for i, g in enumerate(gt_boxes):
        g = g.reshape(1, 4) if g.ndim == 1 and g.shape[0] == 4 else g
        _check_boxes(f"gt_boxes[{i}]", g)
        out.append(g)
    return out


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` computed in float64 and returned in the default dtype; NaN when ``den`` is 0."""
    return (num.double() / den.double()).to(torch.get_default_dtype())


def _mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a 1-D tensor in float64, returned in the default dtype; NaN when empty."""
    values = values.double()
    return (values.sum() / values.numel()).to(torch.get_default_dtype())


# --------------------------------------------------------------------------------------------------------------------
# region classification
# --------------------------------------------------------------------------------------------------------------------
def topk_hits(logits: torch.Tensor, target: torch.Tensor, top_k: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Whether the target class is among the ``k`` highest logits, for each ``k``.

    The target's rank is the number of *other* classes whose logit is ``>=`` the target's, so ties count against the
    prediction (constant logits are never top-1 correct). A ``k`` larger than the number of classes is clipped to it.

    Args:
        logits: ``[N, C]`` class scores (any monotonic scale: logits, probabilities, similarities).
        target: ``[N]`` integer class indices in ``[0, C)``.
        top_k: the ``k`` values.

    Returns:
        ``[N, len(top_k)]`` bool.
    """
    _check_ndim("logits", logits, 2, "[N, C]")
    _check_finite("logits", logits)
    _check_labels("target", target, logits.shape[0], logits.shape[1])
    top_k = _check_top_k(top_k)
    target_logit = logits.gather(1, target.long()[:, None])
    rank = (logits >= target_logit).sum(1) - 1
    return rank[:, None] < torch.tensor(top_k, device=logits.device)[None]


def _region_accuracy_update(
    logits: torch.Tensor, target: torch.Tensor, num_classes: int, top_k: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class hit counts ``[C, K]`` and per-class instance counts ``[C]`` (int64)."""
    if logits.ndim == 2 and logits.shape[1] != num_classes:
        raise ValueError(f"logits must have shape [N, {num_classes}], got {_shape(logits)}")
    hits = topk_hits(logits, target, top_k).long()
    target = target.long()
    correct = torch.zeros(num_classes, hits.shape[1], dtype=torch.long, device=logits.device)
    correct.index_add_(0, target, hits)
    count = torch.bincount(target, minlength=num_classes)
    return correct, count


def _region_accuracy_compute(
    correct: torch.Tensor, count: torch.Tensor, top_k: Sequence[int]
) -> dict[str, torch.Tensor]:
    out = {f"top{k}": _ratio(correct[:, j].sum(), count.sum()) for j, k in enumerate(top_k)}
    present = count > 0
    for j, k in enumerate(top_k):
        out[f"mean_class_top{k}"] = _mean(correct[present, j].double() / count[present].double())
    return out


def region_accuracy(
    logits: torch.Tensor, target: torch.Tensor, num_classes: int | None = None, top_k: Sequence[int] = (1, 5)
) -> dict[str, torch.Tensor]:
    """Top-k accuracy per region instance and averaged per class.

    Args:
        logits: ``[N, C]`` class scores, one row per region instance.
        target: ``[N]`` integer class indices.
        num_classes: ``C`` (default: ``logits.shape[1]``).
        top_k: the ``k`` values; each is clipped to ``C``, the key keeps the requested ``k``.

    Returns:
        ``{"top{k}": ..., "mean_class_top{k}": ...}`` scalar fractions in [0, 1]: the fraction of instances whose
        class is in the top ``k``, and the mean over classes *present in target* of the per-class fraction.
    """
    top_k = _check_top_k(top_k)
    num_classes = logits.shape[-1] if num_classes is None else num_classes
    return _region_accuracy_compute(*_region_accuracy_update(logits, target, num_classes, top_k), top_k)


# --------------------------------------------------------------------------------------------------------------------
# IoU building blocks
# --------------------------------------------------------------------------------------------------------------------
def paired_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of each pair ``(boxes1[i], boxes2[i])``: ``torchvision.ops.box_iou(boxes1, boxes2).diagonal()`` in O(N).

    Args:
        boxes1: ``[N, 4]`` xyxy.
        boxes2: ``[N, 4]`` xyxy.

    Returns:
        ``[N]`` float64 IoU; 0 where the union is empty (two zero-area boxes), where torchvision gives NaN.
    """
    _check_boxes("boxes1", boxes1)
    _check_boxes("boxes2", boxes2)
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"boxes1 {_shape(boxes1)} and boxes2 {_shape(boxes2)} differ in shape")
    # float64 so that the IoU >= threshold decisions do not depend on the input precision
    a, b = boxes1.double(), boxes2.double()
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(1)
    union = (a[:, 2:] - a[:, :2]).prod(1) + (b[:, 2:] - b[:, :2]).prod(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(inter))


def binary_mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of each pair of binary masks.

    Args:
        pred: ``[N, H, W]`` bool or 0/1.
        target: ``[N, H, W]`` bool or 0/1.

    Returns:
        ``[N]`` float64 IoU; 1 where both masks are empty (they agree), which never happens with real regions.
    """
    _check_ndim("pred", pred, 3, "[N, H, W]")
    if pred.shape != target.shape:
        raise ValueError(f"pred {_shape(pred)} and target {_shape(target)} differ in shape")
    p = _as_bool_mask("pred", pred).flatten(1)
    t = _as_bool_mask("target", target).flatten(1)
    inter = (p & t).sum(1).double()
    union = (p | t).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


# --------------------------------------------------------------------------------------------------------------------
# referring-expression comprehension
# --------------------------------------------------------------------------------------------------------------------
def _referring_update(
    pred: torch.Tensor, target: torch.Tensor, iou_threshold: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample hits ``[N]`` (bool) and IoUs ``[N]`` (float64, ``None`` for the index form)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {_shape(pred)} and target {_shape(target)} differ in shape")
    if pred.ndim == 1:
        _check_integer("pred", pred)
        _check_integer("target", target)
        return pred == target, None
    if pred.ndim == 2:
        ious = paired_box_iou(pred, target)
    elif pred.ndim == 3:
        ious = binary_mask_iou(pred, target)
    else:
        raise ValueError(
            f"pred must be candidate indices [N], boxes [N, 4] or masks [N, H, W], got shape {_shape(pred)}"
        )
    return ious > iou_threshold, ious


def _referring_compute(hits: torch.Tensor, total: torch.Tensor, ious: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"ref_acc": _ratio(hits, total), "ref_miou": _mean(ious)}


def referring_accuracy(pred: torch.Tensor, target: torch.Tensor, iou_threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Referring-expression comprehension accuracy, in one of three forms chosen by the shape of ``pred``.

    * boxes: ``pred``, ``target`` ``[N, 4]`` xyxy; a hit is ``IoU > iou_threshold`` (the RefCOCO convention);
    * masks: ``pred``, ``target`` ``[N, H, W]`` binary; a hit is mask ``IoU > iou_threshold``;
    * candidate indices: ``pred``, ``target`` ``[N]`` integers (the chosen and the correct candidate mask among
      the proposals of each expression, "best of candidate masks"); a hit is ``pred == target``.

    Args:
        pred: predictions in one of the forms above.
        target: ground truth of the same shape.
        iou_threshold: IoU a box/mask must *exceed* to count.

    Returns:
        ``{"ref_acc": ..., "ref_miou": ...}``: the fraction of hits, and the mean IoU over box/mask samples
        (NaN for the index form, which has no IoU).
    """
    hits, ious = _referring_update(pred, target, iou_threshold)
    ious = hits.new_zeros(0, dtype=torch.float64) if ious is None else ious
    return _referring_compute(hits.sum(), torch.tensor(hits.numel()), ious)


# --------------------------------------------------------------------------------------------------------------------
# map-vs-mask agreement
# --------------------------------------------------------------------------------------------------------------------
def map_mask_scores(
    maps: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5, present: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-map agreement between a saliency map and a region mask.

    Args:
        maps: ``[N, H, W]`` maps in [0, 1].
        masks: ``[N, H, W]`` binary masks (bool or 0/1).
        threshold: a pixel is foreground where ``map >= threshold`` (for the IoU).
        present: ``[N]`` bool, False where the explainer said the target is not in the image (VL-Score): such a
            map localises nothing, so it scores IoU, Dice and energy 0 and a pointing-game miss, whatever its
            pixels and whatever the mask (``None``: every map is present).

    Returns:
        Dict of ``[N]`` tensors:

        * ``"iou"`` (float64): IoU of the thresholded map with the mask; 1 when both are empty.
        * ``"dice"`` (float64): soft Dice ``2 sum(map * mask) / (sum(map) + sum(mask))``; 1 when both sums are 0.
        * ``"pointing"`` (bool): the map's maximum lies inside the mask. Ties go to the *first* maximum in raster
          order (``torch.argmax``), so a constant map points at pixel ``(0, 0)``. No pixel tolerance.
        * ``"energy"`` (float64): energy-based pointing game ``sum(map * mask) / sum(map)``; 0 for an all-zero map.
    """
    _check_ndim("maps", maps, 3, "[N, H, W]")
    if maps.shape != masks.shape:
        raise ValueError(f"maps {_shape(maps)} and masks {_shape(masks)} differ in shape")
    _check_unit_interval("maps", maps)
    m = maps.flatten(1).double()
    g = _as_bool_mask("masks", masks).flatten(1)
    fg = m >= threshold
    inter = (fg & g).sum(1).double()
    union = (fg | g).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))
    inside = (m * g).sum(1)
    map_sum = m.sum(1)
    den = map_sum + g.sum(1).double()
    dice = torch.where(den > 0, 2 * inside / den.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(den))
    pointing = g.gather(1, m.argmax(1, keepdim=True))[:, 0]
    energy = torch.where(map_sum > 0, inside / map_sum.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    if present is not None:
        if present.shape != (maps.shape[0],) or present.dtype != torch.bool:
            raise ValueError(f"present must be bool of shape [{maps.shape[0]}], got {present.dtype} {_shape(present)}")
        present = present.to(maps.device)
        iou, dice, energy = (torch.where(present, x, torch.zeros_like(x)) for x in (iou, dice, energy))
        pointing = pointing & present
    return {"iou": iou, "dice": dice, "pointing": pointing, "energy": energy}


def _map_mask_compute(
    iou: torch.Tensor, dice: torch.Tensor, hits: torch.Tensor, total: torch.Tensor, energy: torch.Tensor
) -> dict[str, torch.Tensor]:
    return {
        "map_miou": _mean(iou),
        "map_dice": _mean(dice),
        "pointing_game": _ratio(hits, total),
        "energy_pointing_game": _mean(energy),
    }


def map_mask_agreement(maps: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Mean over maps of :func:`map_mask_scores`.

    Args:
        maps: ``[N, H, W]`` maps in [0, 1].
        masks: ``[N, H, W]`` binary masks.
        threshold: binarisation threshold for the IoU.

    Returns:
        ``{"map_miou", "map_dice", "pointing_game", "energy_pointing_game"}`` scalars in [0, 1].
    """
    s = map_mask_scores(maps, masks, threshold)
    p = s["pointing"]
    return _map_mask_compute(s["iou"], s["dice"], p.sum(), torch.tensor(p.numel()), s["energy"])


# --------------------------------------------------------------------------------------------------------------------
# box localization (WSOL)
# --------------------------------------------------------------------------------------------------------------------
def best_box_iou(pred_boxes: torch.Tensor, gt_boxes: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """IoU of each predicted box with the best-matching ground-truth box of its image.

    Args:
        pred_boxes: ``[N, 4]`` xyxy, one per image.
        gt_boxes: ``N`` tensors ``[K_i, 4]`` xyxy (any of them may match), or ``[N, 4]`` for one box per image.
            An image with ``K_i = 0`` gets IoU 0.

    Returns:
        ``[N]`` float64.
    """
    _check_boxes("pred_boxes", pred_boxes)
    gts = _check_gt_boxes(gt_boxes, pred_boxes.shape[0])
    best = torch.zeros(pred_boxes.shape[0], dtype=torch.float64, device=pred_boxes.device)
    counts = torch.tensor([g.shape[0] for g in gts], device=pred_boxes.device)
    if not gts or int(counts.sum()) == 0:
        return best
    owner = torch.repeat_interleave(torch.arange(len(gts), device=pred_boxes.device), counts)
    all_gt = torch.cat([g.to(pred_boxes.device, torch.float64) for g in gts])
    ious = paired_box_iou(pred_boxes[owner], all_gt)
    return best.scatter_reduce(0, owner, ious, reduce="amax", include_self=True)


def _box_localization_update(
    pred_boxes: torch.Tensor,
    gt_boxes: Sequence[torch.Tensor] | torch.Tensor,
    pred_labels_topk: torch.Tensor,
    gt_labels: torch.Tensor,
    iou_threshold: float,
    top_k: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hit counts: GT-known first, then one per ``k`` (int64 ``[1 + len(top_k)]``), and the sample count."""
    _check_boxes("pred_boxes", pred_boxes)
    n = pred_boxes.shape[0]
    _check_ndim("pred_labels_topk", pred_labels_topk, 2, "[N, K]")
    _check_integer("pred_labels_topk", pred_labels_topk)
    if pred_labels_topk.shape[0] != n:
        raise ValueError(f"pred_labels_topk must have shape [{n}, K], got {_shape(pred_labels_topk)}")
    _check_labels("gt_labels", gt_labels, n)
    box_ok = best_box_iou(pred_boxes, gt_boxes) >= iou_threshold
    label_hits = pred_labels_topk == gt_labels[:, None]
    hits = [box_ok.sum()]
    for k in top_k:
        hits.append((box_ok & label_hits[:, :k].any(1)).sum())
    return torch.stack(hits), torch.tensor(n, device=pred_boxes.device)


def _box_localization_compute(hits: torch.Tensor, total: torch.Tensor, top_k: Sequence[int]) -> dict[str, torch.Tensor]:
    out = {"gt_known_loc": _ratio(hits[0], total)}
    out.update({f"top{k}_loc": _ratio(hits[1 + j], total) for j, k in enumerate(top_k)})
    return out


def box_localization(
    pred_boxes: torch.Tensor,
    gt_boxes: Sequence[torch.Tensor] | torch.Tensor,
    pred_labels_topk: torch.Tensor,
    gt_labels: torch.Tensor,
    iou_threshold: float = 0.5,
    top_k: Sequence[int] = (1, 5),
) -> dict[str, torch.Tensor]:
    """GT-known and top-k localization accuracy (the CAM / ILSVRC weakly-supervised localization protocol).

    Args:
        pred_boxes: ``[N, 4]`` xyxy, one predicted box per image.
        gt_boxes: ``N`` tensors ``[K_i, 4]``; the box is correct if ``IoU >= iou_threshold`` with *any* of them.
        pred_labels_topk: ``[N, K]`` predicted class indices, best first.
        gt_labels: ``[N]`` ground-truth class indices.
        iou_threshold: IoU the box must reach (``>=``, as in Choe et al. 2020).
        top_k: the ``k`` values; each is clipped to ``K``.

    Returns:
        ``{"gt_known_loc": ..., "top{k}_loc": ...}`` fractions: box correct; box correct *and* the ground-truth
        label among the first ``k`` predicted labels.
    """
    top_k = _check_top_k(top_k)
    hits, total = _box_localization_update(pred_boxes, gt_boxes, pred_labels_topk, gt_labels, iou_threshold, top_k)
    return _box_localization_compute(hits, total, top_k)


def _normalize_map(m: np.ndarray) -> np.ndarray:
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def cam_threshold_box_ious(
    cam: torch.Tensor,
    gt_boxes: torch.Tensor,
    cam_thresholds: Sequence[float] | torch.Tensor,
    multi_contour: bool = True,
    normalize: bool = True,
) -> torch.Tensor:
    """Best box IoU obtained by thresholding one map at each CAM threshold (the box part of MaxBoxAcc).

    At threshold ``t`` the foreground is ``cam >= t``; its 8-connected components
    (:func:`regionembed.boxes.component_boxes`, the boxing of :func:`~regionembed.boxes.maps_to_boxes`) give boxes
    that tightly enclose their pixels (a component over columns ``c0..c1`` spans ``x`` in ``[c0, c1 + 1]``).
    This stands in for ``cv2.findContours`` + ``boundingRect`` of the official wsolevaluation code: components are
    outer contours (holes add no box) and the largest is chosen by pixel count rather than contour area.

    Args:
        cam: ``[H, W]`` map.
        gt_boxes: ``[K, 4]`` xyxy ground-truth boxes of the image; the IoU is the best over them (0 when ``K = 0``).
        cam_thresholds: ``[T]`` thresholds in [0, 1].
        multi_contour: score the best box over *all* components (MaxBoxAccV2); ``False`` keeps only the largest
            component (MaxBoxAcc, v1).
        normalize: min-max normalise the map first, as the paper does (a constant map becomes zeros); otherwise the
            map must already lie in [0, 1].

    Returns:
        ``[T]`` float64 best IoU per threshold; 0 where the foreground is empty.
    """
    _check_ndim("cam", cam, 2, "[H, W]")
    _check_finite("cam", cam)
    if not normalize:
        _check_unit_interval("cam", cam)
    gt = _check_gt_boxes([gt_boxes], 1)[0].detach().cpu().double()
    thresholds = torch.as_tensor(cam_thresholds, dtype=torch.float64).flatten().tolist()
    best = torch.zeros(len(thresholds), dtype=torch.float64)
    if gt.shape[0] == 0:
        return best
    m = cam.detach().cpu().double().numpy()
    m = _normalize_map(m) if normalize else m
    for i, t in enumerate(thresholds):
        _, boxes, areas = component_boxes(m >= t)
        if len(areas) == 0:
            continue
        if not multi_contour:
            boxes = boxes[int(areas.argmax())][None]
        best[i] = box_iou(boxes, gt).max()
    return best


def _max_box_acc_update(
    maps: torch.Tensor,
    gt_boxes: Sequence[torch.Tensor] | torch.Tensor,
    cam_thresholds: torch.Tensor,
    iou_thresholds: Sequence[float],
    multi_contour: bool,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct-image counts ``[T, D]`` (int64) and the image count."""
    _check_ndim("maps", maps, 3, "[N, H, W]")
    gts = _check_gt_boxes(gt_boxes, maps.shape[0])
    deltas = torch.tensor(list(iou_thresholds), dtype=torch.float64)
    correct = torch.zeros(len(cam_thresholds), len(deltas), dtype=torch.long)
    for cam, gt in zip(maps, gts, strict=True):
        best = cam_threshold_box_ious(cam, gt, cam_thresholds, multi_contour, normalize)
        correct += (best[:, None] >= deltas[None]).long()
    return correct.to(maps.device), torch.tensor(maps.shape[0], device=maps.device)


def _max_box_acc_compute(
    correct: torch.Tensor, total: torch.Tensor, iou_thresholds: Sequence[float]
) -> dict[str, torch.Tensor]:
    acc = _ratio(correct, total)  # [T, D]
    best = acc.max(0).values
    out = {"maxboxacc_v2": _mean(best)}
    out.update({f"maxboxacc@{round(100 * d)}": best[j] for j, d in enumerate(iou_thresholds)})
    return out


def _check_max_box_acc_args(
    iou_thresholds: Sequence[float], cam_thresholds: Sequence[float] | torch.Tensor | None
) -> tuple[tuple[float, ...], torch.Tensor]:
    iou_thresholds = tuple(float(d) for d in iou_thresholds)
    keys = {round(100 * d) for d in iou_thresholds}
    if not iou_thresholds or len(keys) != len(iou_thresholds) or any(not 0 < d <= 1 for d in iou_thresholds):
        raise ValueError(f"iou_thresholds must be in (0, 1] and distinct once rounded to percent, got {iou_thresholds}")
    cams = (
        torch.linspace(0, 1, 101, dtype=torch.float64)
        if cam_thresholds is None
        else torch.as_tensor(cam_thresholds).flatten()
    )
    if cams.numel() == 0 or not bool(torch.isfinite(cams).all()):
        raise ValueError("cam_thresholds must be a non-empty list of finite values")
    return iou_thresholds, cams.double()


def max_box_acc(
    maps: torch.Tensor,
    gt_boxes: Sequence[torch.Tensor] | torch.Tensor,
    iou_thresholds: Sequence[float] = (0.3, 0.5, 0.7),
    cam_thresholds: Sequence[float] | torch.Tensor | None = None,
    multi_contour: bool = True,
    normalize: bool = True,
) -> dict[str, torch.Tensor]:
    """MaxBoxAcc / MaxBoxAccV2 of Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right" (2020).

    For each CAM threshold, box accuracy at IoU ``delta`` is the fraction of images whose best box (see
    :func:`cam_threshold_box_ious`) has ``IoU >= delta`` with a ground-truth box; MaxBoxAcc at ``delta`` is the best
    box accuracy over CAM thresholds (the threshold is chosen on the whole dataset, not per image), and MaxBoxAccV2
    is its mean over ``delta`` in ``iou_thresholds``.

    Args:
        maps: ``[N, H, W]`` maps, at the resolution of the boxes.
        gt_boxes: ``N`` tensors ``[K_i, 4]`` xyxy.
        iou_thresholds: the ``delta`` values (paper: 0.3, 0.5, 0.7).
        cam_thresholds: ``[T]`` map thresholds (default ``torch.linspace(0, 1, 101)``; the paper uses 0.00..0.99).
        multi_contour: all components (V2) or only the largest (V1).
        normalize: min-max normalise each map first.

    Returns:
        ``{"maxboxacc_v2": ..., "maxboxacc@{round(100 * delta)}": ...}`` fractions in [0, 1].
    """
    iou_thresholds, cams = _check_max_box_acc_args(iou_thresholds, cam_thresholds)
    correct, total = _max_box_acc_update(maps, gt_boxes, cams, iou_thresholds, multi_contour, normalize)
    return _max_box_acc_compute(correct, total, iou_thresholds)


# --------------------------------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------------------------------
def retrieval_ranks(scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of the correct gallery item for each query.

    The rank is the number of other (non-excluded) gallery items scoring ``>=`` the correct one, so ties count
    against the query.

    Args:
        scores: ``[Q, G]`` query-gallery similarities (higher is better).
        target: ``[Q]`` index of the correct gallery item.
        exclude: ``[Q]`` gallery index to ignore per query (e.g. the reference image in composed retrieval), ``-1``
            for none; it must differ from ``target``.

    Returns:
        ``[Q]`` int64 ranks.
    """
    _check_ndim("scores", scores, 2, "[Q, G]")
    _check_finite("scores", scores)
    q, g = scores.shape
    _check_labels("target", target, q, g)
    ge = scores >= scores.gather(1, target.long()[:, None])
    if exclude is not None:
        _check_integer("exclude", exclude)
        if exclude.shape != (q,):
            raise ValueError(f"exclude must have shape [{q}], got {_shape(exclude)}")
        if exclude.numel() and (bool(exclude.min() < -1) or bool(exclude.max() >= g)):
            raise ValueError(f"exclude must lie in [-1, {g}) (-1: nothing to exclude)")
        if bool((exclude == target).any()):
            raise ValueError("exclude must never equal target")
        rows = torch.nonzero(exclude >= 0)[:, 0]
        ge[rows, exclude[rows].long()] = False
    return ge.sum(1) - 1


def _recall_update(
    scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None, k: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hit counts ``[len(k)]`` (int64) and the query count."""
    ranks = retrieval_ranks(scores, target, exclude)
    hits = (ranks[:, None] < torch.tensor(k, device=ranks.device)[None]).sum(0)
    return hits, torch.tensor(ranks.numel(), device=ranks.device)


def _recall_compute(hits: torch.Tensor, total: torch.Tensor, k: Sequence[int]) -> dict[str, torch.Tensor]:
    return {f"R@{kk}": _ratio(hits[j], total) for j, kk in enumerate(k)}


def recall_at_k(
    scores: torch.Tensor, target: torch.Tensor, k: Sequence[int] = (1, 5, 10, 50), exclude: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Recall@K for single-target retrieval: the fraction of queries whose correct item ranks in the first ``k``.

    Args:
        scores: ``[Q, G]`` similarities.
        target: ``[Q]`` index of the correct gallery item.
        k: the cut-offs.
        exclude: ``[Q]`` gallery index to ignore per query, ``-1`` for none.

    Returns:
        ``{"R@{k}": ...}`` fractions in [0, 1] (not percent).
    """
    k = _check_top_k(k)
    return _recall_compute(*_recall_update(scores, target, exclude, k), k)


# --------------------------------------------------------------------------------------------------------------------
# faithfulness: deletion / insertion (Petsiuk et al., RISE, 2018)
# --------------------------------------------------------------------------------------------------------------------
def _baseline(image: torch.Tensor, baseline: str | torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    if isinstance(baseline, torch.Tensor):
        _check_finite("baseline", baseline)
        try:
            return torch.broadcast_to(baseline.to(image), image.shape)
        except RuntimeError as err:
            raise ValueError(f"baseline {_shape(baseline)} does not broadcast to image {_shape(image)}") from err
    if baseline == "zeros":
        return torch.zeros_like(image)
    if baseline == "blur":
        return TF.gaussian_blur(image, [kernel_size, kernel_size], [sigma, sigma])
    raise ValueError(f"baseline must be 'zeros', 'blur' or a tensor, got {baseline!r}")


@torch.no_grad()
def deletion_insertion_curves(
    score_fn: ScoreFn,
    image: torch.Tensor,
    maps: torch.Tensor,
    steps: int = 100,
    mode: str = "deletion",
    baseline: str | torch.Tensor = "zeros",
    batch_size: int = 64,
    blur_kernel_size: int = 11,
    blur_sigma: float = 5.0,
) -> torch.Tensor:
    """Score curves while pixels are deleted (or inserted) in order of decreasing map value.

    Pixels are sorted by decreasing map value (ties in raster order). After step ``i`` of ``steps``, the first
    ``(i * H * W) // steps`` pixels are replaced by the baseline (deletion, starting from the image) or copied from
    the image (insertion, starting from the baseline), all channels at once; step 0 is the untouched start and step
    ``steps`` the fully changed image. RISE uses ``baseline="zeros"`` for deletion and ``"blur"`` for insertion.

    Args:
        score_fn: ``score_fn(images [M, 3, H, W], index [M]) -> [M]`` scores, where ``index[m]`` is the sample
            (row of ``image``) that ``images[m]`` was made from, so the function can pick that sample's target (e.g.
            its text embedding). It is called under ``torch.no_grad`` with at most ``batch_size`` images at a time.
        image: ``[B, 3, H, W]`` images, as ``score_fn`` expects them (e.g. normalised).
        maps: ``[B, H, W]`` saliency maps at the image resolution (upsample them first).
        steps: number of equal chunks ``S``.
        mode: ``"deletion"`` or ``"insertion"``.
        baseline: ``"zeros"``, ``"blur"`` (Gaussian blur of the image, ``blur_kernel_size``/``blur_sigma``; RISE
            uses 11 and 5) or a tensor broadcastable to ``image`` (e.g. the channel mean ``[3, 1, 1]``).
        batch_size: images per ``score_fn`` call.
        blur_kernel_size: Gaussian kernel size for ``baseline="blur"``.
        blur_sigma: Gaussian sigma for ``baseline="blur"``.

    Returns:
        ``[B, S + 1]`` scores, on ``x = i / S``; see :func:`auc`.
    """
    _check_ndim("image", image, 4, "[B, 3, H, W]")
    _check_ndim("maps", maps, 3, "[B, H, W]")
    b, _, h, w = image.shape
    if maps.shape != (b, h, w):
        raise ValueError(
            f"maps must have shape [B, H, W] = {(b, h, w)} to match image {_shape(image)}, got "
            f"{_shape(maps)}; upsample the maps to the image size first"
        )
    _check_finite("image", image)
    _check_finite("maps", maps)
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    base = _baseline(image, baseline, blur_kernel_size, blur_sigma)
    start, end = (image, base) if mode == "deletion" else (base, image)

    num_pixels = h * w
    order = torch.argsort(maps.reshape(b, num_pixels), dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(num_pixels, device=order.device).expand(b, -1))
    changed_count = torch.arange(steps + 1, device=image.device) * num_pixels // steps

    curves = torch.empty(b * (steps + 1), device=image.device)
    for first in range(0, b * (steps + 1), batch_size):
        j = torch.arange(first, min(first + batch_size, b * (steps + 1)), device=image.device)
        sample, step = j // (steps + 1), j % (steps + 1)
        changed = (rank[sample] < changed_count[step, None]).view(-1, 1, h, w)
        scores = score_fn(torch.where(changed, end[sample], start[sample]), sample)
        if scores.shape != (j.numel(),):
            raise ValueError(f"score_fn must return [M] = [{j.numel()}] scores, got {_shape(scores)}")
        curves[j] = scores.to(curves.dtype)
    return curves.view(b, steps + 1)


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Area under curves sampled at ``x = 0, 1/S, ..., 1`` (trapezoid rule).

    Args:
        curve: ``[B, S + 1]`` with ``S >= 1`` (e.g. from :func:`deletion_insertion_curves`).

    Returns:
        ``[B]`` areas, in the units of the scores.
    """
    _check_ndim("curve", curve, 2, "[B, S + 1]")
    _check_finite("curve", curve)
    if curve.shape[1] < 2:
        raise ValueError(f"curve needs at least 2 points (S >= 1), got shape {_shape(curve)}")
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[1] - 1), dim=1)


def contrastive_deletion_gap(curve_a: torch.Tensor, curve_b: torch.Tensor) -> torch.Tensor:
    """How much faster class A's score drops than class B's when deleting pixels along the map ``A - B``.

    Build both curves with :func:`deletion_insertion_curves` (``mode="deletion"``) from the *same* contrastive map
    ``map_A - map_B``, scoring class A and class B respectively. The mean drop of a curve is the area between its
    starting score and the curve, ``curve[:, 0] - auc(curve)``; the gap is ``drop_A - drop_B``. It is positive when
    the pixels the map attributes to A rather than B hurt A more than B, is in score units, and ignores a constant
    offset between the two scores (so raw similarities of the two classes can be compared).

    Args:
        curve_a: ``[B, S + 1]`` deletion curve of class A.
        curve_b: ``[B, S + 1]`` deletion curve of class B, same shape.

    Returns:
        ``[B]`` gaps; feed them to :class:`DeletionInsertionAUC` to average over a dataset.
    """
    if curve_a.shape != curve_b.shape:
        raise ValueError(f"curve_a {_shape(curve_a)} and curve_b {_shape(curve_b)} differ in shape")
    return (curve_a[:, 0] - auc(curve_a)) - (curve_b[:, 0] - auc(curve_b))


def _cat_state(state: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """A ``dist_reduce_fx="cat"`` metric state as one 1-D tensor (a list before sync, a tensor after; may be empty)."""
    if isinstance(state, torch.Tensor):
        return state
    return torch.cat(state) if state else torch.zeros(0, dtype=torch.float64)
