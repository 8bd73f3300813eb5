"""Writing MaskInversion predictions: embeddings (safetensors), map overlays and a JSON manifest per image."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter

from ..io import load_image, save_json, save_png, save_safetensors
from ..viz import overlay_map

__all__ = ["InversionWriter", "write_inversion"]

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def write_inversion(result: dict[str, Any], output_dir: str | Path, overlays: bool = True, rank: int = 0) -> Path:
    """Write one image's MaskInversion result; every file is written atomically, the manifest last.

    Layout (see README, "Output format")::

        <output_dir>/<image_id>/embeddings.safetensors   embeddings [N, D], maps [N, H, W], image_embedding [1, D]
        <output_dir>/<image_id>/overlays/<region>.png    final map over the image, mask outlined
        <output_dir>/<image_id>/manifest.json            regions, losses, prompt matches, file list

    Returns:
        The image's output directory.
    """
    out = Path(output_dir) / result["image_id"]
    names = result["mask_names"]
    tensors = {
        "embeddings": result["embeddings"],
        "maps": result["maps"],
        "image_embedding": result["image_embedding"],
    }
    save_safetensors(tensors, out / "embeddings.safetensors", metadata={"mask_names": json.dumps(names)})
    files = {"embeddings": "embeddings.safetensors", "overlays": {}}
    if overlays and result.get("image_path"):
        image = load_image(result["image_path"])
        for i, name in enumerate(names):
            rel = f"overlays/{name}.png"
            save_png(overlay_map(image, result["maps"][i], mask=result["masks"][i].numpy()), out / rel)
            files["overlays"][name] = rel
    regions = []
    for i, name in enumerate(names):
        region = {"index": i, "name": name, "final_dice_loss": float(result["mask_loss"][i])}
        if "probabilities" in result:
            probs = result["probabilities"][i]
            best = int(probs.argmax())
            region["best_prompt"] = result["prompts"][best]
            region["prompt_probabilities"] = {p: float(v) for p, v in zip(result["prompts"], probs, strict=True)}
            region["prompt_cosine"] = {
                p: float(v) for p, v in zip(result["prompts"], result["similarity"][i], strict=True)
            }
        regions.append(region)
    manifest = {
        "format_version": FORMAT_VERSION,
        "image_id": result["image_id"],
        "image": result.get("image_path"),
        "strategy": result["strategy"],
        "loss_history": [float(v) for v in result["loss_history"]],
        "prompts": result.get("prompts", []),
        "regions": regions,
        "files": files,
        "rank": rank,
    }
    save_json(manifest, out / "manifest.json")
    return out


class InversionWriter(BasePredictionWriter):
    """Lightning prediction writer for :class:`~regionembed.modules.MaskInversionModule`.

    Each rank writes the images it processed; files are written atomically, so duplicates from distributed padding
    simply rewrite identical content. Predictions are not kept in memory (``return_predictions`` is not needed).

    Args:
        output_dir: where the per-image folders go.
        overlays: also write overlay PNGs.
    """

    def __init__(self, output_dir: str = "outputs/maskinversion", overlays: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.overlays = overlays

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        for result in prediction:
            path = write_inversion(result, self.output_dir, overlays=self.overlays, rank=trainer.global_rank)
            log.info("wrote %s", path)
