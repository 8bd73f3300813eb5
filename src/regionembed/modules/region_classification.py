"""Zero-shot region classification: every region embedding method scored by the same evaluator."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from ..backbones.base import Backbone
from ..grad_mode import require_grad_mode
from ..io import save_json
from ..metrics import IterationCurve, RegionAccuracy
from ..regions import RegionEmbedder
from ..text import DEFAULT_TEMPLATES, TextEmbeddingCache
from .base import RegionMethodsModule

__all__ = ["RegionClassificationModule", "comparison_table"]

log = logging.getLogger(__name__)


def comparison_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table of ``{method: {metric: value}}`` (values as percentages)."""
    metrics = sorted({k for r in results.values() for k in r})
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for method, row in results.items():
        lines.append(f"| {method} | " + " | ".join(f"{100 * row[m]:.1f}" for m in metrics) + " |")
    return "\n".join(lines)


class RegionClassificationModule(RegionMethodsModule):
    """Classify each region (mask) by the cosine of its embedding with class prompt embeddings, per method.

    Batches come from the shared region data modules (``collate_regions_batch``): ``image`` ``[B, 3, S, S]``,
    ``masks`` ``[sum N, S, S]``, ``labels`` ``[sum N]``, ``region_batch_index`` ``[sum N]``.

    Logged (the dashboard contract): ``test/<method>/top1``, ``test/<method>/top5``,
    ``test/<method>/mean_class_top1``, ``test/<method>/mean_class_top5``.

    Args:
        backbone: the model (frozen here).
        methods: region embedding methods to compare; default: global and MaskInversion.
        class_names: class prompts; by default taken from the data module's ``class_names``.
        templates: prompt templates averaged per class.
        results_path: also write ``{method: {metric: value}}`` there as JSON (rank zero, atomic).
        curves: for methods that optimise (MaskInversion: ``embed_history``), also record top-1 accuracy and the
            mean Dice loss at every iteration; printed, and written under ``"curves"`` in the results JSON
            (``{method: {"top1": [...], "dice": [...]}}``, index 0 = before the first step). Costs nothing extra:
            the history comes with the final embedding.
    """

    def __init__(
        self,
        backbone: Backbone,
        methods: list[RegionEmbedder] | None = None,
        class_names: list[str] | None = None,
        templates: list[str] | None = None,
        results_path: str | None = None,
        curves: bool = False,
    ) -> None:
        super().__init__(backbone, methods)
        self.save_hyperparameters(ignore=["backbone", "methods"])
        self.class_names = list(class_names) if class_names else None
        self.templates = list(templates or DEFAULT_TEMPLATES)
        self.metrics: torch.nn.ModuleDict | None = None
        self.results: dict[str, dict[str, float]] = {}
        self.text_cache = TextEmbeddingCache(self.templates)
        self.curves: dict[str, dict[str, list[float]]] = {}

    def setup(self, stage: str) -> None:
        if self.class_names is None:
            datamodule = self.trainer.datamodule if self._trainer is not None else None
            self.class_names = list(getattr(datamodule, "class_names", None) or [])
            if not self.class_names:
                raise ValueError("RegionClassificationModule needs class_names (or a data module that has them)")
        self.metrics = torch.nn.ModuleDict(
            {m.name: RegionAccuracy(num_classes=len(self.class_names), top_k=(1, 5)) for m in self.methods}
        )
        self.curve_metrics = torch.nn.ModuleDict(
            {
                m.name: IterationCurve(m.solver.iterations + 1)
                for m in self.methods
                if self.hparams.curves and hasattr(m, "embed_history")
            }
        )

    def text_embeddings(self) -> torch.Tensor:
        return self.text_cache(self.backbone, self.class_names, self.device)

    @property
    def needs_original_image(self) -> bool:
        """Whether a method crops from the original pixels: batches must then carry them (``original``,
        ``original_masks``), i.e. the region data module has ``keep_original=True`` (the CLIs link it from here)."""
        return any(getattr(m, "needs_original_image", False) for m in self.methods)

    def _check_original(self, batch: dict[str, Any]) -> None:
        """Refuse a batch without the original pixels when a method needs them, rather than let the method fall
        back to the model input (other numbers, silently)."""
        if self.needs_original_image and not ("original" in batch and "original_masks" in batch):
            names = [m.name for m in self.methods if getattr(m, "needs_original_image", False)]
            raise ValueError(
                f"{type(self).__name__}: the methods {names} crop from the original image, but the batch has no "
                "`original`/`original_masks`: build the region data module with `keep_original=True` (e.g. "
                "SyntheticDataModule(..., keep_original=True)); infer.py and train.py set it from the model"
            )

    def region_logits(
        self,
        method: RegionEmbedder,
        image: torch.Tensor,
        masks: torch.Tensor,
        original: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``[N, C]`` scaled cosine logits of the regions ``masks`` of ``image`` for one method."""
        emb = F.normalize(method(self.backbone, image, masks, original=original), dim=-1)
        return self.backbone.logit_scale.exp() * emb @ self.text_embeddings().T

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        require_grad_mode("region classification (MaskInversion, gradient explainers)")
        self._check_original(batch)
        for b in range(batch["image"].shape[0]):
            keep = batch["region_batch_index"] == b
            if not keep.any():
                continue
            masks, labels = batch["masks"][keep], batch["labels"][keep]
            original = (batch["original"][b], batch["original_masks"][b]) if "original" in batch else None
            for method in self.methods:
                if method.name in self.curve_metrics:
                    tokens, dice = method.embed_history(self.backbone, batch["image"][b], masks)
                    emb = F.normalize(tokens, dim=-1)
                    curve = self.backbone.logit_scale.exp() * emb @ self.text_embeddings().T  # [T, N, C]
                    self.curve_metrics[method.name].update(curve, labels, dice)
                    logits = curve[-1]
                else:
                    logits = self.region_logits(method, batch["image"][b], masks, original=original)
                self.metrics[method.name].update(logits, labels)

    def on_test_epoch_end(self) -> None:
        self.results = {}
        for name, metric in self.metrics.items():
            values = {k: float(v) for k, v in metric.compute().items()}
            self.results[name] = values
            for key, value in values.items():
                self.log(f"test/{name}/{key}", value, rank_zero_only=True)
            metric.reset()
        rank_zero_info("\nRegion classification (%):\n" + comparison_table(self.results))
        self.curves = {}
        for name, metric in self.curve_metrics.items():
            self.curves[name] = {k: [float(x) for x in v] for k, v in metric.compute().items()}
            metric.reset()
            rows = "\n".join(
                f"| {i} | {100 * t:.1f} | {d:.3f} |"
                for i, (t, d) in enumerate(zip(self.curves[name]["top1"], self.curves[name]["dice"], strict=True))
            )
            rank_zero_info(f"\n{name} per iteration:\n| iteration | top1 | dice loss |\n|---|---|---|\n{rows}")
        if self.hparams.results_path and self.trainer.is_global_zero:
            payload = {"class_names": self.class_names, "results": self.results}
            if self.curves:
                payload["curves"] = self.curves
            save_json(payload, self.hparams.results_path)
