"""Zero-shot localization and faithfulness of every explainer, scored by the same evaluators in one test loop.

Protocol (one *query* per image and ground-truth class present in it):

* **Classification.** The image's global embedding is compared with the class prompt embeddings
  (:func:`regionembed.text.encode_prompts`). For a query of class ``c`` the *other* classes present in the image are
  removed from the ranking, so ``c`` is "top-1" when it beats every absent class (multi-label images; with one class
  per image, as ImageNet, this is the usual single-label protocol).
* **Maps.** Each explainer explains the prompt embedding of ``c`` on the image (the "GT-known" map).
* **GT-known Loc / Top-k Loc** (``BoxLocalization``): the map's box (:func:`regionembed.boxes.maps_to_boxes`) must
  reach ``IoU >= iou_threshold`` with *any* ground-truth box of class ``c`` in the image; Top-k Loc also needs ``c``
  in the top ``k``. The WSOL protocol boxes the map of the *predicted* class; when the prediction is right that map
  is the GT-known map, and when it is wrong the sample is a miss whatever the box, so one map per query suffices.
* **MaxBoxAccV2** over ``cam_thresholds``, and **map/mask agreement** (``MapMaskAgreement``: IoU of the map
  thresholded at ``map_threshold``, soft Dice, pointing game, energy pointing game) with the union of the masks of
  class ``c`` (for box data sets the masks are the filled boxes).
* **Faithfulness** (RISE): deletion AUC (baseline ``deletion_baseline``, lower is better) and insertion AUC
  (``insertion_baseline``, higher is better) of class ``c``'s score along the map, and the **contrastive gap**
  ("why ``c`` and not ``b``", :class:`~regionembed.metrics.ContrastiveDeletionGap`): deletion along ``map_c - map_b``
  scored for both classes, ``b`` being the highest-ranked *other class present* in the image, else the
  highest-ranked absent class. The score is the softmax probability over the class prompts (``"probability"``,
  RISE's class probability) or the raw cosine (``"cosine"``).
* **MaskInversion** (``mask_inversion``): the explanation of a region is the final LeGrad map of its optimised token
  (the solver's ``maps``), computed *from the ground-truth mask of the query*. Its localization numbers therefore
  measure how well the token's map reproduces the mask it was fitted to, not detection; its contrastive gap uses
  the MaskInversion map of ``b``'s mask and is taken only when ``b`` is present in the image.
* **"Not present".** An explainer may say that a target is absent from an image (VL-Score keeps no channel): it sets
  ``last_present`` (``[B]`` bool, one per map of its last call). Such maps count as misses everywhere: no box (IoU
  0), a pointing-game miss, IoU/Dice/energy 0, and the fraction is reported as ``not_present``. Their faithfulness
  curves are still computed on the (constant) map.
* **Time per map**: wall time of the explainer (or solver) call divided by the maps it returned, in the same run.

Logged scalars (the dashboard contract; ``<explainer>`` is the explainer's ``name``, default the lower-case class
name, e.g. ``legrad``; fractions in [0, 1]): ``test/<explainer>/{gt_known_loc, top1_loc, top5_loc, box_iou,
maxboxacc_v2, maxboxacc@30, maxboxacc@50, maxboxacc@70, map_miou, map_dice, pointing_game, energy_pointing_game,
deletion_auc, insertion_auc, contrastive_gap, target_drop, contrast_drop, not_present, ms_per_map}`` and
``test/classification/{top1, top5, mean_class_top1, mean_class_top5}`` (the query classification above). The
faithfulness keys are absent with ``faithfulness=False``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric
from torchmetrics.aggregation import CatMetric

from ..backbones.base import Backbone
from ..boxes import BoxMode, empty_box, maps_to_boxes
from ..explainers import Explainer, LeGrad
from ..inversion import MaskInversion
from ..io import save_json
from ..metrics import (
    BoxLocalization,
    ContrastiveDeletionGap,
    DeletionInsertionAUC,
    MapMaskAgreement,
    MaxBoxAccV2,
    RegionAccuracy,
    deletion_insertion_curves,
)
from ..metrics.functional import best_box_iou
from ..regions import MaskInversionEmbedding
from ..text import DEFAULT_TEMPLATES, encode_prompts
from .mask_inversion import require_grad_mode

__all__ = ["FAITHFULNESS_KEYS", "LOCALIZATION_KEYS", "LocalizationModule", "MaskInversionMaps", "localization_table"]

log = logging.getLogger(__name__)

#: the columns of the two printed tables
LOCALIZATION_KEYS = (
    "gt_known_loc",
    "top1_loc",
    "top5_loc",
    "box_iou",
    "maxboxacc_v2",
    "maxboxacc@30",
    "maxboxacc@50",
    "maxboxacc@70",
    "map_miou",
    "map_dice",
    "pointing_game",
    "energy_pointing_game",
    "not_present",
)
#: keys shown as percentages in :func:`localization_table`; the others are in score units or milliseconds
PERCENT_KEYS = (*LOCALIZATION_KEYS, "top1", "top5", "mean_class_top1", "mean_class_top5")
FAITHFULNESS_KEYS = ("deletion_auc", "insertion_auc", "contrastive_gap", "target_drop", "contrast_drop", "ms_per_map")


def localization_table(results: dict[str, dict[str, float]], keys: Sequence[str] | None = None) -> str:
    """Markdown table of ``{explainer: {metric: value}}``: fractions as percentages, AUCs/gaps in score units."""
    keys = list(keys) if keys is not None else list(dict.fromkeys(k for r in results.values() for k in r))
    lines = ["| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, row in results.items():
        cells = []
        for key in keys:
            value = row.get(key, math.nan)
            if key in PERCENT_KEYS:
                cells.append(f"{100 * value:.1f}")
            elif key == "ms_per_map":
                cells.append(f"{value:.1f}")
            else:
                cells.append(f"{value:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class MaskInversionMaps(MaskInversionEmbedding):
    """MaskInversion as an explainer of region masks: the final LeGrad maps of the optimised tokens.

    ``maps(backbone, image [1, 3, S, S], masks [N, S, S]) -> [N, S, S]``. Unlike the text-driven explainers it needs
    the region mask (see the module docstring for what its localization numbers mean).

    Args: those of :class:`~regionembed.regions.MaskInversionEmbedding` (the solver's, official defaults).
    """

    def __call__(self, backbone: Backbone, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return MaskInversion(backbone, explainer=self.explainer, **self.config)(image, masks).maps

    def __repr__(self) -> str:
        return f"MaskInversionMaps({self.config})"


def _explainer_name(explainer: Any) -> str:
    return str(getattr(explainer, "name", None) or type(explainer).__name__.lower())


class LocalizationModule(L.LightningModule):
    """Zero-shot localization, map/mask agreement and faithfulness of explainers (see the module docstring).

    Batches come from the shared region data modules (``collate_regions_batch``): ``image`` ``[B, 3, S, S]``,
    ``masks`` ``[sum N, S, S]``, ``boxes`` ``[sum N, 4]`` xyxy, ``labels`` ``[sum N]``, ``region_batch_index``.

    Args:
        backbone: the model (frozen here).
        explainers: explainers to compare (by class path in YAML); default: LeGrad on the last block.
        mask_inversion: also evaluate MaskInversion's maps of the ground-truth masks (``None``: not).
        class_names: class prompts in label order; default: the data module's ``class_names``.
        templates: prompt templates averaged per class.
        threshold: box threshold, a fraction of each map's maximum (:func:`~regionembed.boxes.maps_to_boxes`).
        min_area: drop map components smaller than this (below 1: fraction of the image, else pixels).
        box_mode: ``"largest"`` component, the highest-mass one of ``"all"``, or ``"merge"`` (union box).
        iou_threshold: box IoU for (GT-known / top-k) Loc.
        top_k: the ``k`` of Top-k Loc and of the classification accuracy.
        cam_thresholds: MaxBoxAccV2 map thresholds (default 0, 0.01, ..., 1).
        map_threshold: binarisation threshold of the maps for the mask IoU.
        faithfulness: compute deletion/insertion AUCs and the contrastive gap (costs ``3 (steps + 1)`` forward
            passes per map).
        faithfulness_steps: deletion/insertion steps ``S``.
        faithfulness_score: ``"probability"`` (softmax over the class prompts) or ``"cosine"``.
        deletion_baseline: ``"zeros"`` (the normalised mean colour), ``"blur"``.
        insertion_baseline: ``"blur"`` (RISE) or ``"zeros"``.
        faithfulness_batch_size: images per forward pass of the curves.
        results_path: also write the results as JSON there (rank zero, atomic).
    """

    def __init__(
        self,
        backbone: Backbone,
        explainers: list[Explainer] | None = None,
        mask_inversion: MaskInversionMaps | None = None,
        class_names: list[str] | None = None,
        templates: list[str] | None = None,
        threshold: float = 0.6,
        min_area: float = 0.0,
        box_mode: BoxMode = "largest",
        iou_threshold: float = 0.5,
        top_k: tuple[int, ...] = (1, 5),
        cam_thresholds: list[float] | None = None,
        map_threshold: float = 0.5,
        faithfulness: bool = True,
        faithfulness_steps: int = 16,
        faithfulness_score: Literal["probability", "cosine"] = "probability",
        deletion_baseline: Literal["zeros", "blur"] = "zeros",
        insertion_baseline: Literal["zeros", "blur"] = "blur",
        faithfulness_batch_size: int = 64,
        results_path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "explainers", "mask_inversion"])
        self.backbone = backbone.requires_grad_(False).eval()
        if explainers is None:
            explainers = [LeGrad()]
        self.explainers = {_explainer_name(e): e for e in explainers}
        if len(self.explainers) != len(explainers):
            raise ValueError(f"explainer names must be unique, got {[_explainer_name(e) for e in explainers]}")
        self.mask_inversion = mask_inversion
        if mask_inversion is not None and mask_inversion.name in self.explainers:
            raise ValueError(f"an explainer is already named {mask_inversion.name!r}")
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if faithfulness_score not in ("probability", "cosine"):
            raise ValueError(f"faithfulness_score must be 'probability' or 'cosine', got {faithfulness_score!r}")
        if faithfulness_steps < 1:
            raise ValueError(f"faithfulness_steps must be >= 1, got {faithfulness_steps}")
        self.top_k = tuple(int(k) for k in top_k)
        self.class_names = list(class_names) if class_names else None
        self.templates = list(templates or DEFAULT_TEMPLATES)
        self.metrics: torch.nn.ModuleDict | None = None
        self.results: dict[str, dict[str, float]] = {}
        self._text: torch.Tensor | None = None

    @property
    def method_names(self) -> list[str]:
        """Every evaluated method: the explainers, then ``mask_inversion`` when enabled."""
        return [*self.explainers, *([self.mask_inversion.name] if self.mask_inversion is not None else [])]

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def _method_metrics(self) -> torch.nn.ModuleDict:
        hp = self.hparams
        metrics = {
            "boxloc": BoxLocalization(iou_threshold=hp.iou_threshold, top_k=self.top_k),
            "box_iou": CatMetric(),
            "maxboxacc": MaxBoxAccV2(cam_thresholds=hp.cam_thresholds),
            "agreement": MapMaskAgreement(threshold=hp.map_threshold),
            "not_present": MeanMetric(),
            "ms_per_map": MeanMetric(),
        }
        if hp.faithfulness:
            metrics["deletion_auc"] = DeletionInsertionAUC()
            metrics["insertion_auc"] = DeletionInsertionAUC()
            metrics["contrastive"] = ContrastiveDeletionGap()
        return torch.nn.ModuleDict(metrics)

    def setup(self, stage: str) -> None:
        if self.class_names is None:
            datamodule = self.trainer.datamodule if self._trainer is not None else None
            self.class_names = list(getattr(datamodule, "class_names", None) or [])
            if not self.class_names:
                raise ValueError("LocalizationModule needs class_names (or a data module that has them)")
        self.metrics = torch.nn.ModuleDict({name: self._method_metrics() for name in self.method_names})
        self.classification = RegionAccuracy(num_classes=len(self.class_names), top_k=self.top_k)

    def text_embeddings(self) -> torch.Tensor:
        """``[C, D]`` normalised class prompt embeddings (template-averaged), cached per device."""
        if self._text is None or self._text.device != self.device:
            self._text = encode_prompts(self.backbone, self.class_names, self.templates, device=self.device)
        return self._text

    @torch.no_grad()
    def class_scores(self, images: torch.Tensor) -> torch.Tensor:
        """``[M, C]`` scores of ``images`` ``[M, 3, S, S]``: probabilities or cosines (``faithfulness_score``)."""
        emb = F.normalize(self.backbone.encode_image(images), dim=-1)
        cos = emb @ self.text_embeddings().T
        if self.hparams.faithfulness_score == "cosine":
            return cos
        return (self.backbone.logit_scale.exp() * cos).softmax(-1)

    def _curves(
        self,
        image: torch.Tensor,
        maps: torch.Tensor,
        classes: torch.Tensor,
        mode: str,
        baseline: str,
        also: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Deletion/insertion curves ``[Q, S + 1]`` of the scores of ``classes`` ``[Q]`` along ``maps``.

        With ``also`` (``[Q]`` classes), the curves of those classes on the *same* perturbed images come second
        (the contrastive gap scores two classes along one map: one pass over the images instead of two).
        """
        hp = self.hparams
        rows: list[torch.Tensor] = []

        def score(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            scores = self.class_scores(x)  # [M, C]
            if also is not None:
                rows.append(scores.gather(1, also[index][:, None])[:, 0])
            return scores.gather(1, classes[index][:, None])[:, 0]

        curves = deletion_insertion_curves(
            score,
            image.expand(maps.shape[0], -1, -1, -1),
            maps,
            steps=hp.faithfulness_steps,
            mode=mode,
            baseline=baseline,
            batch_size=hp.faithfulness_batch_size,
        )
        # score_fn is called on consecutive chunks of the flattened (sample, step) order: rows concatenate back
        second = torch.cat(rows).view_as(curves).to(curves.dtype) if also is not None else None
        return curves, second

    def _update(
        self,
        name: str,
        image: torch.Tensor,
        maps: torch.Tensor,
        contrast_maps: torch.Tensor | None,
        present: torch.Tensor,
        query: dict[str, Any],
        seconds_per_map: float,
    ) -> None:
        """Score the maps ``[Q, S, S]`` of the ``Q`` queries of one image with every metric of ``name``."""
        metrics = self.metrics[name]
        size = image.shape[-2:]
        if maps.shape[-2:] != size:  # explainers give image-size maps; resize any that do not
            maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)
            if contrast_maps is not None:
                contrast_maps = F.interpolate(contrast_maps[:, None], size=size, mode="bilinear")[:, 0].clamp(0, 1)
        absent = ~present
        boxes = []
        # An explainer may carry its own box protocol (e.g. VLScoreAuthors: 4-connected, every component a box).
        explainer = self.explainers.get(name)
        every = bool(getattr(explainer, "every_component", False))
        found = maps_to_boxes(
            maps,
            self.hparams.threshold,
            self.hparams.min_area,
            "all" if every else self.hparams.box_mode,
            connectivity=int(getattr(explainer, "box_connectivity", 8)),
        )
        gt_boxes, gt_masks, classes = query["boxes"], query["masks"], query["classes"]
        for i, (result, miss) in enumerate(zip(found, absent.tolist(), strict=True)):
            # no component (or an absent target): a zero-area box, IoU 0 with everything, i.e. a miss
            if miss or len(result.boxes) == 0:
                boxes.append(empty_box(maps.device))
            elif every:  # every component is a candidate: the one that best matches the ground truth
                ious = best_box_iou(result.boxes, [gt_boxes[i]] * len(result.boxes))
                best = int(torch.argmax(ious))
                boxes.append(result.boxes[best : best + 1])
            else:
                boxes.append(result.boxes[:1])
        boxes = torch.cat(boxes)
        metrics["boxloc"].update(boxes, gt_boxes, query["topk"], classes)
        metrics["box_iou"].update(best_box_iou(boxes, gt_boxes).float())
        scored = maps
        if bool(absent.any()):
            # an absent target localises nothing: a map whose only non-zero pixel lies outside the mask scores 0
            # IoU/Dice/energy and a pointing miss; its MaxBoxAccV2 map is all zeros (at threshold 0 the whole image)
            rows = torch.nonzero(absent)[:, 0]
            mba_maps = maps.clone()
            mba_maps[rows] = 0
            scored = mba_maps.clone()
            outside = (~gt_masks[rows]).flatten(1).float().argmax(1)  # the first pixel outside the mask
            scored.view(scored.shape[0], -1)[rows, outside] = 1.0
        else:
            mba_maps = maps
        metrics["maxboxacc"].update(mba_maps, gt_boxes)
        metrics["agreement"].update(scored, gt_masks)
        metrics["not_present"].update(absent.float())
        metrics["ms_per_map"].update(torch.tensor(1000 * seconds_per_map), weight=maps.shape[0])
        if not self.hparams.faithfulness:
            return
        hp = self.hparams
        metrics["deletion_auc"].update(self._curves(image, maps, classes, "deletion", hp.deletion_baseline)[0])
        metrics["insertion_auc"].update(self._curves(image, maps, classes, "insertion", hp.insertion_baseline)[0])
        if contrast_maps is None:
            return
        valid = query["contrast_valid"]
        if not bool(valid.any()):
            return
        diff = maps[valid] - contrast_maps[valid]
        curve_a, curve_b = self._curves(
            image, diff, classes[valid], "deletion", hp.deletion_baseline, also=query["contrast"][valid]
        )
        metrics["contrastive"].update(curve_a, curve_b)

    def _queries(self, logits: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor):
        """One query per class present in an image: GT boxes/mask, masked top-k classes, contrast class."""
        classes = torch.unique(labels, sorted=True)
        q, c = classes.numel(), logits.numel()
        present = torch.zeros(c, dtype=torch.bool, device=logits.device)
        present[classes] = True
        # rank each query's class among itself and the absent classes (other present classes are not errors)
        others = present[None].expand(q, c).clone()
        others[torch.arange(q), classes] = False
        floor = logits.min() - 1  # finite stand-in for -inf (RegionAccuracy rejects non-finite logits)
        q_logits = torch.where(others, floor, logits[None].expand(q, c))
        k = min(max(self.top_k), c)
        topk = q_logits.topk(k, dim=1).indices
        # contrast class: the best-scoring other present class, else the best-scoring absent class
        other_present = torch.where(others, logits[None], -math.inf)
        absent_logits = torch.where(present, -math.inf, logits)
        fallback = absent_logits.argmax() if bool((~present).any()) else classes[0]
        contrast = torch.where(others.any(1), other_present.argmax(1), fallback)
        in_image = present[contrast] & (contrast != classes)
        return {
            "classes": classes,
            "logits": q_logits,
            "topk": topk,
            "boxes": [boxes[labels == cls] for cls in classes],
            "masks": torch.stack([masks[labels == cls].any(0) for cls in classes]),
            "contrast": contrast,
            "contrast_in_image": in_image,
            "contrast_valid": contrast != classes,
        }

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        require_grad_mode()
        text = self.text_embeddings()
        images = batch["image"]
        with torch.no_grad():
            emb = F.normalize(self.backbone.encode_image(images), dim=-1)
        logits = self.backbone.logit_scale.exp() * emb @ text.T  # [B, C]
        for b in range(images.shape[0]):
            keep = batch["region_batch_index"] == b
            if not bool(keep.any()):
                continue
            query = self._queries(logits[b], batch["labels"][keep], batch["masks"][keep] > 0.5, batch["boxes"][keep])
            self.classification.update(query["logits"], query["classes"])
            image = images[b : b + 1]
            classes, contrast = query["classes"], query["contrast"]
            # explain every present class once; a contrast class that is not present is explained in addition
            extra = contrast[~query["contrast_in_image"] & query["contrast_valid"]].unique()
            targets = torch.cat([classes, extra])
            row = {int(cls): i for i, cls in enumerate(targets.tolist())}
            contrast_index = torch.tensor([row.get(int(cls), 0) for cls in contrast], device=targets.device)
            for name, explainer in self.explainers.items():
                start = time.perf_counter()
                maps = explainer(self.backbone, image, text[targets]).detach()
                seconds = (time.perf_counter() - start) / targets.numel()
                present = getattr(explainer, "last_present", None)
                present = (
                    torch.ones(targets.numel(), dtype=torch.bool, device=maps.device)
                    if present is None
                    else torch.as_tensor(present, device=maps.device).bool().reshape(-1)
                )
                q = classes.numel()
                self._update(name, image, maps[:q], maps[contrast_index], present[:q], query, seconds)
            if self.mask_inversion is not None:
                start = time.perf_counter()
                maps = self.mask_inversion(self.backbone, image, query["masks"].float()).detach()
                seconds = (time.perf_counter() - start) / classes.numel()
                q_index = {int(cls): i for i, cls in enumerate(classes.tolist())}
                mi_query = {**query, "contrast_valid": query["contrast_in_image"]}
                contrast_maps = maps[torch.tensor([q_index.get(int(cls), 0) for cls in contrast], device=maps.device)]
                present = torch.ones(classes.numel(), dtype=torch.bool, device=maps.device)
                self._update(self.mask_inversion.name, image, maps, contrast_maps, present, mi_query, seconds)

    def _compute(self, metrics: torch.nn.ModuleDict) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, metric in metrics.items():
            value = metric.compute()
            if key == "box_iou":
                values = value if isinstance(value, torch.Tensor) else torch.zeros(0)
                out[key] = float(values.double().mean()) if values.numel() else math.nan
            elif isinstance(value, dict):
                out.update({k: float(v) for k, v in value.items()})
            else:
                out[key] = float(value)
            metric.reset()
        return out

    def on_test_epoch_end(self) -> None:
        with self.classification.sync_context():  # collective: every rank takes part
            num_queries = int(self.classification.count.sum())
        self.results = {name: self._compute(self.metrics[name]) for name in self.method_names}
        cls = {k: float(v) for k, v in self.classification.compute().items()}
        self.classification.reset()
        for name, values in [*self.results.items(), ("classification", cls)]:
            for key, value in values.items():
                self.log(f"test/{name}/{key}", value, rank_zero_only=True)
        loc_keys = [k for k in LOCALIZATION_KEYS if any(k in r for r in self.results.values())]
        faith_keys = [k for k in FAITHFULNESS_KEYS if any(k in r for r in self.results.values())]
        rank_zero_info(
            "\nZero-shot localization (%):\n"
            + localization_table(self.results, loc_keys)
            + "\n\nFaithfulness (AUCs and gaps in score units) and time per map (ms):\n"
            + localization_table(self.results, faith_keys)
            + "\n\nQuery classification (%):\n"
            + localization_table({"classification": cls})
        )
        if self.hparams.results_path and self.trainer.is_global_zero:
            save_json(
                {
                    "class_names": self.class_names,
                    "protocol": {
                        k: v
                        for k, v in self.hparams.items()
                        if k not in ("results_path", "class_names") and not isinstance(v, torch.Tensor)
                    },
                    "num_queries": num_queries,
                    "classification": cls,
                    "results": self.results,
                },
                self.hparams.results_path,
            )

    def configure_optimizers(self):
        return None
