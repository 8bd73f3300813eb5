"""Reproduce the gradient-attention report: composed retrieval on the synthetic world with and without the loss.

Trains ``configs/train/gradattn_synthetic.yaml`` with the override ``configs/train/overrides/noattn.yaml``
(lambda = 0) and without it (lambda > 0): the same seed, data and steps (each in its own ``train.py fit`` subprocess,
timed). Then evaluates both checkpoints, and the untrained sum-combiner zero-shot model, on the same 500 held-out
triplets with ``configs/infer/gradattn_synthetic.yaml``. Writes ``outputs/gradattn_report/report.json`` and prints a
markdown table.

    OMP_NUM_THREADS=1 python scripts/gradattn_report.py            # about 20 minutes on 2 CPU cores
    python scripts/gradattn_report.py --skip-train                  # re-evaluate existing checkpoints
    python scripts/gradattn_report.py --extra-weights 0.3           # also lambda = 0.3 (own folder)
    python scripts/gradattn_report.py --step-timing 10              # cost of the second-order term per step
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
INFER = ROOT / "configs" / "infer" / "gradattn_synthetic.yaml"
ATTN = "configs/train/gradattn_synthetic.yaml"
NOATTN = "configs/train/overrides/noattn.yaml"  # stacked on ATTN: lambda = 0, its own folders
RUNS = {  # name -> (training config, output folder, overrides)
    "lambda=0": (ATTN, "outputs/gradattn_synthetic_noattn", (f"--config={NOATTN}",)),
    "lambda=1": (ATTN, "outputs/gradattn_synthetic", ()),
}


def weight_run(weight: float) -> tuple[str, str, tuple[str, ...]]:
    """The lambda > 0 config with another weight, in its own folder."""
    folder = f"outputs/gradattn_synthetic_w{weight:g}"
    overrides = (
        f"--model.init_args.attn_weight={weight}",
        f"--trainer.default_root_dir={folder}",
        f"--trainer.logger.init_args.save_dir={folder}",
        f"--trainer.callbacks.dirpath={folder}/checkpoints",  # the ModelCheckpoint is the last callback
    )
    return ATTN, folder, overrides


KEYS = ("R@1", "R@5", "R@10", "R@50", "pointing_game", "energy_pointing_game", "map_miou", "map_dice")


def train(config: str, *overrides: str) -> float:
    start = time.perf_counter()
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "fit",
        f"--config={ROOT / config}",
        "--trainer.enable_progress_bar=false",
        *overrides,
    ]
    subprocess.run(
        cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    )
    return time.perf_counter() - start


def evaluate(folder: Path, *overrides: str) -> dict[str, float]:
    from regionembed.cli import infer_main

    # default_root_dir: the CLI saves its config.yaml there (not in the working directory)
    args = ["test", f"--config={INFER}", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={folder}"]
    cli = infer_main([*args, *overrides])
    return {k.removeprefix("test/"): float(v) for k, v in cli.trainer.callback_metrics.items()}


def step_timing(steps: int, batch_size: int = 32) -> dict[str, float]:
    """Median seconds of one training step (forward + backward) without and with the attention loss, side by side.

    The two kinds of step alternate on the same batch and model (no optimiser step), so machine load affects both
    alike; the ratio is the cost of the map and its second-order backward.
    """
    import statistics

    import torch

    from regionembed.backbones import OpenCLIPBackbone
    from regionembed.data import SyntheticComposedDataModule
    from regionembed.losses import attention_loss, composed_info_nce
    from regionembed.modules import ComposedRetrievalModule

    torch.manual_seed(0)
    backbone = OpenCLIPBackbone("re-synth-vit", pretrained="regionembed:clip_synthetic")
    data = SyntheticComposedDataModule(train_size=batch_size, val_size=1, test_size=1, batch_size=batch_size)
    data.preprocess = backbone.preprocess
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = ComposedRetrievalModule(backbone, combiner="learned", attn_weight=1.0).train()
    times: dict[str, list[float]] = {"lambda=0": [], "lambda>0": []}
    for _ in range(steps + 1):  # the first round warms up
        for name in times:
            module.zero_grad()
            start = time.perf_counter()
            query, target, _, maps = module.forward_batch(batch, maps=name == "lambda>0", create_graph=True)
            loss = composed_info_nce(query, target, module.scale())
            if maps is not None:
                loss = loss + attention_loss(maps, batch["mask"])
            loss.backward()
            times[name].append(time.perf_counter() - start)
    result = {name: statistics.median(t[1:]) for name, t in times.items()}
    result["ratio"] = result["lambda>0"] / result["lambda=0"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-train", action="store_true", help="evaluate existing checkpoints only")
    parser.add_argument("--output", default=str(ROOT / "outputs" / "gradattn_report" / "report.json"))
    parser.add_argument(
        "--extra-weights", type=float, nargs="*", default=[], help="more lambda values (gradattn_synthetic.yaml)"
    )
    parser.add_argument(
        "--step-timing", type=int, default=0, metavar="N", help="only time N training steps with and without the loss"
    )
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if args.step_timing:
        sys.stdout.write(json.dumps(step_timing(args.step_timing), indent=2) + "\n")
        return
    out = Path(args.output)
    report: dict[str, dict] = {}
    report["zero-shot (sum, untrained)"] = {
        "metrics": evaluate(out.parent / "zero_shot", "--ckpt_path=null", "--model.init_args.combiner=sum"),
        "train_seconds": 0.0,
    }
    runs = dict(RUNS)
    runs.update({f"lambda={w:g}": weight_run(w) for w in args.extra_weights})
    for name, (config, folder, overrides) in runs.items():
        seconds = None if args.skip_train else train(config, *overrides)
        ckpt = ROOT / folder / "checkpoints" / "last.ckpt"
        metrics = evaluate(out.parent / folder.split("/")[-1], f"--ckpt_path={ckpt}")
        report[name] = {"metrics": metrics, "train_seconds": seconds, "config": config, "overrides": list(overrides)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    header = "| run | train s | " + " | ".join(KEYS) + " |"
    lines = [header, "|" + "---|" * (len(KEYS) + 2)]
    for name, entry in report.items():
        m = entry["metrics"]
        secs = "-" if entry["train_seconds"] is None else f"{entry['train_seconds']:.0f}"
        lines.append(f"| {name} | {secs} | " + " | ".join(f"{100 * m.get(k, float('nan')):.1f}" for k in KEYS) + " |")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
