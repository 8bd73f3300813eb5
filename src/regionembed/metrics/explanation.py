"""Zero-shot localization and faithfulness of one explainer's maps: every evaluator of the protocol in one object.

The protocol (one *query* per image and ground-truth class present in it, :func:`localization_queries`) is described
in :mod:`regionembed.modules.localization`, which wires this evaluator to the test loop; here it is plain torch and
torchmetrics, usable in a notebook.

:class:`ExplainerLocalization` turns the maps of a query batch into boxes (:func:`regionembed.boxes.maps_to_boxes`)
and scores them with ``BoxLocalization`` (GT-known / Top-k Loc), the best box IoU, ``MaxBoxAccV2``,
``MapMaskAgreement`` (IoU, Dice, pointing game, energy pointing game), the "not present" rate, the time per map and,
with ``faithfulness=True``, deletion/insertion AUCs and the contrastive gap (RISE curves of a class-score function).

A map whose target the explainer declared absent (``present`` False, VL-Score) localises nothing: no box (IoU 0), a
pointing-game miss, IoU/Dice/energy 0 (:class:`~regionembed.metrics.MapMaskAgreement`'s ``present``), an all-zero
map for MaxBoxAccV2. Its faithfulness curves are still computed on the map it returned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.aggregation import CatMetric

from ..boxes import BoxMode, empty_box, maps_to_boxes
from .faithfulness import ContrastiveDeletionGap, DeletionInsertionAUC
from .functional import best_box_iou, deletion_insertion_curves
from .localization import BoxLocalization, MapMaskAgreement, MaxBoxAccV2

__all__ = ["ExplainerLocalization", "LocalizationQueries", "class_score_curves", "localization_queries"]

#: ``class_scores(images [M, 3, H, W]) -> [M, C]`` scores of every class (probabilities or cosines)
ClassScoreFn = Callable[[torch.Tensor], torch.Tensor]


class LocalizationQueries(NamedTuple):
    """The ``Q`` queries of one image (one per class present in it).

    Attributes:
        classes: ``[Q]`` the query classes (sorted).
        logits: ``[Q, C]`` the image's class logits with the *other* present classes pushed below every class.
        topk: ``[Q, K]`` the best ``K`` classes of each row of ``logits``.
        boxes: ``Q`` tensors ``[K_q, 4]``: every ground-truth box of the query's class.
        masks: ``[Q, H, W]`` bool: the union of the query class's masks.
        contrast: ``[Q]`` the contrast class: the best-scoring other present class, else the best absent class.
        contrast_in_image: ``[Q]`` bool: the contrast class is present in the image.
        contrast_valid: ``[Q]`` bool: the contrast class differs from the query class.
    """

    classes: torch.Tensor
    logits: torch.Tensor
    topk: torch.Tensor
    boxes: list[torch.Tensor]
    masks: torch.Tensor
    contrast: torch.Tensor
    contrast_in_image: torch.Tensor
    contrast_valid: torch.Tensor


def localization_queries(
    logits: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor, top_k: Sequence[int]
) -> LocalizationQueries:
    """One query per class present in an image: its GT boxes and mask, masked top-k classes, contrast class.

    The class of a query is ranked among itself and the *absent* classes: the other classes present in a
    multi-object image are not errors (with one class per image this is the usual single-label protocol).

    Args:
        logits: ``[C]`` class scores of the image (its global embedding against the class prompts).
        labels: ``[N]`` class of each ground-truth region of the image.
        masks: ``[N, H, W]`` bool region masks.
        boxes: ``[N, 4]`` xyxy region boxes.
        top_k: the ``k`` of Top-k Loc and of the classification (the largest is kept, clipped to ``C``).
    """
    classes = torch.unique(labels, sorted=True)
    q, c = classes.numel(), logits.numel()
    present = torch.zeros(c, dtype=torch.bool, device=logits.device)
    present[classes] = True
    others = present[None].expand(q, c).clone()
    others[torch.arange(q), classes] = False
    floor = logits.min() - 1  # finite stand-in for -inf (RegionAccuracy rejects non-finite logits)
    q_logits = torch.where(others, floor, logits[None].expand(q, c))
    topk = q_logits.topk(min(max(top_k), c), dim=1).indices
    other_present = torch.where(others, logits[None], -math.inf)
    absent_logits = torch.where(present, -math.inf, logits)
    fallback = absent_logits.argmax() if bool((~present).any()) else classes[0]
    contrast = torch.where(others.any(1), other_present.argmax(1), fallback)
    return LocalizationQueries(
        classes=classes,
        logits=q_logits,
        topk=topk,
        boxes=[boxes[labels == cls] for cls in classes],
        masks=torch.stack([masks[labels == cls].any(0) for cls in classes]),
        contrast=contrast,
        contrast_in_image=present[contrast] & (contrast != classes),
        contrast_valid=contrast != classes,
    )


def class_score_curves(
    class_scores: ClassScoreFn,
    image: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    mode: str,
    baseline: str,
    steps: int,
    batch_size: int = 64,
    also: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Deletion/insertion curves ``[Q, S + 1]`` of the scores of ``classes`` ``[Q]`` along ``maps`` ``[Q, H, W]``.

    With ``also`` (``[Q]`` classes), the curves of those classes on the *same* perturbed images come second (the
    contrastive gap scores two classes along one map: one pass over the images instead of two).

    Args:
        class_scores: ``images [M, 3, H, W] -> [M, C]`` class scores.
        image: ``[1, 3, H, W]`` the image all maps explain.
        maps: ``[Q, H, W]`` maps at the image's size.
        classes: ``[Q]`` the class scored along each map.
        mode: ``"deletion"`` or ``"insertion"``.
        baseline: ``"zeros"`` or ``"blur"`` (see :func:`~regionembed.metrics.deletion_insertion_curves`).
        steps: curve steps ``S``.
        batch_size: images per ``class_scores`` call.
        also: ``[Q]`` second classes scored on the same images, or ``None``.
    """
    rows: list[torch.Tensor] = []

    def score(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        scores = class_scores(x)  # [M, C]
        if also is not None:
            rows.append(scores.gather(1, also[index][:, None])[:, 0])
        return scores.gather(1, classes[index][:, None])[:, 0]

    curves = deletion_insertion_curves(
        score,
        image.expand(maps.shape[0], -1, -1, -1),
        maps,
        steps=steps,
        mode=mode,
        baseline=baseline,
        batch_size=batch_size,
    )
    # score is called on consecutive chunks of the flattened (sample, step) order: rows concatenate back
    second = torch.cat(rows).view_as(curves).to(curves.dtype) if also is not None else None
    return curves, second


class ExplainerLocalization(nn.Module):
    """Every localization and faithfulness evaluator of one explainer (see the module docstring).

    Metric states sum or concatenate across processes (torchmetrics), so 2 processes give the numbers of 1.

    Args:
        threshold: box threshold, a fraction of each map's maximum (:func:`~regionembed.boxes.maps_to_boxes`).
        min_area: drop map components smaller than this (below 1: fraction of the image, else pixels).
        box_mode: ``"largest"`` component, the highest-mass one of ``"all"``, or ``"merge"`` (union box).
        iou_threshold: box IoU for (GT-known / top-k) Loc.
        top_k: the ``k`` of Top-k Loc.
        cam_thresholds: MaxBoxAccV2 map thresholds (default 0, 0.01, ..., 1).
        map_threshold: binarisation threshold of the maps for the mask IoU.
        faithfulness: also keep deletion/insertion AUCs and the contrastive gap.
        faithfulness_steps: deletion/insertion steps ``S``.
        deletion_baseline: ``"zeros"`` (the normalised mean colour) or ``"blur"``.
        insertion_baseline: ``"blur"`` (RISE) or ``"zeros"``.
        faithfulness_batch_size: images per scoring call of the curves.
        box_connectivity: 8- or 4-connected components of the thresholded map
            (:func:`~regionembed.boxes.maps_to_boxes`).
        every_component: every component is a candidate box and the one that best matches the ground truth counts
            (VL-Score's authors' protocol) instead of ``box_mode``'s one box.

    ``compute()`` keys: ``gt_known_loc``, ``top{k}_loc``, ``box_iou``, ``maxboxacc_v2``, ``maxboxacc@{30,50,70}``,
    ``map_miou``, ``map_dice``, ``pointing_game``, ``energy_pointing_game``, ``not_present``, ``ms_per_map``, and
    with faithfulness ``deletion_auc``, ``insertion_auc``, ``contrastive_gap``, ``target_drop``,
    ``contrast_drop``.
    """

    def __init__(
        self,
        threshold: float = 0.6,
        min_area: float = 0.0,
        box_mode: BoxMode = "largest",
        iou_threshold: float = 0.5,
        top_k: Sequence[int] = (1, 5),
        cam_thresholds: Sequence[float] | None = None,
        map_threshold: float = 0.5,
        faithfulness: bool = True,
        faithfulness_steps: int = 16,
        deletion_baseline: str = "zeros",
        insertion_baseline: str = "blur",
        faithfulness_batch_size: int = 64,
        box_connectivity: int = 8,
        every_component: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if faithfulness_steps < 1:
            raise ValueError(f"faithfulness_steps must be >= 1, got {faithfulness_steps}")
        self.threshold, self.min_area, self.box_mode = threshold, min_area, box_mode
        self.box_connectivity, self.every_component = box_connectivity, every_component
        self.faithfulness = faithfulness
        self.faithfulness_steps = faithfulness_steps
        self.deletion_baseline, self.insertion_baseline = deletion_baseline, insertion_baseline
        self.faithfulness_batch_size = faithfulness_batch_size
        metrics: dict[str, nn.Module] = {
            "boxloc": BoxLocalization(iou_threshold=iou_threshold, top_k=top_k),
            "box_iou": CatMetric(),
            "maxboxacc": MaxBoxAccV2(cam_thresholds=cam_thresholds),
            "agreement": MapMaskAgreement(threshold=map_threshold),
            "not_present": MeanMetric(),
            "ms_per_map": MeanMetric(),
        }
        if faithfulness:
            metrics["deletion_auc"] = DeletionInsertionAUC()
            metrics["insertion_auc"] = DeletionInsertionAUC()
            metrics["contrastive"] = ContrastiveDeletionGap()
        self.metrics = nn.ModuleDict(metrics)

    def update(
        self,
        image: torch.Tensor,
        maps: torch.Tensor,
        present: torch.Tensor,
        queries: LocalizationQueries,
        seconds_per_map: float,
        contrast_maps: torch.Tensor | None = None,
        contrast_valid: torch.Tensor | None = None,
        class_scores: ClassScoreFn | None = None,
    ) -> None:
        """Score the maps of the ``Q`` queries of one image.

        Args:
            image: ``[1, 3, S, S]`` the image (normalised as the model expects).
            maps: ``[Q, h, w]`` maps in [0, 1], one per query (resized to ``S`` here when they differ).
            present: ``[Q]`` bool, False where the explainer declared the target absent.
            queries: the image's queries (:func:`localization_queries`).
            seconds_per_map: wall time of the explainer call divided by the maps it returned.
            contrast_maps: ``[Q, h, w]`` the maps of each query's contrast class (for the contrastive gap).
            contrast_valid: ``[Q]`` bool, queries whose contrastive gap is taken (default
                ``queries.contrast_valid``).
            class_scores: ``images [M, 3, S, S] -> [M, C]`` class scores for the faithfulness curves (needed when
                ``faithfulness`` is on).
        """
        size = image.shape[-2:]
        if maps.shape[-2:] != size:  # explainers give image-size maps; resize any that do not
            maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)
            if contrast_maps is not None:
                contrast_maps = F.interpolate(contrast_maps[:, None], size=size, mode="bilinear")[:, 0].clamp(0, 1)
        present = present.to(device=maps.device, dtype=torch.bool)
        m = self.metrics
        mode = "all" if self.every_component else self.box_mode
        found = maps_to_boxes(maps, self.threshold, self.min_area, mode, connectivity=self.box_connectivity)
        boxes = []
        for result, ok, gt in zip(found, present.tolist(), queries.boxes, strict=True):
            if not ok or len(result.boxes) == 0:  # no component, or an absent target: IoU 0 with everything
                boxes.append(empty_box(maps.device))
            elif self.every_component:  # the candidate that best matches the ground truth
                best = int(torch.argmax(best_box_iou(result.boxes, [gt] * len(result.boxes))))
                boxes.append(result.boxes[best : best + 1])
            else:
                boxes.append(result.boxes[:1])
        boxes = torch.cat(boxes)
        m["boxloc"].update(boxes, queries.boxes, queries.topk, queries.classes)
        m["box_iou"].update(best_box_iou(boxes, queries.boxes).float())
        # an absent target's MaxBoxAccV2 map is all zeros (at threshold 0: the whole image as one box)
        m["maxboxacc"].update(maps * present[:, None, None], queries.boxes)
        m["agreement"].update(maps, queries.masks, present)
        m["not_present"].update((~present).float())
        m["ms_per_map"].update(torch.tensor(1000 * seconds_per_map), weight=maps.shape[0])
        if not self.faithfulness:
            return
        if class_scores is None:
            raise ValueError("faithfulness needs class_scores (images -> class scores)")
        steps, batch = self.faithfulness_steps, self.faithfulness_batch_size
        for key, mode, baseline in (
            ("deletion_auc", "deletion", self.deletion_baseline),
            ("insertion_auc", "insertion", self.insertion_baseline),
        ):
            curves, _ = class_score_curves(class_scores, image, maps, queries.classes, mode, baseline, steps, batch)
            m[key].update(curves)
        valid = queries.contrast_valid if contrast_valid is None else contrast_valid
        if contrast_maps is None or not bool(valid.any()):
            return
        curve_a, curve_b = class_score_curves(
            class_scores,
            image,
            maps[valid] - contrast_maps[valid],
            queries.classes[valid],
            "deletion",
            self.deletion_baseline,
            steps,
            batch,
            also=queries.contrast[valid],
        )
        m["contrastive"].update(curve_a, curve_b)

    def compute(self) -> dict[str, float]:
        """Every metric as a float (a collective under DDP: every rank must call it)."""
        out: dict[str, float] = {}
        for key, metric in self.metrics.items():
            value: Any = metric.compute()
            if key == "box_iou":
                values = value if isinstance(value, torch.Tensor) else torch.zeros(0)
                out[key] = float(values.double().mean()) if values.numel() else math.nan
            elif isinstance(value, dict):
                out.update({k: float(v) for k, v in value.items()})
            else:
                out[key] = float(value)
        return out

    def reset(self) -> None:
        """Forget every update."""
        for metric in self.metrics.values():
            metric.reset()
