"""Models this project trains itself, resolved by ``pretrained="regionembed:<name>"``.

No pretrained weights can be downloaded in our environments, so the offline main job uses a tiny CLIP trained on
the synthetic world. The first use trains it (``python train.py fit --config configs/train/<name>.yaml``, in a
subprocess) and caches the exported weights; later uses load the cached safetensors file.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MODELS", "ZooEntry", "cache_dir", "resolve"]

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ZooEntry:
    """A project-trained model: its open_clip architecture and the training config that makes it."""

    model_name: str
    config: str  # relative to the repository root
    minutes: int  # rough training time on 2 CPU cores, for the log message


MODELS = {
    "clip_synthetic": ZooEntry("re-small-vit", "configs/train/clip_synthetic.yaml", 10),
}


def cache_dir() -> Path:
    """Where trained zoo weights live: ``$REGIONEMBED_HOME`` or ``<repo>/outputs/models``."""
    return Path(os.environ.get("REGIONEMBED_HOME", REPO_ROOT / "outputs" / "models"))


def resolve(name: str, model_name: str | None = None, train: bool = True) -> str:
    """Path of the weights of zoo model ``name``, training them first when they are not cached.

    Raises:
        ValueError: unknown name, or ``model_name`` differs from the zoo entry's architecture.
        FileNotFoundError: not cached and ``train`` is False, or the training config is not available.
    """
    if name not in MODELS:
        raise ValueError(f"unknown regionembed model {name!r}; known: {sorted(MODELS)}")
    entry = MODELS[name]
    if model_name is not None and model_name != entry.model_name:
        raise ValueError(f"regionembed:{name} is a {entry.model_name} model, not {model_name}")
    path = cache_dir() / f"{name}.safetensors"
    if path.is_file():
        return str(path)
    config = REPO_ROOT / entry.config
    if not train or not config.is_file():
        raise FileNotFoundError(
            f"{path} not found; train it with `python train.py fit --config {entry.config}` from the repository"
        )
    log.warning("regionembed:%s is not cached: training it now (about %d min on 2 CPU cores)", name, entry.minutes)
    cmd = [
        sys.executable,
        str(REPO_ROOT / "train.py"),
        "fit",
        f"--config={config}",
        f"--model.init_args.export_path={path}",
        f"--trainer.default_root_dir={cache_dir() / (name + '_run')}",
    ]
    subprocess.run(cmd, check=True, cwd=REPO_ROOT)
    if not path.is_file():
        raise FileNotFoundError(f"training {name} finished without writing {path}")
    return str(path)
