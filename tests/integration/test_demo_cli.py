"""The command line the browser demo shows reproduces the demo's run (``regionembed-infer single`` in a subprocess)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from regionembed.demo import core

REPO = Path(__file__).resolve().parents[2]


def test_command_line_reproduces_the_run(tmp_path):
    """The command shown in the page, run as a subprocess, writes the same embeddings, maps and probabilities."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
    layer = np.zeros((80, 96, 4), np.uint8)
    layer[10:40, 5:30] = (255, 0, 0, 255)
    mask = np.zeros((80, 96), np.uint8)
    mask[40:70, 50:90] = 255
    Image.fromarray(mask).save(tmp_path / "upload.png")
    settings = core.RunSettings(prompts=["a cat", "a dog"], iterations=3, lr=0.3, explainer=None, methods=[])
    result = core.run(
        core.ModelSpec("re-tiny-vit"), tmp_path / "run", image, settings,
        brush_layers=[Image.fromarray(layer, "RGBA")], mask_files=[tmp_path / "upload.png"], boxes="60 2 90 20",
    )  # fmt: skip
    args = shlex.split(result.command)
    assert args[:2] == ["regionembed-infer", "single"]
    # the console script regionembed-infer is regionembed.cli:infer_main, as the checkout's infer.py
    args = [sys.executable, str(REPO / "infer.py"), *args[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = tmp_path / "run" / "cli" / "image" / "embeddings.safetensors"
    with safe_open(result.embeddings, "pt") as ours, safe_open(cli, "pt") as theirs:
        for key in ("embeddings", "maps", "image_embedding"):
            torch.testing.assert_close(ours.get_tensor(key), theirs.get_tensor(key), atol=1e-5, rtol=1e-5)
    manifest = json.loads((cli.parent / "manifest.json").read_text())
    probs = [[r["prompt_probabilities"][p] for p in settings.prompts] for r in manifest["regions"]]
    np.testing.assert_allclose(probs, result.probabilities, atol=1e-5)
