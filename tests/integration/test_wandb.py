"""W&B offline: overlays and the per-region table land in the offline run's files (subprocess, own env)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.wandb
def test_wandb_offline_media_and_table(region_folder, tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "infer.py"),
        "test",
        f"--config={ROOT / 'configs' / 'infer' / 'maskinversion.yaml'}",
        f"--model.init_args.backbone={ROOT / 'configs' / 'backbone' / 'tiny.yaml'}",
        f"--config={ROOT / 'configs' / 'logger' / 'wandb.yaml'}",
        f"--data.root={region_folder}",
        "--model.init_args.solver.init_args.iterations=2",
        "--model.init_args.prompts=[a square, a circle]",
        "--trainer.enable_progress_bar=false",
        f"--writer.output_dir={tmp_path / 'out'}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media"
    assert len(list((media / "images").rglob("*.png"))) >= 6  # 2 images x 3 regions (+ table cells)
    tables = list((media / "table").rglob("*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["image_id", "region", "final_dice_loss", "best_prompt", "overlay"]
    assert len(table["data"]) == 6
    assert {row[3] for row in table["data"]} <= {"a square", "a circle"}
