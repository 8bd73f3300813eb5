"""Benchmark of the MaskInversion map strategies: wall time, time per mask, peak memory.

Every case runs in a fresh subprocess (so peak memory is that case's own) on the same randomly initialised model,
image and masks; all cases of one invocation run side by side on the same machine, so their ratios are comparable.
For the table strategies (``precomputed``, ``attention_pool``) the record also has the solver's own estimate of the
table (``table_estimate_mb``, what ``memory_budget_mb`` is checked against) beside the measured peak.

    python -m regionembed.bench inversion --models ViT-B-16 --masks 1 16 100 --iterations 10 --sizes 224
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from itertools import pairwise, product

STRATEGY_ORDER = ("naive", "naive_lean", "per_step", "precomputed", "auto", "attention_pool")


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _rss_mb() -> float:
    """Current resident set size (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRSS:
    """Samples the resident set size every few milliseconds in a thread: the peak of one call, not the process."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()

    def __enter__(self) -> _PeakRSS:
        self.start = self.peak = _rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def run_case(model: str, size: int, masks: int, iterations: int, strategy: str, seed: int = 0) -> dict:
    """Time one inversion in this process; returns a JSON-able record."""
    import torch

    from regionembed.backbones import OpenCLIPBackbone
    from regionembed.inversion import MaskInversion, estimate_costs

    torch.manual_seed(seed)
    # no text is encoded here, so no tokenizer (SigLIP's would come from the hub)
    backbone = OpenCLIPBackbone(model, image_size=size, tokenizer=False).requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, size, size, generator=g)
    target = torch.zeros(masks, size, size)
    for i in range(masks):  # rectangles of varied size and place
        y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
        h, w = torch.randint(size // 8, size // 2, (2,), generator=g).tolist()
        target[i, y : y + h, x : x + w] = 1
    solver = MaskInversion(strategy=strategy, iterations=iterations)
    MaskInversion(strategy=strategy, iterations=1)(backbone, image, target[:1])  # warm-up: allocator, kernels
    with _PeakRSS() as rss:
        start = time.perf_counter()
        result = solver(backbone, image, target)
        wall = time.perf_counter() - start
    table = None  # the solver's estimate of a table strategy's memory, what memory_budget_mb is checked against
    if result.strategy in ("precomputed", "attention_pool"):
        costs = estimate_costs(backbone, size, masks, iterations, len(backbone.layer_indices(solver.explainer.layers)))
        table = round(costs[result.strategy].memory / 2**20, 1)
    return {
        "model": model,
        "image_size": size,
        "masks": masks,
        "iterations": iterations,
        "strategy": strategy,
        "ran": result.strategy,
        "wall_s": round(wall, 4),
        "s_per_mask": round(wall / masks, 5),
        "peak_rss_mb": round(_max_rss_mb(), 1),
        "peak_over_baseline_mb": round(rss.peak - rss.start, 1),
        "table_estimate_mb": table,
        "final_loss": round(float(result.loss_history[-1]), 6),
        "threads": torch.get_num_threads(),
    }


def _spawn(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "regionembed.bench", "inversion", "--case", json.dumps(case)]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timeout after {timeout:.0f}s"}
    if proc.returncode != 0:
        return {**case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(records: list[dict]) -> list[dict]:
    """Add speed-up over ``naive`` (same model/masks/iterations/size) and the marginal time of one more mask."""

    def key_of(r: dict) -> tuple:
        return r["model"], r["masks"], r["iterations"], r["image_size"]

    naive = {key_of(r): r["wall_s"] for r in records if r["strategy"] == "naive" and "wall_s" in r}
    by_strategy: dict[tuple, list[dict]] = {}
    for r in records:
        if "wall_s" not in r:
            continue
        key = key_of(r)
        if key in naive:
            r["speedup_vs_naive"] = round(naive[key] / r["wall_s"], 2)
        by_strategy.setdefault((r["model"], r["strategy"], r["iterations"], r["image_size"]), []).append(r)
    for rows in by_strategy.values():
        rows.sort(key=lambda r: r["masks"])
        for prev, cur in pairwise(rows):
            cur["marginal_s_per_mask"] = round((cur["wall_s"] - prev["wall_s"]) / (cur["masks"] - prev["masks"]), 5)
    return records


def _ratio(value: float | None) -> str:
    """``"3.4x"``, or ``"-"`` when ``naive`` did not run at that size and mask count."""
    return "-" if value is None else f"{value:.1f}x"


def markdown_table(records: list[dict]) -> str:
    head = (
        "| model | size | masks | iters | strategy | wall s | s/mask | +1 mask s | extra peak RSS MB "
        "| table estimate MB | vs naive |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in records:
        if "wall_s" not in r:
            lines.append(
                f"| {r['model']} | {r['image_size']} | {r['masks']} | {r['iterations']} | {r['strategy']} | "
                f"{r['error']} |"
            )
            continue
        name = r["strategy"] if r["strategy"] != "auto" else f"auto ({r['ran']})"
        lines.append(
            f"| {r['model']} | {r['image_size']} | {r['masks']} | {r['iterations']} | {name} | {r['wall_s']:.2f} | "
            f"{r['s_per_mask']:.3f} | {r.get('marginal_s_per_mask', float('nan')):.3f} | "
            f"{r['peak_over_baseline_mb']:.0f} | {r.get('table_estimate_mb') or '-'} | "
            f"{_ratio(r.get('speedup_vs_naive'))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m regionembed.bench inversion", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models",
        "--model",
        nargs="+",
        default=["ViT-B-16"],
        help="open_clip model names (random weights), e.g. ViT-B-16 ViT-B-16-SigLIP EVA02-B-16",
    )
    parser.add_argument("--masks", type=int, nargs="+", default=[1, 16, 100])
    parser.add_argument("--iterations", type=int, nargs="+", default=[10])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGY_ORDER[:4]), choices=STRATEGY_ORDER)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    parser.add_argument("--output", default=None, help="also write the records as JSON here")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case in-process
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(**json.loads(args.case))))
        return
    records = []
    cases = product(args.models, args.sizes, args.iterations, args.masks, args.strategies)
    for model, size, iterations, masks, strategy in cases:
        case = {"model": model, "size": size, "masks": masks, "iterations": iterations, "strategy": strategy}
        record = _spawn(case, args.timeout)
        record.setdefault("image_size", size)
        print(json.dumps(record), flush=True)
        records.append(record)
    summarize(records)
    print(markdown_table(records))
    if args.output:
        from regionembed.io import save_json

        save_json(
            {
                "command": " ".join(["python -m regionembed.bench inversion", *(argv or sys.argv[2:])]),
                "records": records,
            },
            args.output,
        )
