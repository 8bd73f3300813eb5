"""Models this project trains itself, resolved by ``pretrained="regionembed:<name>"``.

No pretrained weights can be downloaded in our environments, so the offline main job uses a tiny CLIP trained on
the synthetic world. Its weights ship inside the package (``regionembed/weights/<name>.safetensors``, fp16, a few
MB) together with the training config that made them and their sha256; ``resolve`` checks the hash and returns the
file, so nothing is trained on first use.

Re-making and verifying a zoo model (the same training code, through the library, no repository needed)::

    python -m regionembed.zoo retrain clip_synthetic --output outputs/zoo   # trains, exports, compares
    python -m regionembed.zoo verify clip_synthetic                          # sha256 + probe of the shipped file

``retrain`` keeps only ``last.ckpt`` while it runs (an interrupted run resumes from it when started again with
the same ``--output``), deletes it once the weights are exported, and logs an ETA measured on this machine. Bitwise
equality with the shipped file is not expected across machines (CPU kernels and thread counts change float
sums); the comparison reports both hashes and both probe results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MODELS", "WEIGHTS_DIR", "ZooEntry", "file_sha256", "resolve", "retrain"]

log = logging.getLogger(__name__)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class ZooEntry:
    """A project-trained model.

    Attributes:
        model_name: its open_clip architecture (``backbones/model_configs``).
        weights: the shipped weights file, relative to ``WEIGHTS_DIR`` (or absolute).
        sha256: hex digest of that file.
        config: the training config (``train.py fit --config``), relative to ``WEIGHTS_DIR`` (or absolute).
    """

    model_name: str
    weights: str
    sha256: str
    config: str

    def path(self, what: str) -> Path:
        """Absolute path of ``weights`` or ``config``."""
        return WEIGHTS_DIR / getattr(self, what)


MODELS = {
    "clip_synthetic": ZooEntry(
        "re-synth-vit",
        "clip_synthetic.safetensors",
        "bd5b1ecbe6cf7d72445bd26b19ef1f84c75cee132310b4fea0d1e3451b47aeee",
        "clip_synthetic.yaml",
    ),
}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _entry(name: str, model_name: str | None = None) -> ZooEntry:
    if name not in MODELS:
        raise ValueError(f"unknown regionembed model {name!r}; known: {sorted(MODELS)}")
    entry = MODELS[name]
    if model_name is not None and model_name != entry.model_name:
        raise ValueError(f"regionembed:{name} is a {entry.model_name} model, not {model_name}")
    return entry


def resolve(name: str, model_name: str | None = None) -> str:
    """Path of the shipped weights of zoo model ``name``, after checking their sha256.

    Raises:
        ValueError: unknown name, or ``model_name`` differs from the zoo entry's architecture.
        FileNotFoundError: the weights file is missing from the installation.
        RuntimeError: the file's sha256 differs from the recorded one (e.g. a Git LFS pointer or a local edit).
    """
    entry = _entry(name, model_name)
    path = entry.path("weights")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from this installation of regionembed; reinstall the package, or re-make the weights "
            f"with `python -m regionembed.zoo retrain {name}` and pass the exported file as `pretrained`"
        )
    digest = file_sha256(path)
    if digest != entry.sha256:
        raise RuntimeError(
            f"{path} has sha256 {digest}, expected {entry.sha256}: the file is not the shipped one (a Git LFS "
            "pointer, a partial checkout or a local edit); restore it with `git checkout -- <file>` or reinstall"
        )
    return str(path)


def retrain(name: str, output: str | Path, overrides: list[str] | None = None) -> Path:
    """Train zoo model ``name`` again with its shipped config, through the library (``TrainCLI``, no subprocess).

    Everything goes under ``output``: ``<name>_run/`` (``train_overrides.yaml``, the settings stacked on the shipped
    config to move every output there; the run's config, CSV logs and, while training, ``checkpoints/last.ckpt``
    only) and the exported ``<name>.safetensors``. Starting again with the same ``output``
    after an interruption resumes from ``last.ckpt``; once the weights are exported the checkpoints are deleted.

    Args:
        name: a key of ``MODELS``.
        output: output directory.
        overrides: extra ``train.py fit`` arguments (e.g. ``["--trainer.max_steps=20"]`` for a smoke test).

    Returns:
        The exported weights file.
    """
    import yaml

    from .cli import train_main
    from .io import atomic_write

    entry = _entry(name)
    out = Path(output).resolve()
    run = out / f"{name}_run"
    ckpt_dir = run / "checkpoints"
    weights = out / f"{name}.safetensors"
    shipped = entry.path("config")
    config: dict[str, Any] = yaml.safe_load(shipped.read_text(encoding="utf-8"))
    # Stacked on the shipped file rather than a rewritten copy of it: paths in it (a backbone fragment named
    # relative to the config) keep resolving next to the shipped file.
    trainer: dict[str, Any] = {"default_root_dir": str(run)}
    logger = config.get("trainer", {}).get("logger")
    if isinstance(logger, dict) and "save_dir" in logger.get("init_args", {}):
        trainer["logger"] = {"init_args": {"save_dir": str(run)}}
    shipped_callbacks = config.get("trainer", {}).get("callbacks") or []
    callbacks = [c for c in shipped_callbacks if not c["class_path"].endswith(("ModelCheckpoint", "EtaLogger"))]
    # Only what resuming needs: one rolling last.ckpt, no top-k history; one ETA line under the zoo name.
    callbacks.append(
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(ckpt_dir), "save_last": True, "save_top_k": 0, "every_n_train_steps": 50},
        }
    )
    callbacks.append({"class_path": "regionembed.callbacks.EtaLogger", "init_args": {"name": f"regionembed:{name}"}})
    trainer["callbacks"] = callbacks  # a list replaces the shipped list as a whole
    stacked = {"trainer": trainer, "model": {"init_args": {"export_path": str(weights)}}}
    run.mkdir(parents=True, exist_ok=True)
    stacked_file = run / "train_overrides.yaml"
    with atomic_write(stacked_file, "w") as fh:
        yaml.safe_dump(stacked, fh, sort_keys=False)
    args = ["fit", f"--config={shipped}", f"--config={stacked_file}", *(overrides or [])]
    last = ckpt_dir / "last.ckpt"
    if last.is_file():
        log.warning("regionembed:%s: resuming from %s", name, last)
        args.append(f"--ckpt_path={last}")
    log.warning("regionembed:%s: training into %s; an ETA measured on this machine follows", name, run)
    train_main(args)
    if not weights.is_file():
        raise FileNotFoundError(f"training {name} finished without writing {weights}")
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # exported: nothing left to resume
    return weights


def _report(name: str, path: str | Path) -> dict[str, Any]:
    from .backbones import OpenCLIPBackbone
    from .bench.probe import probe_synthetic_clip

    backbone = OpenCLIPBackbone(_entry(name).model_name, pretrained=str(path)).eval()
    return {"file": str(path), "sha256": file_sha256(path), "probe": probe_synthetic_clip(backbone)}


def main(argv: list[str] | None = None) -> None:
    """``python -m regionembed.zoo {verify,retrain} NAME [--output DIR]``: prints JSON."""
    parser = argparse.ArgumentParser(prog="python -m regionembed.zoo", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["verify", "retrain"])
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument("--output", default="outputs/zoo", help="retrain: output directory")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    shipped = _report(args.name, resolve(args.name))
    if args.command == "verify":
        print(json.dumps({"shipped": shipped}, indent=2))
        return
    fresh = _report(args.name, retrain(args.name, args.output, overrides))
    report = {"shipped": shipped, "retrained": fresh, "identical": shipped["sha256"] == fresh["sha256"]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
