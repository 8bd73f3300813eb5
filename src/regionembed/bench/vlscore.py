"""Benchmark of the CAM explainers: maps per second and peak memory of VL-Score / Score-CAM (channel caps and channel
batch sizes), with Grad-CAM and LeGrad on the same inputs for reference.

Each model runs in its own subprocess (random images and targets, fixed seeds); inside it every case gets a warm-up
call (one forward of a channel batch) and is then timed over ``--maps`` maps with the resident memory sampled every
5 ms, so "extra peak RSS" is the growth of memory during that case's calls (memory the allocator kept from earlier
cases of the same process is not counted again). All cases of one invocation run side by side on the same machine.

    python -m regionembed.bench vlscore --output outputs/bench/vlscore.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from .inversion import _max_rss_mb, _PeakRSS

#: model specs: open_clip name, pretrained (None: random weights), image size
MODELS = {
    "ViT-B-16": ("ViT-B-16", None, 224),
    "RN50": ("RN50", None, 224),
    "clip_synthetic": ("re-synth-vit", "regionembed:clip_synthetic", 64),  # 4x the maps of the other models
}


def _cases(args: argparse.Namespace, resnet: bool) -> list[dict]:
    """The explainer cases for one model: defaults first, then the channel caps and batch sizes (no duplicates)."""
    cases = []
    if not args.skip_defaults:
        cases += [
            {"method": "VLScore", "max_channels": 256, "batch_size": 32, "maps": args.maps},
            {"method": "ScoreCAM", "max_channels": 256, "batch_size": 32, "maps": args.maps},
        ]
    grid = [(cap, 32) for cap in args.caps] + [(args.batch_cap, bs) for bs in args.batch_sizes]
    for cap, bs in grid:
        case = {"method": "VLScore", "max_channels": cap, "batch_size": bs, "maps": args.maps}
        if case not in cases:
            cases.append(case)
    cases.append({"method": "GradCAM", "maps": args.grad_maps})
    if not resnet:
        cases.append({"method": "LeGrad", "maps": args.grad_maps})
    return cases


def _explainer(case: dict):
    from regionembed.explainers import GradCAM, LeGrad, ScoreCAM, VLScore

    if case["method"] == "GradCAM":
        return GradCAM()
    if case["method"] == "LeGrad":
        return LeGrad()
    cls = VLScore if case["method"] == "VLScore" else ScoreCAM
    return cls(max_channels=case["max_channels"], batch_size=case["batch_size"])


def run_model(key: str, cases: list[dict], seed: int = 0) -> list[dict]:
    """Run every case on one model in this process; returns JSON-able records."""
    import torch

    from regionembed.backbones import FeatureMapBackbone, OpenCLIPBackbone
    from regionembed.explainers.gradcam import resolve_layer

    name, pretrained, size = MODELS[key]
    torch.manual_seed(seed)
    backbone = OpenCLIPBackbone(name, pretrained=pretrained, image_size=size).requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    n = max(c["maps"] for c in cases)
    images = torch.randn(n, 3, size, size, generator=g)
    targets = torch.nn.functional.normalize(torch.randn(n, backbone.embed_dim, generator=g), dim=-1)
    with torch.no_grad():
        feats = backbone.feature_maps(images[:1]) if isinstance(backbone, FeatureMapBackbone) else None
    channels_total = int(feats.shape[1]) if feats is not None else int(backbone.blocks[0].attn.embed_dim)
    records = []
    for case in cases:
        explainer = _explainer(case)
        m = case["maps"]
        # warm-up (allocator, kernels): one forward of a full channel batch, not a whole map
        warm = _explainer({**case, "max_channels": case["batch_size"]}) if "max_channels" in case else explainer
        warm(backbone, images[:1], targets[:1])
        with _PeakRSS() as rss:
            start = time.perf_counter()
            maps, present = explainer.explain_with_presence(backbone, images[:m], targets[:m])
            wall = time.perf_counter() - start
        record = {
            "model": key,
            "weights": pretrained or "random",
            "image_size": size,
            **case,
            "layer": str(resolve_layer(backbone, getattr(explainer, "layer", None))),
            "wall_s": round(wall, 3),
            "maps_per_s": round(m / wall, 3),
            "s_per_map": round(wall / m, 3),
            "peak_over_baseline_mb": round(rss.peak - rss.start, 1),
            "peak_rss_mb": round(_max_rss_mb(), 1),
            "threads": torch.get_num_threads(),
            "map_shape": list(maps.shape),
        }
        if "max_channels" in case:
            k = min(case["max_channels"], channels_total)
            record["channels"] = k
            record["forwards_per_map"] = k + (1 if case["method"] == "VLScore" else 0)
            record["present_fraction"] = round(float(present.float().mean()), 3)
        if case["method"] == "LeGrad":
            record["layer"] = "-1"
        records.append(record)
        print(json.dumps(record), flush=True)
    return records


def _spawn(key: str, cases: list[dict], timeout: float) -> list[dict]:
    cmd = [sys.executable, "-m", "regionembed.bench", "vlscore", "--model-case", json.dumps([key, cases])]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as err:
        done = [json.loads(line) for line in (err.stdout or b"").decode().splitlines() if line.startswith("{")]
        return [*done, {"model": key, "error": f"timeout after {timeout:.0f}s"}]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        records.append({"model": key, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"})
    return records


def markdown_table(records: list[dict]) -> str:
    head = "| model | size | method | layer | channels | batch | maps | s/map | maps/s | extra peak RSS MB |"
    lines = [head, "|" + "---|" * 10]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | | error: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['image_size']} | {r['method']} | {r['layer']} | {r.get('channels', '-')} | "
            f"{r.get('batch_size', '-')} | {r['maps']} | {r['s_per_map']:.3f} | {r['maps_per_s']:.3f} | "
            f"{r['peak_over_baseline_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m regionembed.bench vlscore", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--maps", type=int, default=1, help="maps per VL-Score/Score-CAM case (one forward/channel)")
    parser.add_argument("--grad-maps", type=int, default=4, help="maps per Grad-CAM/LeGrad case")
    parser.add_argument("--caps", type=int, nargs="+", default=[64, 256], help="VL-Score channel caps")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64], help="VL-Score channels/forward")
    parser.add_argument("--batch-cap", type=int, default=64, help="channel cap of the batch-size cases")
    parser.add_argument(
        "--skip-defaults", action="store_true", help="leave out the VL-Score/Score-CAM cases at default settings"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    parser.add_argument("--output", default=None, help="also write the records as JSON here")
    parser.add_argument("--model-case", default=None, help=argparse.SUPPRESS)  # internal: one model in-process
    args = parser.parse_args(argv)
    if args.model_case:
        key, cases = json.loads(args.model_case)
        run_model(key, cases)
        return
    records = []
    for key in args.models:
        cases = _cases(args, resnet=MODELS[key][0].startswith("RN"))
        if key == "clip_synthetic":  # a small model: more maps per case for a stable rate
            cases = [{**c, "maps": c["maps"] * 4} for c in cases]
        for record in _spawn(key, cases, args.timeout):
            print(json.dumps(record), flush=True)
            records.append(record)
    print(markdown_table(records))
    if args.output:
        from regionembed.io import save_json

        save_json(
            {"command": " ".join(["python -m regionembed.bench vlscore", *(argv or sys.argv[2:])]), "records": records},
            args.output,
        )
