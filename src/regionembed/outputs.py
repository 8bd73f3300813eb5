"""Output folders that cannot be tricked: safe file names, one staged folder per image, run keys, an output lock.

Everything a prediction writer needs to keep an output folder consistent, in plain Python (no Lightning):

* :func:`safe_filename` / :func:`safe_filenames` turn untrusted names (image ids, region names) into single path
  components that cannot leave the output folder, are valid on Linux, macOS and Windows, and stay distinct on
  case-insensitive file systems. The original names are kept in the manifest.
* :func:`write_staged_folder` writes one image's files into a hidden staging folder and swaps it in with renames, so
  a reader sees either the previous complete folder or the new complete folder, never a mix of two runs.
* :func:`fingerprint_inputs` / :func:`fingerprint_settings` / :func:`run_key` hash what produced a folder; a re-run
  skips folders whose key matches.
* :class:`OutputLock` lets one run at a time write into an output folder; a second run is refused at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "ConcurrentWriteError",
    "OutputLock",
    "OutputLockedError",
    "check_output_dir",
    "clean_stale_staging",
    "fingerprint_inputs",
    "fingerprint_settings",
    "run_key",
    "safe_filename",
    "safe_filenames",
    "tensor_bytes",
    "write_staged_folder",
]

log = logging.getLogger(__name__)

LOCK_NAME = ".regionembed.lock"
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._ -]{0,99}")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_UMASK = os.umask(0)
os.umask(_UMASK)


class ConcurrentWriteError(RuntimeError):
    """Another writer replaced an image folder while this one was writing it."""


class OutputLockedError(RuntimeError):
    """Another run holds the output folder's lock."""


# ------------------------------------------------------------------------------------------------ names
def _is_plain(name: str) -> bool:
    if not _PLAIN.fullmatch(name) or name.endswith((".", " ")):
        return False
    return name.split(".")[0].rstrip(" ").upper() not in _WINDOWS_RESERVED


def safe_filename(name: str, force_hash: bool = False) -> str:
    """A single, portable path component for an untrusted name.

    Plain names (ASCII letters, digits, ``_``, and ``.``/``-``/space after the first character, at most 100
    characters, not a Windows device name such as ``CON`` or ``nul.txt``) are returned unchanged. Anything else
    (``..``, ``../../evil``, ``/abs``, ``~``, NUL bytes, non-ASCII, leading dots) becomes ``<slug>~<hash>``: the
    letters, digits, ``_`` and ``-`` of the name and 12 hex digits of its SHA-256, so distinct names stay distinct
    and the result never contains a path separator. ``~`` never occurs in plain names, so encoded and plain names
    cannot collide.

    Args:
        name: the untrusted name (an image id, a region name).
        force_hash: encode even a plain name (used to separate names that differ only in case).
    """
    if not isinstance(name, str):
        raise TypeError(f"names must be strings, got {type(name).__name__}: {name!r}")
    if not force_hash and _is_plain(name):
        return name
    # no dots in the slug: Windows reserves device names whatever follows the first dot ("nul.txt~...")
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_-")[:48] or "x"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{slug}~{digest}"


def safe_filenames(names: Sequence[str]) -> list[str]:
    """:func:`safe_filename` for names that share a folder: unique, also on case-insensitive file systems.

    Names that differ only in case (``Cat``, ``cat``) are all hash-encoded, so each keeps its own file on macOS and
    Windows too.

    Raises:
        ValueError: two names are identical.
    """
    names = list(names)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"names must be unique, these occur more than once: {duplicates}")
    out = [safe_filename(n) for n in names]
    folded = [o.casefold() for o in out]
    clash = {f for f in folded if folded.count(f) > 1}
    return [safe_filename(n, force_hash=True) if f in clash else o for n, o, f in zip(names, out, folded, strict=True)]


def _inside(root: Path, name: str) -> Path:
    """``root / name``, refusing anything that is not a single component directly inside ``root``."""
    path = root / name
    if name in ("", ".", "..") or path.parent != root or Path(name).name != name:
        raise ValueError(f"refusing to write {name!r}: not a plain file name inside {root}")
    return path


# --------------------------------------------------------------------------------------------- hashing
def fingerprint_inputs(image: bytes, masks: Iterable[tuple[str, bytes]]) -> str:
    """SHA-256 of an image's bytes and its ``(name, bytes)`` masks, in order (what a re-run must match)."""
    h = hashlib.sha256(b"regionembed-inputs-v1\0")
    h.update(hashlib.sha256(image).digest())
    for name, data in masks:
        h.update(name.encode("utf-8", "surrogatepass") + b"\0")
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (any dtype, any device), for fingerprints."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def fingerprint_settings(settings: dict[str, Any], module: nn.Module | None = None) -> str:
    """SHA-256 of JSON-able settings and, optionally, every tensor of ``module``'s state dict (the weights).

    Hashing the weights (about a second per GB) makes a random-init model with another seed, or a weights file
    replaced under the same name, count as different settings.
    """
    h = hashlib.sha256(b"regionembed-settings-v1\0")
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    if module is not None:
        for key, value in module.state_dict().items():
            h.update(f"\0{key}:{value.dtype}:{tuple(value.shape)}\0".encode())
            h.update(tensor_bytes(value))
    return h.hexdigest()


def run_key(format_version: int, inputs: str, settings: str, options: dict[str, Any] | None = None) -> str:
    """The key a folder's manifest and safetensors metadata carry: output format, inputs, settings, options."""
    payload = json.dumps([format_version, inputs, settings, options or {}], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# ------------------------------------------------------------------------------------------ folders
def _mkdtemp(root: Path, prefix: str, suffix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=root))
    os.chmod(path, 0o777 & ~_UMASK)  # mkdtemp creates 0700; outputs should get the usual permissions
    return path


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def write_staged_folder(root: str | os.PathLike, name: str, fill: Callable[[Path], None]) -> Path:
    """Create ``root/name`` as a whole: ``fill(staging)`` writes the files, then the folder is swapped in.

    The staging folder ``root/.<name>.*.staging`` is renamed to ``root/name``; a previous ``root/name`` is first
    renamed aside (``.<name>.*.old``) and deleted after the swap. A crash leaves either the previous folder or the
    new one in place (or, between the two renames, the previous one aside, restored by :func:`clean_stale_staging`),
    never files of two runs in one folder; files of a previous run that the new one does not write (e.g. overlays of
    regions that no longer exist) disappear with it.

    Raises:
        ConcurrentWriteError: another writer created or replaced ``root/name`` meanwhile (its folder is kept, ours
            discarded).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = _inside(root, name)
    before = _identity(final)
    staging = _mkdtemp(root, f".{name}.", ".staging")
    old: Path | None = None
    try:
        fill(staging)
        if _identity(final) != before:
            raise ConcurrentWriteError(
                f"another writer wrote {final} while this one was writing it; two runs must not write the same image "
                "into one output folder (this run's files for it were discarded)"
            )
        if final.exists() or final.is_symlink():
            old = root / f"{staging.name[: -len('.staging')]}.old"
            os.rename(final, old)
        try:
            os.rename(staging, final)
        except OSError as err:  # a non-empty directory appeared at `final` since we moved the old one aside
            raise ConcurrentWriteError(
                f"another writer replaced {final} while this one was writing it; two runs must not write the same "
                "image into one output folder (this run's files for it were discarded)"
            ) from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not final.exists():
            with contextlib.suppress(OSError):
                os.rename(old, final)  # put the previous complete folder back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_stale_staging(root: str | os.PathLike) -> int:
    """Remove staging folders left by killed runs; restore a previous folder a kill left aside. Returns the count.

    Call only while holding the :class:`OutputLock` (no other writer may be staging).
    """
    root = Path(root)
    if not root.is_dir():
        return 0
    count = 0
    for entry in sorted(root.iterdir()):
        if not entry.name.startswith(".") or not entry.is_dir():
            continue
        if entry.name.endswith(".staging"):
            shutil.rmtree(entry, ignore_errors=True)
            count += 1
        elif entry.name.endswith(".old"):
            final = root / entry.name[1:].rsplit(".", 2)[0]
            if not final.exists() and final.parent == root:
                os.rename(entry, final)  # killed between the renames: the previous folder is complete
            else:
                shutil.rmtree(entry, ignore_errors=True)
            count += 1
    if count:
        log.info("cleaned %d staging folder(s) left by an interrupted run in %s", count, root)
    return count


def check_output_dir(path: str | os.PathLike) -> Path:
    """Check, before any compute, that ``path`` is a writable folder, creating it if needed.

    Raises:
        ValueError: naming the path and what is wrong with it.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"output folder {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".write-test."):
            pass
    except OSError as err:
        raise ValueError(f"output folder {path} cannot be created or written: {err.strerror or err}") from err
    return path


# ------------------------------------------------------------------------------------------------ lock
class OutputLock:
    """An exclusive, non-blocking lock on an output folder (``<root>/.regionembed.lock``, ``fcntl.flock``).

    The operating system releases it when the holding process dies, so a killed run never leaves a stale lock. On
    systems without ``fcntl`` (Windows) the lock is a no-op with a warning.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            log.warning("no fcntl on this system: concurrent runs into %s are not detected", self.root)
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise OutputLockedError(
                f"output folder {self.root} is in use by another run ({holder}); wait for it to finish or choose "
                "another output folder"
            ) from err
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
