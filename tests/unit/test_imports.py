"""Library code never imports Lightning; ``regionembed.data`` loads its LightningDataModules on first access."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import regionembed.data

SRC = Path(__file__).resolve().parents[2] / "src"
#: the library packages of STYLE.md and CONTRIBUTING.md ("never imports Lightning"), and the data package itself
LIBRARY = [
    "regionembed.data.collate",
    "regionembed.data.transforms",
    "regionembed.data",
    "regionembed.backbones",
    "regionembed.explainers",
    "regionembed.inversion",
    "regionembed.losses",
    "regionembed.metrics",
    "regionembed.regions",
    "regionembed.composed",
    "regionembed.boxes",
]


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_library_packages_import_without_lightning():
    """In a fresh interpreter: collate and transforms first, then each package in turn; the first that pulls
    Lightning in is named. The check can fail: the data modules do import Lightning, on first access."""
    code = (
        "import regionembed.data.collate, regionembed.data.transforms, sys; "
        "assert 'lightning' not in sys.modules and 'pytorch_lightning' not in sys.modules\n"
        "import importlib\n"
        "for name in sys.argv[1:]:\n"
        "    importlib.import_module(name)\n"
        "    pulled = [m for m in ('lightning', 'pytorch_lightning') if m in sys.modules]\n"
        "    if pulled:\n"
        "        sys.exit(f'{name} imports {pulled}')\n"
        "from regionembed.data import RegionFolderDataModule\n"
        "assert 'lightning' in sys.modules\n"
    )
    proc = _python(code, *LIBRARY)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_lazy_names_of_the_data_package():
    from regionembed.data import RegionFolderDataModule, SyntheticDataModule, collate_composed, scan_folder
    from regionembed.data.folder import RegionFolderDataModule as direct

    assert RegionFolderDataModule is direct
    assert SyntheticDataModule.__module__ == "regionembed.data.synthetic_module"
    assert callable(collate_composed) and callable(scan_folder)
    names = dir(regionembed.data)
    assert set(regionembed.data.__all__) <= set(names)
    assert len(set(regionembed.data.__all__)) == len(regionembed.data.__all__)
    for name in regionembed.data.__all__:  # every exported name resolves, lazy or not
        assert getattr(regionembed.data, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchDataModule'"):
        regionembed.data.NoSuchDataModule  # noqa: B018
