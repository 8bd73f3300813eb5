"""The package without the repository: a non-editable ``pip install .`` runs the main job from another directory,
and the sdist and the wheel carry every shipped config as a file."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from regionembed import zoo

ROOT = Path(__file__).resolve().parents[2]
#: what building the package reads from a checkout (configs/ is the target of the src/regionembed/configs link)
SOURCES = ("pyproject.toml", "README.md", "src", "configs")
MAIN_JOB = "infer/region_cls_synthetic.yaml"
RESULTS = "outputs/region_cls_synthetic/results.json"  # the main job's table, relative to its working directory
SMALL = ["--data.init_args.test_size=4", "--data.init_args.batch_size=2", "--trainer.enable_progress_bar=false"]


def _copy_checkout(dest: Path) -> Path:
    """The package's sources copied with their links (builds write build/ and *.egg-info next to them)."""
    # the builds below use this environment's setuptools (no build isolation, nothing downloaded)
    assert importlib.util.find_spec("setuptools.command.bdist_wheel"), "needs setuptools>=70.1: pip install -e '.[dev]'"
    dest.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
            shutil.copytree(ROOT / name, dest / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, dest / name)
    assert (dest / "src" / "regionembed" / "configs").is_symlink(), "the package's configs are the repository's"
    return dest


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def _run(cmd: list[str], cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env={**_env(), **env}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n--- stdout ---\n{proc.stdout[-2000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    return proc


def _shipped(root: Path) -> dict[str, bytes]:
    """``{relative path: content}`` of every YAML below ``root`` (links followed, as a build does)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.yaml"))}


def _build(kind: str, source: Path, out: Path) -> Path:
    """``setuptools.build_meta.build_{kind}`` of ``source`` into ``out`` (a subprocess: builds chdir and log)."""
    code = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(out)!r}))"
    return out / _run([sys.executable, "-c", code], source).stdout.strip().splitlines()[-1]


def test_sdist_and_wheel_carry_every_config_as_a_file(tmp_path):
    """The sdist holds the configs as files (not links), and a wheel built from the sdist, as pip does, has them all,
    the shipped weights and the console scripts."""
    configs = _shipped(ROOT / "configs")
    assert "infer/region_cls_synthetic.yaml" in configs and "train/clip_synthetic.yaml" in configs  # a link itself
    sdist = _build("sdist", _copy_checkout(tmp_path / "checkout"), tmp_path)
    with tarfile.open(sdist) as tar:
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/src/regionembed/configs/"
        members = {m.name.removeprefix(prefix): m for m in tar.getmembers() if m.name.startswith(prefix)}
        assert all(members[name].isfile() for name in configs), "configs in the sdist are files, not links"
        assert {name: tar.extractfile(members[name]).read() for name in configs} == configs
        tar.extractall(tmp_path / "unpacked", filter="data")
    wheel = _build("wheel", tmp_path / "unpacked" / sdist.name.removesuffix(".tar.gz"), tmp_path)
    with zipfile.ZipFile(wheel) as whl:
        assert {name: whl.read(f"regionembed/configs/{name}") for name in configs} == configs
        weights = whl.read(f"regionembed/weights/{zoo.MODELS['clip_synthetic'].weights}")
        entry_points = whl.read(next(n for n in whl.namelist() if n.endswith("entry_points.txt"))).decode()
    assert hashlib.sha256(weights).hexdigest() == zoo.MODELS["clip_synthetic"].sha256
    assert "regionembed-infer = regionembed.cli:infer_command" in entry_points
    assert "regionembed-train = regionembed.cli:train_command" in entry_points


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with this checkout ``pip install``-ed into it (not editable); its ``bin`` folder.

    The venv reaches the already installed dependencies through a ``.pth`` file (nothing is downloaded), which does
    not run the ``.pth`` files found there: an editable regionembed of this environment stays invisible, as the test
    below checks.
    """
    tmp = tmp_path_factory.mktemp("install")
    source = _copy_checkout(tmp / "checkout")
    venv.create(tmp / "venv", with_pip=False)
    python = tmp / "venv" / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp).stdout.strip()
    (Path(purelib) / "_regionembed_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(source)], tmp)
    return python.parent


@pytest.fixture(scope="module")
def main_job(installed, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The main job (4 scenes) by the installed console script and the shipped config name, in an empty folder."""
    work = tmp_path_factory.mktemp("work")
    return work, _run(
        [str(installed / "regionembed-infer"), "test", "--config", f"regionembed:{MAIN_JOB}", *SMALL], work
    )


def test_pip_install_runs_the_main_job_from_another_directory(installed, main_job):
    where = _run(
        [
            str(installed / "python"),
            "-c",
            "import regionembed, regionembed.config_files as c; "
            "print(regionembed.__file__); print(c.config_path('infer/region_cls_synthetic.yaml').resolve())",
        ],
        main_job[0],
    ).stdout.split()
    assert all(Path(p).is_relative_to(installed.parent) for p in where), f"not the fresh installation: {where}"

    work, run = main_job
    table = work / RESULTS
    assert f"results table (JSON): {RESULTS}" in run.stderr + run.stdout
    results = json.loads(table.read_text())["results"]
    assert len(results) == 10 and {"global", "mask_inversion", "crop_square", "red_circle"} <= results.keys()
    assert all(0 <= m["top1"] <= 1 for m in results.values())
    assert sorted(p.name for p in work.iterdir()) == ["outputs"], "everything under the job's output folder"


@pytest.mark.slow
def test_installed_main_job_gives_the_numbers_of_the_checkout(main_job, tmp_path):
    checkout_job = [sys.executable, str(ROOT / "infer.py"), "test", f"--config={ROOT / 'configs' / MAIN_JOB}", *SMALL]
    _run(checkout_job, tmp_path, PYTHONPATH=str(ROOT / "src"))
    results = json.loads((main_job[0] / RESULTS).read_text())["results"]
    expected = json.loads((tmp_path / RESULTS).read_text())["results"]
    assert results.keys() == expected.keys()
    for method, metrics in results.items():  # other thread counts or kernels: equal up to float sums
        assert metrics == pytest.approx(expected[method], abs=1e-6), method


@pytest.mark.slow
def test_installed_package_trains(installed, tmp_path):
    """One step of the tiny test config through ``regionembed-train`` and the shipped config name."""
    train = [
        str(installed / "regionembed-train"),
        "fit",
        "--config=regionembed:tests/tiny_clip.yaml",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.callbacks.dirpath={tmp_path / 'checkpoints'}",
    ]
    _run(train, tmp_path)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
