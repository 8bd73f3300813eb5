"""MaskInversion as a LightningModule: test/predict steps run the inner optimisation per image."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection

from ..backbones.base import Backbone
from ..inversion import MaskInversion
from ..outputs import fingerprint_settings
from ..text import TextEmbeddingCache

__all__ = ["MaskInversionModule", "require_grad_mode"]

INFERENCE_MODE_MESSAGE = (
    "MaskInversion optimises embedding tokens with autograd, which torch.inference_mode() forbids. "
    "Set `trainer.inference_mode: false` (Trainer(inference_mode=False)); the configs in configs/infer/ do."
)


def require_grad_mode() -> None:
    """Raise a clear error when called under ``torch.inference_mode`` (Lightning's default for test/predict)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(INFERENCE_MODE_MESSAGE)


class MaskInversionModule(L.LightningModule):
    """Localized embeddings for every region mask of every image, with the backbone frozen.

    Args:
        backbone: the model (e.g. ``OpenCLIPBackbone``); frozen here.
        layers: LeGrad layers.
        lr: AdamW learning rate of the tokens.
        iterations: optimisation steps per image.
        alpha: weight of the regulariser towards the image embedding.
        weight_decay: AdamW weight decay.
        strategy: map strategy (``auto``, ``naive``, ``naive_lean``, ``per_step``, ``precomputed``).
        memory_budget_mb: largest precomputed table ``auto`` may use.
        prompts: optional texts each region is matched against (needs a text tower).
        prompt_templates: templates (``"a photo of a {}."``) averaged per prompt; ``["{}"]`` uses prompts as given.

    Attributes:
        skip_sample: set by a prediction writer (:class:`~regionembed.callbacks.InversionWriter`): samples for which
            it returns True are not computed in ``predict_step`` (their result is ``{"image_id", "skipped": True}``),
            e.g. images whose outputs are already up to date.
    """

    def __init__(
        self,
        backbone: Backbone,
        layers: list[int] | None = None,
        lr: float = 0.5,
        iterations: int = 10,
        alpha: float = 0.0,
        weight_decay: float = 0.0,
        strategy: str = "auto",
        memory_budget_mb: float = 2048.0,
        prompts: list[str] | None = None,
        prompt_templates: list[str] | None = None,
    ) -> None:
        super().__init__()
        prompts = list(prompts or [])
        duplicates = sorted({p for p in prompts if prompts.count(p) > 1})
        if duplicates:  # each prompt is a key of the per-region probabilities: a duplicate would collapse
            raise ValueError(f"prompts must be unique, these occur more than once: {duplicates}")
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone.requires_grad_(False).eval()
        self.solver = MaskInversion(
            backbone,
            layers=tuple(layers or (-1,)),
            lr=lr,
            iterations=iterations,
            alpha=alpha,
            weight_decay=weight_decay,
            strategy=strategy,
            memory_budget_mb=memory_budget_mb,
        )
        self.prompts = prompts
        self.prompt_templates = list(prompt_templates or ["{}"])
        if any("{}" not in t for t in self.prompt_templates):
            raise ValueError(f"every prompt template needs a '{{}}' placeholder, got {self.prompt_templates}")
        self.text_cache = TextEmbeddingCache(self.prompt_templates)
        self._settings_sha256: str | None = None
        self.skip_sample: Callable[[dict[str, Any]], bool] | None = None
        self.test_metrics = MetricCollection(
            {"mask_dice": MeanMetric(), "map_iou": MeanMetric(), "loss_drop": MeanMetric()}, prefix="test/"
        )

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: never dropout/patch-dropout, whatever the loop does
        return self

    # ------------------------------------------------------------------------------------------ helpers
    def text_embeddings(self) -> torch.Tensor | None:
        """``[P, D]`` normalised prompt embeddings (template-averaged), cached per device; None without prompts."""
        if not self.prompts:
            return None
        return self.text_cache(self.backbone, self.prompts, self.device)

    def settings_fingerprint(self) -> str:
        """SHA-256 of everything besides the inputs that determines the outputs: hyper-parameters, backbone, weights.

        Computed once (the backbone is frozen) and recorded in every output folder, so that a re-run can tell
        whether a folder was produced with the same settings.
        """
        if self._settings_sha256 is None:
            settings = {
                "module": f"{type(self).__module__}.{type(self).__qualname__}",
                "hparams": dict(self.hparams),
                "backbone": f"{type(self.backbone).__qualname__}({self.backbone.extra_repr()})",
                "preprocess": repr(self.backbone.preprocess),
            }
            self._settings_sha256 = fingerprint_settings(settings, self.backbone)
        return self._settings_sha256

    def invert(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Run MaskInversion on one sample of :class:`~regionembed.data.ImageMaskDataset`; results on CPU."""
        require_grad_mode()
        image = sample["image"].to(self.device).unsqueeze(0)
        masks = sample["masks"].to(self.device)
        result = self.solver(image, masks)
        out = {
            "image_id": sample["image_id"],
            "image_path": sample.get("image_path"),
            "mask_names": list(sample["mask_names"]),
            "embeddings": result.embeddings.cpu(),
            "image_embedding": result.image_embedding.cpu(),
            "maps": result.maps.cpu(),
            "loss_history": result.loss_history.cpu(),
            "mask_loss": result.mask_loss.cpu(),
            "strategy": result.strategy,
            "masks": sample["masks"].cpu(),
            "inputs_sha256": sample.get("inputs_sha256"),
            "settings_sha256": self.settings_fingerprint(),
            "weights": self.backbone.weights,
        }
        text = self.text_embeddings()
        if text is not None:
            sims = F.normalize(result.embeddings, dim=-1) @ text.T  # [N, P]
            scale = self.backbone.logit_scale.exp() if self.backbone.logit_scale is not None else 100.0
            out["prompts"] = list(self.prompts)
            out["similarity"] = sims.cpu()
            out["probabilities"] = (scale * sims).softmax(dim=-1).cpu()
        return out

    # ------------------------------------------------------------------------------------------- steps
    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0):
        require_grad_mode()
        out = []
        for sample in batch:
            if self.skip_sample is not None and self.skip_sample(sample):
                out.append({"image_id": sample["image_id"], "skipped": True})
            else:
                out.append(self.invert(sample))
        return out

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0):
        require_grad_mode()
        results = []
        for sample in batch:
            res = self.invert(sample)
            results.append(res)
            masks = res["masks"]
            maps = res["maps"]
            inter = ((maps > 0.5) & (masks > 0.5)).flatten(1).sum(1).float()
            union = ((maps > 0.5) | (masks > 0.5)).flatten(1).sum(1).float().clamp_min(1)
            self.test_metrics["mask_dice"].update(1 - res["mask_loss"])
            self.test_metrics["map_iou"].update(inter / union)
            self.test_metrics["loss_drop"].update(res["loss_history"][0] - res["loss_history"][-1])
        self.log_dict(self.test_metrics, batch_size=len(batch))
        return results

    def configure_optimizers(self):
        return None
