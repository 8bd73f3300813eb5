"""Every command block in README runs as written (with small settings), or says why it cannot run here.

Each fenced ``bash`` block of README.md must follow a marker line:

* ``<!-- readme-test: run [ARGS] -->``: every ``infer.py``/``train.py``/script line of the block runs, with ARGS
  appended (e.g. fewer test scenes), in a scratch copy of the repository's configs, scripts and example files;
* ``<!-- readme-test: skip REASON -->``: not run by this test (set-up and the test command itself, which CI runs,
  or commands that need the user's own photo or downloaded weights).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!--\s*readme-test:\s*(run|skip)\b\s*(.*?)\s*-->")
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def readme_blocks(text: str) -> list[tuple[str, str, str]]:
    """``(kind, args_or_reason, commands)`` for every bash block; kind is ``missing`` without a marker."""
    blocks = []
    for match in BLOCK.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        marker = MARKER.fullmatch(before[-1].strip()) if before else None
        kind, extra = (marker.group(1), marker.group(2)) if marker else ("missing", "")
        blocks.append((kind, extra, match.group(1)))
    return blocks


def commands(block: str) -> list[str]:
    """The block's command lines, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


BLOCKS = readme_blocks((ROOT / "README.md").read_text())


def test_every_bash_block_is_marked():
    missing = [cmds.splitlines()[0] for kind, _, cmds in BLOCKS if kind == "missing"]
    assert BLOCKS and not missing, f"README bash blocks without a readme-test marker: {missing}"
    assert any(kind == "run" for kind, _, _ in BLOCKS)


@pytest.mark.parametrize(
    ("extra", "block"),
    [pytest.param(extra, cmds, id=commands(cmds)[0][:60]) for kind, extra, cmds in BLOCKS if kind == "run"],
)
def test_readme_block_runs(extra, block, tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("configs", "scripts", "infer.py", "train.py"):
        (work / name).symlink_to(ROOT / name)
    if (ROOT / "docs" / "example").is_dir():  # copied: commands may write next to it, never into the checkout
        shutil.copytree(ROOT / "docs" / "example", work / "docs" / "example")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }
    for line in commands(block):
        assert line.startswith(".venv/bin/python "), f"README commands use the venv's python: {line}"
        line = line.replace(".venv/bin/python", f'"{sys.executable}"', 1)
        if extra and re.search(r"\b(infer|train)\.py\b", line):
            line = f"{line} {extra}"
        run = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{line}\n--- stderr ---\n{run.stderr[-3000:]}"
