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
* **MaskInversion** (``mask_inversion``): the explanation of a region is the final map of its optimised token
  (the solver's ``maps``: its explainer's, LeGrad by default), computed *from the ground-truth mask of the query*.
  Its localization numbers therefore measure how well the token's map reproduces the mask it was fitted to, not
  detection; its contrastive gap uses the MaskInversion map of ``b``'s mask and is taken only when ``b`` is present
  in the image.
* **"Not present".** An explainer may say that a target is absent from an image (VL-Score keeps no channel):
  :meth:`~regionembed.explainers.Explainer.explain_with_presence` returns ``present`` ``[B]`` bool with the maps.
  Such maps count as misses everywhere: no box (IoU 0), a pointing-game miss, IoU/Dice/energy 0, and the fraction is
  reported as ``not_present``. Their faithfulness curves are still computed on the (constant) map.
* **Time per map**: wall time of the explainer (or solver) call divided by the maps it returned, in the same run.

The evaluation itself (queries, boxes, every metric, the faithfulness curves) is library code:
:class:`~regionembed.metrics.ExplainerLocalization` and :func:`~regionembed.metrics.localization_queries`; this
module wires them, the explainers and the backbone's class scores to the test loop.

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

from ..backbones.base import Backbone
from ..boxes import BoxMode
from ..explainers import Explainer, LeGrad
from ..explainers.mask_inversion import MaskInversionMaps
from ..grad_mode import require_grad_mode
from ..io import save_json
from ..metrics import ExplainerLocalization, RegionAccuracy, localization_queries
from ..text import DEFAULT_TEMPLATES, TextEmbeddingCache

# MaskInversionMaps lives in regionembed.explainers; it stays importable from here (its first home)
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


#: the module's arguments that configure each explainer's ExplainerLocalization as they are
_EVALUATOR_ARGS = (
    "threshold",
    "min_area",
    "box_mode",
    "iou_threshold",
    "cam_thresholds",
    "map_threshold",
    "faithfulness",
    "faithfulness_steps",
    "deletion_baseline",
    "insertion_baseline",
    "faithfulness_batch_size",
)


def _explainer_name(explainer: Any) -> str:
    return str(getattr(explainer, "name", None) or type(explainer).__name__.lower())


class LocalizationModule(L.LightningModule):
    """Zero-shot localization, map/mask agreement and faithfulness of explainers (see the module docstring).

    Batches come from the shared region data modules (``collate_regions_batch``): ``image`` ``[B, 3, S, S]``,
    ``masks`` ``[sum N, S, S]``, ``boxes`` ``[sum N, 4]`` xyxy, ``labels`` ``[sum N]``, ``region_batch_index``.

    Args:
        backbone: the model (frozen here).
        explainers: explainers to compare (by class path in YAML); default: LeGrad on the last block.
        mask_inversion: also evaluate MaskInversion's maps of the ground-truth masks (``None``: not); its ``solver``
            holds every MaskInversion setting.
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
        if mask_inversion is not None:
            mask_inversion.solver.check(self.backbone)
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
        self.text_cache = TextEmbeddingCache(self.templates)

    @property
    def method_names(self) -> list[str]:
        """Every evaluated method: the explainers, then ``mask_inversion`` when enabled."""
        return [*self.explainers, *([self.mask_inversion.name] if self.mask_inversion is not None else [])]

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def _evaluator(self, name: str) -> ExplainerLocalization:
        # an explainer may carry its own box protocol (VLScoreAuthors: 4-connected, every component a candidate)
        explainer = self.explainers.get(name)
        return ExplainerLocalization(
            top_k=self.top_k,
            box_connectivity=int(getattr(explainer, "box_connectivity", 8)),
            every_component=bool(getattr(explainer, "every_component", False)),
            **{k: self.hparams[k] for k in _EVALUATOR_ARGS},
        )

    def setup(self, stage: str) -> None:
        if self.class_names is None:
            datamodule = self.trainer.datamodule if self._trainer is not None else None
            self.class_names = list(getattr(datamodule, "class_names", None) or [])
            if not self.class_names:
                raise ValueError("LocalizationModule needs class_names (or a data module that has them)")
        self.metrics = torch.nn.ModuleDict({name: self._evaluator(name) for name in self.method_names})
        self.classification = RegionAccuracy(num_classes=len(self.class_names), top_k=self.top_k)

    def text_embeddings(self) -> torch.Tensor:
        """``[C, D]`` normalised class prompt embeddings (template-averaged), cached per device."""
        return self.text_cache(self.backbone, self.class_names, self.device)

    @torch.no_grad()
    def class_scores(self, images: torch.Tensor) -> torch.Tensor:
        """``[M, C]`` scores of ``images`` ``[M, 3, S, S]``: probabilities or cosines (``faithfulness_score``)."""
        emb = F.normalize(self.backbone.encode_image(images), dim=-1)
        cos = emb @ self.text_embeddings().T
        if self.hparams.faithfulness_score == "cosine":
            return cos
        return (self.backbone.logit_scale.exp() * cos).softmax(-1)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        require_grad_mode("the localization evaluation (gradient explainers, MaskInversion)")
        text = self.text_embeddings()
        images = batch["image"]
        with torch.no_grad():
            emb = F.normalize(self.backbone.encode_image(images), dim=-1)
        logits = self.backbone.logit_scale.exp() * emb @ text.T  # [B, C]
        for b in range(images.shape[0]):
            keep = batch["region_batch_index"] == b
            if not bool(keep.any()):
                continue
            masks, boxes = batch["masks"][keep] > 0.5, batch["boxes"][keep]
            query = localization_queries(logits[b], batch["labels"][keep], masks, boxes, self.top_k)
            self.classification.update(query.logits, query.classes)
            image = images[b : b + 1]
            classes, contrast = query.classes, query.contrast
            # explain every present class once; a contrast class that is not present is explained in addition
            extra = contrast[~query.contrast_in_image & query.contrast_valid].unique()
            targets = torch.cat([classes, extra])
            row = {int(cls): i for i, cls in enumerate(targets.tolist())}
            contrast_index = torch.tensor([row.get(int(cls), 0) for cls in contrast], device=targets.device)
            q = classes.numel()
            for name, explainer in self.explainers.items():
                start = time.perf_counter()
                maps, present = explainer.explain_with_presence(self.backbone, image, text[targets])
                seconds = (time.perf_counter() - start) / targets.numel()
                maps = maps.detach()
                self.metrics[name].update(
                    image,
                    maps[:q],
                    present[:q],
                    query,
                    seconds,
                    contrast_maps=maps[contrast_index],
                    class_scores=self.class_scores,
                )
            if self.mask_inversion is not None:
                start = time.perf_counter()
                maps = self.mask_inversion(self.backbone, image, query.masks.float()).detach()
                seconds = (time.perf_counter() - start) / q
                q_index = {int(cls): i for i, cls in enumerate(classes.tolist())}
                contrast_maps = maps[torch.tensor([q_index.get(int(cls), 0) for cls in contrast], device=maps.device)]
                self.metrics[self.mask_inversion.name].update(
                    image,
                    maps,
                    torch.ones(q, dtype=torch.bool, device=maps.device),
                    query,
                    seconds,
                    contrast_maps=contrast_maps,
                    contrast_valid=query.contrast_in_image,  # its contrast map needs the contrast class's mask
                    class_scores=self.class_scores,
                )

    def on_test_epoch_end(self) -> None:
        with self.classification.sync_context():  # collective: every rank takes part
            num_queries = int(self.classification.count.sum())
        self.results = {}
        for name in self.method_names:
            self.results[name] = self.metrics[name].compute()
            self.metrics[name].reset()
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
