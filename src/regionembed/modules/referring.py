"""Zero-shot referring-expression comprehension: every region embedding method ranks the image's candidate regions."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import SumMetric

from ..backbones.base import Backbone
from ..grad_mode import require_grad_mode
from ..io import save_json
from ..metrics import ReferringAccuracy
from ..metrics.functional import referring_accuracy
from ..referring import MATCHES, Match, answer_targets, candidate_scores, comprehend
from ..regions import RegionEmbedder
from ..text import TextEmbeddingCache
from .base import RegionMethodsModule
from .region_classification import comparison_table

__all__ = ["ReferringModule"]

log = logging.getLogger(__name__)


def _image_groups(batch: dict[str, Any], items: list[int]) -> list[list[int]]:
    """Items of the batch that show the same image with the same candidates (one embedding pass serves them all)."""
    index = batch["region_batch_index"]
    groups: dict[str, list[list[int]]] = {}
    for b in items:
        same = groups.setdefault(str(batch["image_ids"][b]), [])
        for group in same:
            a = group[0]
            if torch.equal(batch["image"][a], batch["image"][b]) and torch.equal(
                batch["masks"][index == a], batch["masks"][index == b]
            ):
                group.append(b)
                break
        else:
            same.append([b])
    return [g for gs in groups.values() for g in gs]


class ReferringModule(RegionMethodsModule):
    """Referring-expression comprehension (REC) by ranking every candidate region of the image, per method.

    For each expression, every candidate region of its image (the image's instance masks) is embedded by each region
    method, the expression by the text tower, and the candidate with the highest cosine is the answer
    (:mod:`regionembed.referring`); :class:`~regionembed.metrics.ReferringAccuracy` scores the answers of each
    method. Candidates are embedded once per image and method for all of that image's expressions in a batch.

    Batches come from the referring data modules (``RefCocoDataModule``, ``SyntheticReferringDataModule``;
    ``collate_regions_batch``): ``image`` ``[B, 3, S, S]``, ``masks`` ``[sum N, S, S]`` (the candidates),
    ``boxes`` ``[sum N, 4]``, ``region_batch_index``, ``text`` (B expressions), ``target_index`` ``[B]`` (the
    referred candidate among its image's, ``-1`` when a crop removed it: such expressions are skipped and counted).

    Logged (the dashboard contract): ``test/<method>/ref_acc``, ``test/<method>/ref_miou`` (not with
    ``match="index"``), ``test/expressions``, ``test/skipped_expressions``; with ``kinds``,
    ``test/<method>/<kind>/ref_acc`` and ``test/<method>/<kind>/ref_miou``.

    Args:
        backbone: the model (frozen here); its text tower encodes the expressions.
        methods: region embedding methods to compare; default: global and MaskInversion.
        templates: templates averaged per expression (default ``["{}"]``: the expression as it is).
        match: how an answer is scored (:func:`regionembed.referring.answer_targets`): ``"box"`` (IoU > threshold
            of the chosen and the referred candidate's boxes, RefCOCO's Acc@0.5), ``"mask"`` or ``"index"``.
        iou_threshold: IoU a box/mask answer must exceed.
        kinds: also score these expression kinds apart (the batch's per-expression ``kind``, e.g. the synthetic
            world's ``attribute``, ``size``, ``ordinal``, ``relation``); logged as ``test/<method>/<kind>/ref_acc``
            and ``.../ref_miou``.
        results_path: also write the results as JSON there (rank zero, atomic).
    """

    def __init__(
        self,
        backbone: Backbone,
        methods: list[RegionEmbedder] | None = None,
        templates: list[str] | None = None,
        match: Match = "box",
        iou_threshold: float = 0.5,
        kinds: list[str] | None = None,
        results_path: str | None = None,
    ) -> None:
        super().__init__(backbone, methods)
        self.save_hyperparameters(ignore=["backbone", "methods"])
        if match not in MATCHES:
            raise ValueError(f"unknown match {match!r}; choose from {list(MATCHES)}")
        if not 0 <= iou_threshold < 1:
            raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
        names = [m.name for m in self.methods]
        self.text_cache = TextEmbeddingCache(templates or ["{}"], max_size=50_000)
        self.metrics = torch.nn.ModuleDict({n: ReferringAccuracy(iou_threshold=iou_threshold) for n in names})
        self.counts = torch.nn.ModuleDict(
            {"expressions": SumMetric(), "skipped_expressions": SumMetric(), "chance_hits": SumMetric()}
        )
        self.kinds = list(dict.fromkeys(kinds or []))
        self.kind_metrics = torch.nn.ModuleDict(
            {
                n: torch.nn.ModuleDict({k: ReferringAccuracy(iou_threshold=iou_threshold) for k in self.kinds})
                for n in names
            }
        )
        self.results: dict[str, dict[str, float]] = {}
        self.results_by_kind: dict[str, dict[str, dict[str, float]]] = {}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        require_grad_mode("referring expression comprehension (MaskInversion)")
        if "text" not in batch or "target_index" not in batch:
            raise ValueError(
                "ReferringModule needs referring batches (per image `text` and `target_index`): use "
                "RefCocoDataModule or SyntheticReferringDataModule"
            )
        if self.kinds and "kind" not in batch:
            raise ValueError("`kinds` needs batches with a per-expression `kind` (SyntheticReferringDataModule)")
        index, targets, num = batch["region_batch_index"], batch["target_index"], batch["num_regions"]
        items = [b for b in range(len(targets)) if 0 <= int(targets[b]) < int(num[b])]
        skipped = len(targets) - len(items)
        self.counts["expressions"].update(torch.tensor(float(len(items)), device=self.device))
        self.counts["skipped_expressions"].update(torch.tensor(float(skipped), device=self.device))
        if not items:
            return
        for group in _image_groups(batch, items):
            first = group[0]
            keep = index == first
            candidates, boxes = batch["masks"][keep], batch["boxes"][keep]
            expressions = self.text_cache(self.backbone, [batch["text"][b] for b in group], self.device)
            target = targets[group].to(self.device)
            self.counts["chance_hits"].update(self._chance_hits(target, boxes, candidates))
            for method in self.methods:
                chosen = comprehend(
                    candidate_scores(method, self.backbone, batch["image"][first], candidates, expressions)
                )
                pred, truth = answer_targets(chosen, target, boxes, candidates, self.hparams.match)
                self.metrics[method.name].update(pred, truth)
                for kind, metric in self.kind_metrics[method.name].items():
                    rows = [i for i, b in enumerate(group) if batch["kind"][b] == kind]
                    if rows:
                        metric.update(pred[rows], truth[rows])

    def _chance_hits(self, target: torch.Tensor, boxes: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Expected hits of a uniformly random choice among the candidates, summed over the expressions."""
        n = len(candidates)
        every = torch.arange(n, device=target.device)
        total = torch.zeros((), dtype=torch.float64, device=target.device)
        for t in target:
            pred, truth = answer_targets(every, t.expand(n), boxes, candidates, self.hparams.match)
            total += referring_accuracy(pred, truth, self.hparams.iou_threshold)["ref_acc"].double()
        return total

    def on_test_epoch_end(self) -> None:
        counts = {k: int(v.compute()) for k, v in self.counts.items() if k != "chance_hits"}
        chance = float(self.counts["chance_hits"].compute()) / max(1, counts["expressions"])
        self.results = {}
        for name, metric in self.metrics.items():
            values = {k: float(v) for k, v in metric.compute().items()}
            self.results[name] = {k: v for k, v in values.items() if not math.isnan(v) or k == "ref_acc"}
            for key, value in self.results[name].items():
                self.log(f"test/{name}/{key}", value, rank_zero_only=True)
            metric.reset()
        self.results_by_kind = {}
        for name, metrics in self.kind_metrics.items():
            self.results_by_kind[name] = {}
            for kind, metric in metrics.items():
                values = {k: float(v) for k, v in metric.compute().items()}  # NaN for a kind without expressions
                self.results_by_kind[name][kind] = values
                for key, value in values.items():
                    if not math.isnan(value):
                        self.log(f"test/{name}/{kind}/{key}", value, rank_zero_only=True)
                metric.reset()
        for key, value in counts.items():
            self.log(f"test/{key}", float(value), rank_zero_only=True)
        for metric in self.counts.values():
            metric.reset()
        if counts["skipped_expressions"]:
            log.warning(
                "%d expressions were skipped: their referred region was cropped away", counts["skipped_expressions"]
            )
        rank_zero_info(
            f"\nReferring expression comprehension (%, {counts['expressions']} expressions, "
            f"match: {self.hparams.match}; a uniformly random candidate scores {100 * chance:.1f}):\n"
            + comparison_table(self.results)
        )
        if self.kinds:
            by_kind = {n: {k: v["ref_acc"] for k, v in row.items()} for n, row in self.results_by_kind.items()}
            rank_zero_info("\nAccuracy by expression kind (%):\n" + comparison_table(by_kind))
        if self.hparams.results_path and self.trainer.is_global_zero:
            save_json(
                {
                    "match": self.hparams.match,
                    "iou_threshold": self.hparams.iou_threshold,
                    **counts,
                    "chance_ref_acc": chance,
                    "results": self.results,
                    "by_kind": self.results_by_kind,
                },
                self.hparams.results_path,
            )
