"""The explainer report: zero-shot localization, map/mask agreement and faithfulness of every explainer.

Runs ``python infer.py test --config configs/infer/localization_synthetic.yaml`` (LeGrad, Grad-CAM, Score-CAM,
VL-Score, attention rollout and MaskInversion's maps on unseen synthetic test scenes, with the project-trained tiny
CLIP) in a subprocess and formats its results JSON as the README's markdown tables, with the wall time of the run.
Every number comes from that one run (time per map included).

    python scripts/explainer_report.py [--test-size 60] [--output outputs/localization_synthetic]
    python scripts/explainer_report.py --results outputs/localization_synthetic/results.json   # format only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "infer" / "localization_synthetic.yaml"

NAMES = {
    "legrad": "LeGrad",
    "gradcam": "Grad-CAM",
    "scorecam": "Score-CAM",
    "vlscore": "VL-Score",
    "attentionrollout": "attention rollout",
    "mask_inversion": "MaskInversion (GT mask)",
}
COLUMNS = [
    ("pointing_game", "pointing game", "pct"),
    ("energy_pointing_game", "energy pointing", "pct"),
    ("map_miou", "mask IoU", "pct"),
    ("gt_known_loc", "GT-known Loc", "pct"),
    ("top1_loc", "Top-1 Loc", "pct"),
    ("top5_loc", "Top-5 Loc", "pct"),
    ("maxboxacc_v2", "MaxBoxAccV2", "pct"),
    ("deletion_auc", "deletion AUC (lower better)", "score"),
    ("insertion_auc", "insertion AUC", "score"),
    ("contrastive_gap", "contrastive gap", "score"),
    ("not_present", "not present", "pct"),
    ("ms_per_map", "ms / map", "ms"),
]


def _cell(value: float, kind: str) -> str:
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "ms":
        return f"{value:.1f}"
    return f"{value:.3f}"


def format_report(payload: dict) -> str:
    """Markdown table of a LocalizationModule results JSON (percentages, score units, milliseconds)."""
    lines = [
        "| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for name, row in payload["results"].items():
        cells = [_cell(row.get(key, float("nan")), kind) for key, _, kind in COLUMNS]
        lines.append(f"| {NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    cls = payload.get("classification", {})
    if cls:
        lines.append("")
        lines.append(
            (f"{payload['num_queries']} queries. " if "num_queries" in payload else "")
            + f"Query classification from the global embedding (other present classes excluded): top-1 "
            f"{100 * cls['top1']:.1f}%, top-5 {100 * cls['top5']:.1f}%."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--test-size", type=int, default=None, help="test scenes (default: the config's)")
    parser.add_argument("--output", default="outputs/localization_synthetic", help="folder of results.json")
    parser.add_argument("--results", default=None, help="format an existing results JSON instead of running")
    args, extra = parser.parse_known_args()
    if args.results:
        payload = json.loads(Path(args.results).read_text())
        print(format_report(payload))
        return
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    cmd = [
        sys.executable,
        str(ROOT / "infer.py"),
        "test",
        f"--config={Path(args.config).resolve()}",
        f"--model.init_args.results_path={results}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={out}",
        *([f"--data.init_args.test_size={args.test_size}"] if args.test_size is not None else []),
        *extra,
    ]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - start
    payload = json.loads(results.read_text())
    shown = " ".join(cmd[1:]).replace(f"{ROOT}/", "")
    report = format_report(payload) + f"\n\nCommand: `python {shown}`; wall time {wall:.0f} s.\n"
    (out / "report.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
