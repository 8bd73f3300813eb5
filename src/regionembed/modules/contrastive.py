"""Contrastive (CLIP) training of an open_clip model, e.g. a tiny CLIP from scratch on the synthetic world."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from ..backbones.base import Backbone
from ..io import save_safetensors
from ..losses import ClipLoss, multi_positive_clip_loss

__all__ = ["ContrastiveModule", "check_optimizer_settings", "cosine_with_warmup", "param_groups"]


def check_optimizer_settings(**settings: float | None) -> None:
    """Refuse learning rates that are not positive and negative warmups, naming the setting.

    Learning rates (``lr``, ``lr_alpha``, ``combiner_lr``) must be > 0 (or None, meaning "use the default");
    ``warmup_steps`` must be >= 0. A zero learning rate trains nothing and a negative warmup silently skips the
    warmup: both are mistakes.
    """
    for name, value in settings.items():
        if value is None:
            continue
        if "lr" in name.split("_") and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive learning rate, got {value!r}")
        if name == "warmup_steps" and not value >= 0:
            raise ValueError(f"warmup_steps must be >= 0, got {value!r}")


log = logging.getLogger(__name__)


def cosine_with_warmup(step: int, warmup: int, total: int | Callable[[], int], min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio``.

    ``total`` may be a callable, asked only once the warmup is over (see ``ContrastiveModule.configure_optimizers``).
    """
    if step < warmup:
        return (step + 1) / max(1, warmup)
    if step == warmup == 0:
        return 1.0
    total = total() if callable(total) else total
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's convention: no weight decay on biases, norms, embeddings' gains and the logit scale."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ContrastiveModule(L.LightningModule):
    """Symmetric InfoNCE over (image, caption) pairs with features gathered across ranks (open_clip ``ClipLoss``).

    Batches are dicts with ``image`` ``[B, 3, S, S]`` and ``caption`` (B strings, tokenised here).

    Args:
        backbone: an open_clip backbone (image and text towers, ``logit_scale``).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (not on biases, norms, logit scale).
        warmup_steps: linear warmup steps before the cosine decay.
        betas: AdamW betas.
        export_path: when set, the backbone's weights are written there (safetensors, atomic) at the end of fit, so
            any module can load them with ``OpenCLIPBackbone(..., pretrained=export_path)``.
        multi_positive: images whose captions are identical (after tokenisation; across all ranks in training,
            within a rank in validation) are positives of each other
            (:func:`~regionembed.losses.multi_positive_clip_loss`) instead of negatives. With a deterministic text
            tower identical captions embed identically and the loss and its gradient equal CLIP's (tested); what
            changes is ``val/i2t_top1_in_batch``, which counts a top caption identical to the image's own as a hit
            (ties between repeated captions otherwise count only the first). Validation honours it too (``val/loss``
            is the same objective).
        export_dtype: ``"float32"`` or ``"float16"`` (half the file; what the shipped zoo weights use).
    """

    def __init__(
        self,
        backbone: Backbone,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        betas: tuple[float, float] = (0.9, 0.98),
        export_path: str | None = None,
        multi_positive: bool = False,
        export_dtype: Literal["float32", "float16"] = "float32",
    ) -> None:
        super().__init__()
        check_optimizer_settings(lr=lr, warmup_steps=warmup_steps)
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.loss_fn: ClipLoss | None = None

    def setup(self, stage: str) -> None:
        # rank and world size exist only once the trainer is attached (see STYLE: build them in setup)
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self.loss_fn = ClipLoss(local_loss=False, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world)

    def on_fit_start(self) -> None:
        self.backbone.train()  # adapters are built in eval mode for inference; training wants dropout etc. on

    def _features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = self.backbone.encode_image(batch["image"], normalize=True)
        tokens = self.backbone.tokenize(batch["caption"]).to(self.device)
        text = self.backbone.encode_text(tokens, normalize=True)
        return image, text, tokens

    def _caption_groups(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[N]`` ids of the captions that count as one: equal token rows under ``multi_positive``, else each its own.

        Args:
            tokens: ``[N, L]`` tokenised captions.
        """
        if self.hparams.multi_positive:
            return torch.unique(tokens, dim=0, return_inverse=True)[1]
        return torch.arange(len(tokens), device=tokens.device)

    def _clip_loss(self, image: torch.Tensor, text: torch.Tensor, tokens: torch.Tensor, gather: bool) -> torch.Tensor:
        """The one objective of training and validation: CLIP's loss, or the multi-positive one.

        Args:
            image: ``[B, D]`` normalised image features of this rank.
            text: ``[B, D]`` normalised caption features.
            tokens: ``[B, L]`` the tokenised captions.
            gather: score against the whole global batch (training). Validation does not: its batches may differ in
                size across ranks, so each rank scores its own.
        """
        scale = self.backbone.logit_scale.exp()
        if gather and not self.hparams.multi_positive:
            return self.loss_fn(image, text, scale)  # open_clip's gathering
        if gather and self.trainer.world_size > 1:  # the whole global batch, gradients flowing back to every rank
            image = self.all_gather(image, sync_grads=True).flatten(0, 1)
            text = self.all_gather(text, sync_grads=True).flatten(0, 1)
            tokens = self.all_gather(tokens).flatten(0, 1)
        # with distinct groups (multi_positive off) this is CLIP's loss
        return multi_positive_clip_loss(image, text, scale, self._caption_groups(tokens))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        image, text, tokens = self._features(batch)
        loss = self._clip_loss(image, text, tokens, gather=True)
        self.log("train/loss", loss, prog_bar=True, batch_size=image.shape[0])
        self.log("train/logit_scale", self.backbone.logit_scale.exp(), batch_size=image.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image, text, tokens = self._features(batch)
        loss = self._clip_loss(image, text, tokens, gather=False)
        groups = self._caption_groups(tokens)
        # a hit: the top caption is the image's own, or under multi_positive one identical to it (identical captions
        # tie, and argmax would otherwise pick the first of them)
        acc = (groups[(image @ text.T).argmax(1)] == groups).float().mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=image.shape[0])
        self.log("val/i2t_top1_in_batch", acc, sync_dist=True, batch_size=image.shape[0])

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():  # as open_clip: keep the temperature within [1, 100]
            self.backbone.logit_scale.clamp_(0, math.log(100))

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups (subclasses override, e.g. per-part learning rates)."""
        return param_groups(self.backbone, self.hparams.weight_decay)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=hp.lr, betas=tuple(hp.betas))
        # The total is asked for lazily: `estimated_stepping_batches` builds the train loader, and doing that here,
        # before Lightning restores a checkpoint's loop and loader state, would break exact mid-epoch resumption.
        trainer = self.trainer

        def total() -> int:
            return max(1, int(trainer.estimated_stepping_batches))

        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_with_warmup(step, hp.warmup_steps, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @rank_zero_only
    def _export(self) -> None:
        path = Path(self.hparams.export_path)
        dtype = {"float32": torch.float32, "float16": torch.float16}[self.hparams.export_dtype]
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.backbone.export_state_dict().items()}
        save_safetensors(state, path, metadata={"model_name": self.backbone.model_name})
        log.info("exported backbone weights to %s", path)

    def on_fit_end(self) -> None:
        if self.hparams.export_path:
            self._export()
