"""W&B media for composed retrieval: reference, target and map overlays, on rank zero, only with a ``WandbLogger``."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image

from ..viz import overlay_map
from .wandb_media import _wandb_logger

__all__ = ["ComposedRetrievalMedia", "denormalize"]


def denormalize(image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Image.Image:
    """A normalised ``[3, S, S]`` tensor back to an RGB PIL image."""
    m = torch.tensor(mean, dtype=image.dtype, device=image.device)[:, None, None]
    s = torch.tensor(std, dtype=image.dtype, device=image.device)[:, None, None]
    rgb = ((image * s + m).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(rgb))


class ComposedRetrievalMedia(L.Callback):
    """Log the first ``max_images`` test queries of :class:`~regionembed.modules.ComposedRetrievalModule`.

    Acts only when the trainer has a ``WandbLogger`` and only on global rank zero (the W&B mode comes from
    ``WANDB_MODE``). Logged keys: ``test/composed_overlays``, one strip per query (reference | target | the map over
    the reference with the changed region outlined in white when known; captioned with the modifier) and the table
    ``test/composed`` (columns image_id, modifier, strip).

    Args:
        max_images: queries to log per test epoch.
    """

    COLUMNS = ("image_id", "modifier", "strip")

    def __init__(self, max_images: int = 8) -> None:
        self.max_images = max_images
        self._rows: list[list[Any]] = []
        self._images: list[Any] = []

    def _active(self, trainer: L.Trainer):
        return _wandb_logger(trainer) if trainer.is_global_zero else None

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._rows, self._images = [], []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._active(trainer) is None or not isinstance(outputs, dict) or "reference" not in outputs:
            return
        import wandb

        spec = pl_module.backbone.preprocess
        maps, masks = outputs.get("maps"), outputs.get("mask")
        for i in range(len(outputs["modifier"])):
            if len(self._rows) >= self.max_images:
                return
            reference = denormalize(outputs["reference"][i], spec.mean, spec.std)
            target = denormalize(outputs["target"][i], spec.mean, spec.std)
            panels = [np.asarray(reference), np.asarray(target)]
            if maps is not None:
                mask = masks[i].cpu().numpy() if masks is not None else None
                panels.append(overlay_map(reference, maps[i], mask=mask))
            # one strip per query (reference | target | map over the reference, changed region outlined)
            strip = wandb.Image(np.concatenate(panels, axis=1), caption=outputs["modifier"][i])
            self._images.append(strip)
            self._rows.append([outputs["image_ids"][i], outputs["modifier"][i], strip])

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        logger = self._active(trainer)
        if logger is None or not self._rows:
            return
        import wandb

        table = wandb.Table(columns=list(self.COLUMNS), data=self._rows)
        logger.experiment.log({"test/composed_overlays": self._images, "test/composed": table})
        self._rows, self._images = [], []
