"""Writing MaskInversion predictions: embeddings (safetensors), map overlays and a JSON manifest per image.

Each image's folder is staged and swapped in whole (:func:`regionembed.outputs.write_staged_folder`), carries a key
of the inputs and settings that produced it (manifest and safetensors metadata), and a re-run skips folders whose key
matches. One run at a time may write into an output folder (:class:`regionembed.outputs.OutputLock`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..io import load_image, save_json, save_png, save_safetensors
from ..outputs import (
    OutputLock,
    OutputLockedError,
    check_output_dir,
    clean_stale_staging,
    fingerprint_inputs,
    run_key,
    safe_filename,
    safe_filenames,
    write_staged_folder,
)
from ..viz import overlay_map

__all__ = ["FORMAT_VERSION", "InversionWriter", "image_folder", "is_up_to_date", "write_inversion"]

log = logging.getLogger(__name__)
#: 2: folders staged and swapped whole; ``key``/``inputs_sha256``/``settings_sha256``/``folder`` in the manifest,
#: ``key`` in the safetensors metadata; unsafe names encoded (originals kept in the manifest)
FORMAT_VERSION = 2


def image_folder(output_dir: str | Path, image_id: str) -> Path:
    """Where :func:`write_inversion` puts ``image_id``'s files (the id made a safe folder name)."""
    return Path(output_dir) / safe_filename(image_id)


def _result_key(result: dict[str, Any], options: dict[str, Any]) -> tuple[str, str, str]:
    inputs = result.get("inputs_sha256")
    if not inputs:  # results built by hand (library use): hash what the result holds
        image = Path(result["image_path"]).read_bytes() if result.get("image_path") else b""
        masks = result["masks"]
        inputs = fingerprint_inputs(
            image, [(n, masks[i].detach().cpu().numpy().tobytes()) for i, n in enumerate(result["mask_names"])]
        )
    settings = result.get("settings_sha256") or "unspecified"
    return run_key(FORMAT_VERSION, inputs, settings, options), inputs, settings


def is_up_to_date(output_dir: str | Path, image_id: str, key: str) -> bool:
    """True when ``image_id``'s folder is complete and was produced by inputs and settings with this ``key``."""
    folder = image_folder(output_dir, image_id)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        return False
    if manifest.get("key") != key or manifest.get("image_id") != image_id:
        return False
    files = manifest.get("files", {})
    try:
        from safetensors import safe_open

        with safe_open(str(folder / files["embeddings"]), "pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return False
    except Exception:  # missing, truncated or foreign file: not up to date
        return False
    return all((folder / rel).is_file() for rel in files.get("overlays", {}).values())


def write_inversion(
    result: dict[str, Any], output_dir: str | Path, overlays: bool = True, rank: int = 0, precision: str = ""
) -> Path:
    """Write one image's MaskInversion result as a complete folder, swapped in whole.

    Layout (see README, "Output format")::

        <output_dir>/<folder>/embeddings.safetensors   embeddings [N, D], maps [N, H, W], image_embedding [1, D]
        <output_dir>/<folder>/overlays/<region>.png    final map over the image, mask outlined
        <output_dir>/<folder>/manifest.json            regions, losses, prompt matches, file list, key

    ``<folder>`` and ``<region>`` are :func:`~regionembed.outputs.safe_filename` encodings of the image id and region
    names (unchanged for plain names); the manifest keeps the original names. Nothing is written outside
    ``output_dir``.

    Args:
        result: :meth:`MaskInversionModule.invert` output.
        output_dir: the output folder.
        overlays: also write overlay PNGs.
        rank: the writing rank (recorded in the manifest).
        precision: the trainer's precision (part of the key: it changes the numbers).

    Returns:
        The image's output folder.
    """
    image_id = result["image_id"]
    names = list(result["mask_names"])
    files_of = safe_filenames(names)  # also refuses duplicate region names
    folder = safe_filename(image_id)
    key, inputs, settings = _result_key(result, {"overlays": bool(overlays), "precision": str(precision)})
    tensors = {
        "embeddings": result["embeddings"],
        "maps": result["maps"],
        "image_embedding": result["image_embedding"],
    }
    files: dict[str, Any] = {"embeddings": "embeddings.safetensors", "overlays": {}}
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

    def fill(staging: Path) -> None:
        metadata = {"mask_names": json.dumps(names), "key": key, "format_version": str(FORMAT_VERSION)}
        save_safetensors(tensors, staging / files["embeddings"], metadata=metadata)
        if overlays and result.get("image_path"):
            image = load_image(result["image_path"])
            for i, name in enumerate(names):
                rel = f"overlays/{files_of[i]}.png"
                save_png(overlay_map(image, result["maps"][i], mask=result["masks"][i].numpy()), staging / rel)
                files["overlays"][name] = rel
        manifest = {
            "format_version": FORMAT_VERSION,
            "image_id": image_id,
            "folder": folder,
            "image": result.get("image_path"),
            "strategy": result["strategy"],
            "weights": result.get("weights", "unknown"),
            "loss_history": [float(v) for v in result["loss_history"]],
            "prompts": result.get("prompts", []),
            "regions": regions,
            "files": files,
            "rank": rank,
            "key": key,
            "inputs_sha256": inputs,
            "settings_sha256": settings,
        }
        save_json(manifest, staging / "manifest.json")

    return write_staged_folder(output_dir, folder, fill)


class InversionWriter(BasePredictionWriter):
    """Lightning prediction writer for :class:`~regionembed.modules.MaskInversionModule`.

    Each rank writes the images it processed, each as a complete folder swapped in whole. Before predicting, the
    output folder is checked and locked (a second run into it stops at once with a message); images whose folder
    already holds the result of the same inputs and settings are not computed again unless ``overwrite`` is set,
    so a killed run resumes where it stopped. Predictions are not kept in memory.

    Args:
        output_dir: where the per-image folders go (``~`` is expanded).
        overlays: also write overlay PNGs.
        overwrite: recompute and rewrite every image, even those already up to date.
    """

    def __init__(self, output_dir: str = "outputs/maskinversion", overlays: bool = True, overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.output_dir = str(Path(output_dir).expanduser())  # `--writer.output_dir=~/x` is not expanded by shells
        self.overlays = overlays
        self.overwrite = overwrite
        self.written = 0
        self.skipped = 0
        self._lock: OutputLock | None = None
        self._module = None
        self._precision = ""

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        check_output_dir(self.output_dir)
        error = None
        if trainer.is_global_zero:
            try:
                self._lock = OutputLock(self.output_dir).acquire()
                clean_stale_staging(self.output_dir)
            except OutputLockedError as err:
                error = str(err)
        error = trainer.strategy.broadcast(error, src=0)  # every rank stops, not only rank zero
        if error:
            raise OutputLockedError(error)

    def on_predict_start(self, trainer, pl_module) -> None:
        self.written = self.skipped = 0
        self._precision = str(trainer.precision)
        if not self.overwrite and hasattr(pl_module, "skip_sample"):
            self._module = pl_module
            pl_module.skip_sample = self.is_done

    def key_of(self, sample: dict[str, Any]) -> str | None:
        """The key ``sample``'s folder would get, or None when the sample carries no input hash."""
        if self._module is None or not sample.get("inputs_sha256"):
            return None
        options = {"overlays": bool(self.overlays), "precision": self._precision}
        return run_key(FORMAT_VERSION, sample["inputs_sha256"], self._module.settings_fingerprint(), options)

    def is_done(self, sample: dict[str, Any]) -> bool:
        """True when ``sample``'s output folder is up to date (the module then skips it)."""
        key = self.key_of(sample)
        return key is not None and is_up_to_date(self.output_dir, sample["image_id"], key)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        for result in prediction:
            if result.get("skipped"):
                if result.get("reason") == "no region":
                    log.warning("%s has no region (all empty after preprocessing): nothing written", result["image_id"])
                    continue
                if result.get("reason") == "repeat":  # written a moment ago from the same inputs
                    continue
                self.skipped += 1
                log.info("%s is up to date in %s: skipped", result["image_id"], self.output_dir)
                continue
            path = write_inversion(
                result, self.output_dir, overlays=self.overlays, rank=trainer.global_rank, precision=self._precision
            )
            self.written += 1
            log.info("wrote %s", path)

    def _finish(self) -> None:
        if self._module is not None:
            self._module.skip_sample = None
            self._module = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        # a collective: also keeps the lock until every rank has written its images
        counts = torch.tensor([self.written, self.skipped], device=pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        written, skipped = (int(c) for c in counts)
        rank_zero_info(
            f"{self.output_dir}: {written} image(s) written, {skipped} already up to date"
            + (" (skipped; --writer.overwrite=true recomputes them)" if skipped else "")
        )
        self._finish()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._finish()
