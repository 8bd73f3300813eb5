"""Resolving ``pretrained`` arguments: local files, hub tags, and a fast, clear failure offline."""

from __future__ import annotations

import os
import socket
from pathlib import Path

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
HUB_HOST = "huggingface.co"


class PretrainedWeightsUnavailable(RuntimeError):
    """Raised when pretrained weights cannot be obtained (offline, missing file).

    Attributes:
        reason: what went wrong without the Python remedy, for entry points that name their own flag instead.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


def looks_like_path(pretrained: str) -> bool:
    """True when ``pretrained`` names a local weights file rather than a hub tag."""
    return pretrained.endswith(WEIGHT_SUFFIXES) or os.sep in pretrained or Path(pretrained).exists()


def resolve_local_file(pretrained: str) -> str:
    """Check that a local weights file exists and has a known suffix; return it as a string path."""
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise PretrainedWeightsUnavailable(f"pretrained weights file not found: {path}")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise PretrainedWeightsUnavailable(
            f"unsupported weights file {path}: expected one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    return str(path)


def load_lightning_backbone_state(path: str, prefix: str = "backbone.model.") -> dict:
    """The backbone weights inside a regionembed Lightning checkpoint (loaded with ``weights_only=True``)."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PretrainedWeightsUnavailable(f"cannot load checkpoint {path} safely (weights_only=True): {err}") from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise PretrainedWeightsUnavailable(f"{path} is not a Lightning checkpoint with a state_dict")
    found = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not found:
        raise PretrainedWeightsUnavailable(f"{path} holds no weights under {prefix!r}")
    return found


def hub_offline(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub cannot be used: ``HF_HUB_OFFLINE`` set, or the host unreachable quickly.

    Without this check, open_clip and timm retry for tens of seconds before failing.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return False
    except OSError:
        return True


def offline_error(what: str, example: str) -> PretrainedWeightsUnavailable:
    """The error raised when a hub download is impossible; ``example`` shows the Python way out."""
    reason = (
        f"{what} must be downloaded from the Hugging Face hub, which is not reachable from this machine "
        "(or HF_HUB_OFFLINE is set and no cached copy exists)"
    )
    return PretrainedWeightsUnavailable(
        f"{reason}. Download the weights on a machine with network access and point `pretrained` at the local file "
        f"instead, e.g. {example}. Files ending in {', '.join(WEIGHT_SUFFIXES)} are accepted; safetensors or "
        "weights-only checkpoints load safely.",
        reason=reason,
    )
