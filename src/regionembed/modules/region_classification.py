"""Zero-shot region classification: every region embedding method scored by the same evaluator."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from ..backbones.base import Backbone
from ..io import save_json
from ..metrics import RegionAccuracy
from ..regions import RegionEmbedder
from ..text import DEFAULT_TEMPLATES, TextEmbeddingCache
from .base import RegionMethodsModule
from .mask_inversion import require_grad_mode

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
    """

    def __init__(
        self,
        backbone: Backbone,
        methods: list[RegionEmbedder] | None = None,
        class_names: list[str] | None = None,
        templates: list[str] | None = None,
        results_path: str | None = None,
    ) -> None:
        super().__init__(backbone, methods)
        self.save_hyperparameters(ignore=["backbone", "methods"])
        self.class_names = list(class_names) if class_names else None
        self.templates = list(templates or DEFAULT_TEMPLATES)
        self.metrics: torch.nn.ModuleDict | None = None
        self.results: dict[str, dict[str, float]] = {}
        self.text_cache = TextEmbeddingCache(self.templates)

    def setup(self, stage: str) -> None:
        if self.class_names is None:
            datamodule = self.trainer.datamodule if self._trainer is not None else None
            self.class_names = list(getattr(datamodule, "class_names", None) or [])
            if not self.class_names:
                raise ValueError("RegionClassificationModule needs class_names (or a data module that has them)")
        self.metrics = torch.nn.ModuleDict(
            {m.name: RegionAccuracy(num_classes=len(self.class_names), top_k=(1, 5)) for m in self.methods}
        )

    def text_embeddings(self) -> torch.Tensor:
        return self.text_cache(self.backbone, self.class_names, self.device)

    def region_logits(self, method: RegionEmbedder, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` scaled cosine logits of the regions ``masks`` of ``image`` for one method."""
        emb = F.normalize(method(self.backbone, image, masks), dim=-1)
        return self.backbone.logit_scale.exp() * emb @ self.text_embeddings().T

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        require_grad_mode()
        for b in range(batch["image"].shape[0]):
            keep = batch["region_batch_index"] == b
            if not keep.any():
                continue
            masks, labels = batch["masks"][keep], batch["labels"][keep]
            for method in self.methods:
                self.metrics[method.name].update(self.region_logits(method, batch["image"][b], masks), labels)

    def on_test_epoch_end(self) -> None:
        self.results = {}
        for name, metric in self.metrics.items():
            values = {k: float(v) for k, v in metric.compute().items()}
            self.results[name] = values
            for key, value in values.items():
                self.log(f"test/{name}/{key}", value, rank_zero_only=True)
            metric.reset()
        rank_zero_info("\nRegion classification (%):\n" + comparison_table(self.results))
        if self.hparams.results_path and self.trainer.is_global_zero:
            save_json({"class_names": self.class_names, "results": self.results}, self.hparams.results_path)
