"""MaskInversion settings vs region accuracy and Dice, per iteration (issue 13, point 4).

Runs ``configs/infer/region_cls_synthetic.yaml`` once with several MaskInversion variants as separate methods (one
pass over the data, ``curves: true``): the official defaults (last block, lr 0.5, 10 iterations, alpha 0), all
blocks, other learning rates, more iterations, the alpha regulariser, and LeGrad scored through the model's own
pooling (``LeGrad(pooling="model")``). Prints one markdown table (final top-1, final Dice loss, top-1 before the
first step, best top-1 and its iteration) and writes ``outputs/inversion_settings/results.json`` with the curves.

    OMP_NUM_THREADS=1 python scripts/inversion_settings.py [--test-size 100]
    python scripts/inversion_settings.py --model re-tiny-vit --weights path/to/weights.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from regionembed.cli import infer_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "infer" / "region_cls_synthetic.yaml"
LEGRAD = "regionembed.explainers.LeGrad"
SOLVER = "regionembed.inversion.MaskInversion"

#: name -> MaskInversion init_args (the official defaults unless said)
SETTINGS: dict[str, dict] = {
    "official": {},
    "all_blocks": {"explainer": {"class_path": LEGRAD, "init_args": {"layers": [0, 1, 2, 3]}}},
    "lr_0p1": {"lr": 0.1},
    "lr_1": {"lr": 1.0},
    "iterations_30": {"iterations": 30},
    "alpha_0p5": {"alpha": 0.5},
    "model_pooling": {"explainer": {"class_path": LEGRAD, "init_args": {"pooling": "model"}}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--test-size", type=int, default=100, help="test scenes (the main job uses 500)")
    parser.add_argument("--model", default=None, help="architecture (default: the config's)")
    parser.add_argument("--weights", default=None, help="weights (default: the config's, regionembed:clip_synthetic)")
    parser.add_argument("--output", default="outputs/inversion_settings")
    args = parser.parse_args()
    methods = [
        {
            "class_path": "regionembed.regions.MaskInversionEmbedding",
            "init_args": {"name": f"mi_{name}", "solver": {"class_path": SOLVER, "init_args": kw}},
        }
        for name, kw in SETTINGS.items()
    ]
    results = Path(args.output) / "results.json"
    argv = [
        "test",
        f"--config={CONFIG}",
        f"--model.init_args.methods={json.dumps(methods)}",
        "--model.init_args.curves=true",
        f"--model.init_args.results_path={results}",
        f"--data.init_args.test_size={args.test_size}",
        "--trainer.enable_progress_bar=false",
    ]
    if args.model:
        argv.append(f"--model.init_args.backbone.init_args.model_name={args.model}")
    if args.weights:
        argv.append(f"--model.init_args.backbone.init_args.pretrained={args.weights}")
    infer_main(argv)
    payload = json.loads(results.read_text())
    lines = [
        "| setting | top1 (final) | Dice loss (final) | top1 before step 1 | best top1 (iteration) |",
        "|---|---|---|---|---|",
    ]
    for name in SETTINGS:
        curve = payload["curves"][f"mi_{name}"]
        top1, dice = curve["top1"], curve["dice"]
        best = max(range(len(top1)), key=top1.__getitem__)
        cells = [f"{100 * top1[-1]:.1f}", f"{dice[-1]:.3f}", f"{100 * top1[0]:.1f}", f"{100 * top1[best]:.1f} ({best})"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
