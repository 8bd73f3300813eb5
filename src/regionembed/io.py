"""Reading images and masks with clear errors, preprocessing for a backbone, and atomic writes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .backbones.base import PreprocessSpec

log = logging.getLogger(__name__)

__all__ = [
    "InputError",
    "MissingInputError",
    "atomic_write",
    "load_image",
    "load_mask",
    "preprocess_image",
    "save_json",
    "save_safetensors",
]

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once at import: changing it later would race with other threads creating files


class InputError(ValueError):
    """A bad input file or folder (unreadable, wrong size, empty, misnamed); the message names it.

    The command lines report it as one ``error:`` line; being a ``ValueError``, callers may catch it as before.
    """


class MissingInputError(InputError, FileNotFoundError):
    """An input file or folder that does not exist (also a ``FileNotFoundError``)."""


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: errors Pillow raises for files it cannot decode (DecompressionBombError derives from Exception only)
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _decode_error(what: str, path: Path, err: Exception) -> InputError:
    if isinstance(err, Image.DecompressionBombError):
        return InputError(
            f"{what} {path} is too large to decode safely ({err}); if you trust the file, raise "
            "PIL.Image.MAX_IMAGE_PIXELS before running"
        )
    return InputError(f"cannot read {what} {path}: {err}")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as RGB; raise ``ValueError`` naming the file if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncated or corrupt files fail here, not later in a worker
            return img.convert("RGB")
    except _DECODE_ERRORS as err:
        raise _decode_error("image", path, err) from err


def _palette_mask(img: Image.Image, name: str) -> np.ndarray:
    """Palette masks by their colours: indices are arbitrary (PIL's adaptive palette puts white at index 0)."""
    rgba = np.asarray(img.convert("RGBA"))
    alpha = rgba[..., 3]
    if alpha.min() != alpha.max():  # a transparent index: the opaque part is the region
        return alpha.astype(np.float32) / 255.0
    rgb = img.convert("RGB")
    grey = np.asarray(rgb.convert("L"))
    levels = np.unique(grey)
    colours = np.unique(np.asarray(rgb).reshape(-1, 3), axis=0)
    indices = np.unique(np.asarray(img))
    if not len(indices) == len(colours) == len(levels):
        raise InputError(
            f"{name} is a palette image whose {len(indices)} used indices show {len(colours)} colour(s) and "
            f"{len(levels)} grey level(s): indices that look alike make the region ambiguous; re-save it as a grey "
            "0/255 PNG"
        )
    if len(levels) == 2:  # two colours: the brighter is the region, whatever the indices
        return (grey == levels[1]).astype(np.float32)
    if len(levels) == 1:
        return np.full(grey.shape, float(levels[0] > 0), np.float32)
    return grey.astype(np.float32) / 255.0  # more than two colours: their grey levels, as for RGB masks


def _sixteen_bit_mask(arr: np.ndarray, name: str) -> np.ndarray:
    """16-bit masks are 0/1, 0/255 or full-range 0/65535; a scale cannot be guessed from any other maximum."""
    top = float(arr.max())
    if top <= 1 or top == 255 or top == 65535:
        return arr / max(top, 1.0) if top > 1 else arr
    levels = np.unique(arr)
    if len(levels) == 2 and levels[0] == 0:
        log.warning(
            "%s is a 16-bit mask with values 0/%d (neither 0/1, 0/255 nor 0/65535): read as binary, %d = region",
            name,
            int(top),
            int(top),
        )
        return (arr > 0).astype(np.float32)
    raise InputError(
        f"{name} is a 16-bit mask with maximum {top:g}: values must be 0/1, 0/255 or use the full 0-65535 range "
        "(the scale of a soft mask cannot be guessed otherwise); re-save it as an 8-bit 0-255 PNG"
    )


def mask_from_pil(img: Image.Image, name: str = "mask") -> np.ndarray:
    """Convert a PIL mask to float32 ``[H, W]`` in [0, 1].

    Rules: RGBA/LA masks use the alpha channel when it varies (a cut-out), else their grey levels; RGB masks are
    converted to grey; palette masks are read by their colours (transparency if any, else the brighter of two
    colours is the region, else grey levels), never by their indices; 8-bit values are 0/255 or 0/1 (divided by
    255 when the maximum exceeds 1); 16-bit values are 0/1, 0/255 or full-range 0/65535 (two levels 0/v are read
    as binary with a warning; other ranges are refused). Non-binary values are kept as soft targets.
    """
    mode = img.mode
    if mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min() != alpha.max():
            arr = alpha.astype(np.float32)
        else:
            arr = np.asarray(img.convert("L")).astype(np.float32)
    elif mode == "P":
        arr = _palette_mask(img, name)
    elif mode == "1":
        arr = np.asarray(img).astype(np.float32)
    elif mode.startswith("I;16") or mode == "I":
        arr = _sixteen_bit_mask(np.asarray(img).astype(np.float32), name)
    elif mode == "F":
        arr = np.asarray(img).astype(np.float32)
    else:
        arr = np.asarray(img.convert("L")).astype(np.float32)
    if arr.max() > 1.0:
        arr = arr / 255.0
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or infinite values")
    if arr.min() < 0 or arr.max() > 1:
        raise InputError(f"{name} has values outside [0, 1] after scaling: [{arr.min():g}, {arr.max():g}]")
    return arr


def load_mask(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask file (grey, RGB, RGBA, palette; 0/255 or 0/1) as float32 ``[H, W]`` in [0, 1].

    Args:
        path: the mask file.
        size: ``(width, height)`` of the image the mask belongs to; a mask of another size is an error.

    Raises:
        ValueError: unreadable file, size mismatch, or an empty (all-zero) mask.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"mask not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            arr = mask_from_pil(img, name=f"mask {path}")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise _decode_error("mask", path, err) from err
    if size is not None and (arr.shape[1], arr.shape[0]) != tuple(size):
        raise InputError(
            f"mask {path} is {arr.shape[1]}x{arr.shape[0]} but its image is {size[0]}x{size[1]} (width x height)"
        )
    if arr.max() <= 0:
        raise InputError(f"mask {path} is empty (all zeros): there is no region to invert")
    return arr


def preprocess_image(image: Image.Image, spec: PreprocessSpec) -> torch.Tensor:
    """Square resize to the model's size (no crop, as the official MaskInversion), to tensor, normalise.

    The same path as the data modules' evaluation transform (``mode="squash"``): it calls
    :func:`regionembed.data.transforms.preprocess_array`, so a given image gives the same tensor either way.

    Returns:
        ``[3, S, S]`` float tensor.

    Raises:
        ValueError: an unknown ``spec.interpolation`` (the message names the setting).
    """
    # imported here: regionembed.data imports this module (load_image, errors)
    from .data.transforms import preprocess_array

    return preprocess_array(np.asarray(image.convert("RGB")), spec)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Write to a temporary file beside ``path`` and move it into place only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; results should get the usual permissions
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """Atomically write ``obj`` as indented JSON."""
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


def _canonical_header(data: bytes) -> bytes:
    """Sort the metadata keys of serialised safetensors: the library writes them in a per-process hash order, so the
    same content would give different bytes in different runs (and a resumed run would not match a straight one)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(raw) > n:  # cannot happen for the same content; keep the library's bytes rather than break the file
        return data
    return data[:8] + raw + b" " * (n - len(raw)) + data[8 + n :]


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Atomically write tensors (made contiguous, on CPU) to a safetensors file."""
    from safetensors.torch import save

    data = _canonical_header(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata))
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Atomically write a uint8 ``[H, W]`` or ``[H, W, 3]`` array as PNG."""
    with atomic_write(path, "wb") as fh:
        Image.fromarray(array).save(fh, format="PNG")
