"""The YAML configs shipped in the package, named ``regionembed:<path>`` on the command line.

The package carries the repository's ``configs/`` tree (``regionembed/configs/``, package data), so an installed
regionembed runs its jobs from any working directory::

    regionembed-infer test --config regionembed:infer/region_cls_synthetic.yaml
    regionembed-train fit --config regionembed:tests/tiny_clip.yaml --trainer.max_steps=2
    regionembed-infer single scene.png mask.png --model.init_args.backbone=regionembed:backbone/tiny.yaml

``regionembed:`` names what ships with the package, as in ``pretrained: regionembed:clip_synthetic`` (weights); a
config name is a path below ``configs/`` ending in ``.yaml`` (after ``--config`` the suffix may be left out).
Inside a YAML file, a backbone fragment is named by a path relative to that file (``backbone:
../backbone/clip_synthetic.yaml``), which jsonargparse resolves, so the shipped files refer to each other the same way
in a checkout and in an installation.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path, PurePosixPath

__all__ = ["PREFIX", "config_dir", "config_path", "expand_config_args", "list_configs"]

PREFIX = "regionembed:"
_SUFFIXES = (".yaml", ".yml")
_CONFIG_FLAGS = ("--config", "-c")


def config_dir() -> Path:
    """The folder of the shipped configs (``regionembed/configs`` of this installation).

    Raises:
        FileNotFoundError: the package has no ``configs`` folder (a broken installation), or is not on a file
            system (e.g. imported from a zip file, where jsonargparse could not read the files).
    """
    root = resources.files("regionembed") / "configs"
    if not isinstance(root, Path) or not root.is_dir():
        raise FileNotFoundError(
            f"regionembed's shipped configs are missing ({root}): reinstall the package (pip install regionembed)"
        )
    return root


def list_configs() -> list[str]:
    """Names of every shipped config (``infer/region_cls_synthetic.yaml``, ``backbone/tiny.yaml``, ...), sorted."""
    root = config_dir()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in _SUFFIXES and p.is_file())


def config_path(name: str) -> Path:
    """The file of shipped config ``name`` (with or without the ``regionembed:`` prefix and the ``.yaml`` suffix).

    Raises:
        FileNotFoundError: no shipped config has that name; the message lists the names.
    """
    name = name.removeprefix(PREFIX)
    root = config_dir()
    inside = not PurePosixPath(name).is_absolute() and ".." not in PurePosixPath(name).parts  # stays below configs/
    candidates = [name] if name.endswith(_SUFFIXES) else [name + s for s in _SUFFIXES]
    for candidate in candidates if inside else []:
        if (root / candidate).is_file():
            return root / candidate
    raise FileNotFoundError(
        f"{PREFIX}{name}: no such config shipped with regionembed; the shipped configs are "
        + ", ".join(PREFIX + n for n in list_configs())
    )


def _expand(value: str, after_config_flag: bool) -> str:
    if value.startswith(PREFIX) and (after_config_flag or value.endswith(_SUFFIXES)):
        return str(config_path(value))
    return value


def expand_config_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``regionembed:<name>`` config replaced by the path of the shipped file.

    Replaced: the value of ``--config``/``-c`` (``--config NAME`` or ``--config=NAME``, ``.yaml`` optional) and any
    other option's value that ends in ``.yaml`` (``--model.init_args.backbone=regionembed:backbone/tiny.yaml``).
    Anything else is unchanged, in particular weights such as ``...pretrained=regionembed:clip_synthetic``.

    Raises:
        FileNotFoundError: a ``regionembed:`` config name that is not shipped.
    """
    out: list[str] = []
    previous = None
    for arg in argv:
        if arg.startswith("-") and "=" in arg:
            key, value = arg.split("=", 1)
            arg = f"{key}={_expand(value, key in _CONFIG_FLAGS)}"
        elif previous is not None and previous.startswith("-") and "=" not in previous:
            arg = _expand(arg, previous in _CONFIG_FLAGS)
        out.append(arg)
        previous = arg
    return out
