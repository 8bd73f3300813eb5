"""MaskInversion as a LightningModule: test/predict steps run the inner optimisation per image."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection

from ..backbones.base import Backbone
from ..data.collate import RegionBatch, image_views
from ..grad_mode import require_grad_mode
from ..inversion import MaskInversion
from ..outputs import fingerprint_inputs, fingerprint_settings, tensor_bytes
from ..text import TextEmbeddingCache

__all__ = ["MaskInversionModule"]


def _fitted_masks(sample: dict[str, Any]) -> torch.Tensor:
    """The masks MaskInversion fits for one image: at the image's own resolution when the data keeps them."""
    original = sample.get("original_masks")
    return sample["masks"] if original is None else original


class MaskInversionModule(L.LightningModule):
    """Localized embeddings for every region mask of every image, with the backbone frozen.

    Args:
        backbone: the model (e.g. ``OpenCLIPBackbone``); frozen here.
        solver: the MaskInversion solver with all its settings (explainer, lr, iterations, strategy, ...); default
            ``MaskInversion()``, the official settings. In YAML: ``solver: {class_path:
            regionembed.inversion.MaskInversion, init_args: {...}}``.
        prompts: optional texts each region is matched against (needs a text tower).
        prompt_templates: templates (``"a photo of a {}."``) averaged per prompt; ``["{}"]`` uses prompts as given.

    Attributes:
        skip_sample: set by a prediction writer (:class:`~regionembed.callbacks.InversionWriter`): samples for which
            it returns True are not computed in ``predict_step`` (their result is ``{"image_id", "skipped": True,
            "reason"}``), e.g. images whose outputs are already up to date.

    Batches are :class:`~regionembed.data.collate.RegionBatch` es from any region data module (folder, synthetic,
    COCO, RefCOCO, VOC); each image is inverted on its own, against ``original_masks`` when the batch has them (the
    folder: maps at the image's resolution), else against ``masks`` (``S x S``).
    """

    def __init__(
        self,
        backbone: Backbone,
        solver: MaskInversion | None = None,
        prompts: list[str] | None = None,
        prompt_templates: list[str] | None = None,
    ) -> None:
        super().__init__()
        prompts = list(prompts or [])
        duplicates = sorted({p for p in prompts if prompts.count(p) > 1})
        if duplicates:  # each prompt is a key of the per-region probabilities: a duplicate would collapse
            raise ValueError(f"prompts must be unique, these occur more than once: {duplicates}")
        self.save_hyperparameters(ignore=["backbone", "solver"])
        self.backbone = backbone.requires_grad_(False).eval()
        self.solver = solver if solver is not None else MaskInversion()
        self.solver.check(self.backbone)  # a bad setting is found now, not after the data is loaded
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
                "solver": self.solver.settings(),
                "backbone": f"{type(self.backbone).__qualname__}({self.backbone.extra_repr()})",
                "preprocess": repr(self.backbone.preprocess),
            }
            self._settings_sha256 = fingerprint_settings(settings, self.backbone)
        return self._settings_sha256

    def invert(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Run MaskInversion on one image of a :class:`~regionembed.data.collate.RegionBatch`; results on CPU.

        Args:
            sample: one image's view (:func:`~regionembed.data.collate.image_views`): ``image`` ``[3, S, S]``,
                ``masks`` ``[N, S, S]``, ``region_names``, ``image_id``, and when the data has them
                ``original_masks`` ``[N, H, W]`` (fitted instead of ``masks``: maps at the image's own resolution),
                ``image_path`` and ``inputs_sha256``.
        """
        require_grad_mode("MaskInversion")
        image = sample["image"].to(self.device).unsqueeze(0)
        target = _fitted_masks(sample)
        result = self.solver(self.backbone, image, target.to(self.device))
        out = {
            "image_id": sample["image_id"],
            "image_path": sample.get("image_path"),
            "mask_names": list(sample["region_names"]),
            "embeddings": result.embeddings.cpu(),
            "image_embedding": result.image_embedding.cpu(),
            "maps": result.maps.cpu(),
            "loss_history": result.loss_history.cpu(),
            "mask_loss": result.mask_loss.cpu(),
            "strategy": result.strategy,
            "masks": target.float().cpu(),
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

    @staticmethod
    def inputs_fingerprint(sample: dict[str, Any]) -> str:
        """What a re-run must match for one image: the data's ``inputs_sha256`` (the folder: file bytes), else a
        SHA-256 of the model input (the preprocessed ``image`` and the fitted masks, with the region names)."""
        if sample.get("inputs_sha256"):
            return sample["inputs_sha256"]
        target = _fitted_masks(sample)
        return fingerprint_inputs(
            tensor_bytes(sample["image"]),
            [(str(n), tensor_bytes(target[i].float())) for i, n in enumerate(sample["region_names"])],
        )

    # ------------------------------------------------------------------------------------------- steps
    def predict_step(self, batch: RegionBatch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """One result per image of the batch: :meth:`invert`'s, or ``{"image_id", "skipped": True, "reason"}`` with
        ``reason`` ``"no region"``, ``"up to date"`` (:attr:`skip_sample`) or ``"repeat"`` (the same image and regions
        earlier in the batch)."""
        require_grad_mode("MaskInversion")
        out = []
        done = set()  # an image repeated in the batch (one item per RefCOCO expression) is inverted once
        for sample in image_views(batch):
            if not len(sample["region_names"]):  # e.g. every region cropped away: nothing to invert
                out.append({"image_id": sample["image_id"], "skipped": True, "reason": "no region"})
                continue
            # the writer skips images whose folder holds this key, e.g. repeats in earlier batches
            sample["inputs_sha256"] = self.inputs_fingerprint(sample)
            key = (sample["image_id"], sample["inputs_sha256"])
            if key in done:
                out.append({"image_id": sample["image_id"], "skipped": True, "reason": "repeat"})
            elif self.skip_sample is not None and self.skip_sample(sample):
                out.append({"image_id": sample["image_id"], "skipped": True, "reason": "up to date"})
            else:
                out.append(self.invert(sample))
            done.add(key)
        return out

    def test_step(self, batch: RegionBatch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        require_grad_mode("MaskInversion")
        results = []
        for sample in image_views(batch):
            if not len(sample["region_names"]):
                continue
            res = self.invert(sample)
            results.append(res)
            masks = res["masks"]
            maps = res["maps"]
            inter = ((maps > 0.5) & (masks > 0.5)).flatten(1).sum(1).float()
            union = ((maps > 0.5) | (masks > 0.5)).flatten(1).sum(1).float().clamp_min(1)
            self.test_metrics["mask_dice"].update(1 - res["mask_loss"])
            self.test_metrics["map_iou"].update(inter / union)
            self.test_metrics["loss_drop"].update(res["loss_history"][0] - res["loss_history"][-1])
        self.log_dict(self.test_metrics, batch_size=len(batch["image_ids"]))
        return results

    def configure_optimizers(self):
        return None
