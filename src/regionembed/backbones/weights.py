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


def normalize_pretrained(pretrained: str | bool | None) -> str | bool | None:
    """``None`` for the spellings of "no weights" that reach us as strings (``--...pretrained=null`` on the command
    line arrives as ``"None"`` for a ``str | None`` argument nested in a subclass), else ``pretrained`` unchanged."""
    if isinstance(pretrained, str) and pretrained.strip().lower() in ("", "none", "null"):
        return None
    return pretrained


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


def _short(err: BaseException) -> str:
    """One informative line of a loading error (torch's weights-only text is a page that advises unsafe loading)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines and lines[0].startswith("Weights only load failed") and len(lines) > 1:
        lines = lines[1:]  # skip the advice to load with weights_only=False: the reason follows it
    line = lines[0] if lines else type(err).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def read_error(path: str | os.PathLike) -> BaseException | None:
    """What reading ``path`` safely raises (safetensors, or ``torch.load(weights_only=True)``), or None if it reads.

    Called only after a load failed, to tell an unreadable file from one that does not fit: classifying by the
    loader's exception instead misreads garbage bytes, which the unpickler can fail on with any error type.
    """
    import torch

    try:
        if str(path).endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), "pt"):  # the header and that the file covers every tensor, nothing loaded
                pass
        else:
            try:  # memory-mapped: a multi-GB checkpoint is not loaded a second time
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap can only be used" not in str(err):
                    raise
                torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except Exception as err:  # any failure to read is the answer
        return err
    return None


def weights_error(path: str | os.PathLike, err: BaseException, architecture: str) -> PretrainedWeightsUnavailable:
    """A one-line error naming the weights file: unreadable (corrupt, truncated, unsafe pickle) or wrong architecture.

    The file is read once more, safely, to tell the two apart (only on this failure path).

    Args:
        path: the weights file.
        err: what the loader raised.
        architecture: the model the weights were meant for (named in the message).
    """
    read_err = read_error(path)
    if read_err is not None:
        return PretrainedWeightsUnavailable(
            f"cannot read weights file {path}: it is corrupt or truncated, or holds objects that safe loading refuses "
            f"(only safetensors and weights-only checkpoints are loaded) ({_short(read_err)})"
        )
    return PretrainedWeightsUnavailable(
        f"weights file {path} does not fit the architecture {architecture} (its tensors have other names or shapes: "
        f"{_short(err)}); check `model_name` or use weights made for {architecture}"
    )


def load_lightning_backbone_state(path: str, prefix: str = "backbone.model.") -> dict:
    """The backbone weights inside a regionembed Lightning checkpoint (loaded with ``weights_only=True``)."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PretrainedWeightsUnavailable(
            f"cannot read checkpoint {path}: it is corrupt or truncated, or holds objects that safe loading "
            f"(weights_only=True) refuses ({_short(err)})"
        ) from err
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


def offline_error(what: str, example: str = "", way_out: str | None = None) -> PretrainedWeightsUnavailable:
    """The error raised when a hub download is impossible.

    Args:
        what: what needs the hub (``"open_clip weights ViT-B-16/openai"``).
        example: the Python way out through ``pretrained=`` (a local weights file); the CLI names its own flag.
        way_out: instead of the weights advice, for what ``pretrained`` does not replace (a tokenizer, a model
            folder); the message is then reported whole.
    """
    reason = (
        f"{what} must be downloaded from the Hugging Face hub, which is not reachable from this machine "
        "(or HF_HUB_OFFLINE is set and no cached copy exists)"
    )
    if way_out is not None:  # no separate ``reason``: the CLI would append its `pretrained` flag, not the way out
        return PretrainedWeightsUnavailable(f"{reason}. {way_out}")
    return PretrainedWeightsUnavailable(
        f"{reason}. Download the weights on a machine with network access and point `pretrained` at the local file "
        f"instead, e.g. {example}. Files ending in {', '.join(WEIGHT_SUFFIXES)} are accepted; safetensors or "
        "weights-only checkpoints load safely.",
        reason=reason,
    )
