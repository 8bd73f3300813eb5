"""W&B media: image + mask + map overlays and a per-region table, on rank zero, only with a ``WandbLogger``."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from ..io import load_image
from ..viz import overlay_map

__all__ = ["WandbRegionMedia"]

log = logging.getLogger(__name__)


def _wandb_logger(trainer: L.Trainer) -> WandbLogger | None:
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger
    return None


class WandbRegionMedia(L.Callback):
    """Log overlays of final maps and a per-region table for the first ``max_images`` images of test/predict.

    Acts only when the trainer has a ``WandbLogger`` and only on global rank zero; the run mode (online, offline,
    disabled) comes from the environment (``WANDB_MODE``), never from here. Works with step outputs that are lists of
    per-image result dicts as :class:`~regionembed.modules.MaskInversionModule` returns them.

    Logged keys: ``<stage>/overlays`` (images) and ``<stage>/regions`` (table with columns image_id, region,
    final_dice_loss, best_prompt, overlay).

    Args:
        max_images: images to log per epoch.
    """

    COLUMNS = ("image_id", "region", "final_dice_loss", "best_prompt", "overlay")

    def __init__(self, max_images: int = 8) -> None:
        self.max_images = max_images
        self._rows: list[list[Any]] = []
        self._images: list[Any] = []
        self._seen = 0

    def _active(self, trainer: L.Trainer) -> WandbLogger | None:
        return _wandb_logger(trainer) if trainer.is_global_zero else None

    def _reset(self) -> None:
        self._rows, self._images, self._seen = [], [], 0

    def _collect(self, trainer: L.Trainer, outputs: Any) -> None:
        if self._active(trainer) is None or not isinstance(outputs, list):
            return
        import wandb

        for result in outputs:
            if self._seen >= self.max_images or not isinstance(result, dict) or not result.get("image_path"):
                continue
            self._seen += 1
            image = load_image(result["image_path"])
            for i, name in enumerate(result["mask_names"]):
                overlay = wandb.Image(overlay_map(image, result["maps"][i], mask=result["masks"][i].numpy()))
                best = ""
                if "probabilities" in result:
                    best = result["prompts"][int(result["probabilities"][i].argmax())]
                caption = f"{result['image_id']}/{name}"
                self._images.append(wandb.Image(overlay.image, caption=caption))
                self._rows.append([result["image_id"], name, float(result["mask_loss"][i]), best, overlay])

    def _flush(self, trainer: L.Trainer, stage: str) -> None:
        logger = self._active(trainer)
        if logger is None or not self._rows:
            self._reset()
            return
        import wandb

        table = wandb.Table(columns=list(self.COLUMNS), data=self._rows)
        logger.experiment.log({f"{stage}/overlays": self._images, f"{stage}/regions": table})
        self._reset()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._flush(trainer, "test")

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._flush(trainer, "predict")
