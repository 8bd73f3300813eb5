"""Benchmark of the alpha channel's training cost: step throughput with and without it, same backbone.

One process, one randomly initialised open_clip model per size; the plain and the alpha variant share the same
weights (the alpha conv is added to a copy) and alternate step by step (A, B, A, B, ...), so machine load drifts
hit both alike. A step is what ``AlphaCLIPModule`` does: image tower forward (with alpha for the alpha variant),
contrastive loss against fixed text features, backward, AdamW update. The plain variant is the same step without
the alpha input (a ``ContrastiveModule``-style step with the text side fixed).

    python -m regionembed.bench alpha --models ViT-B-16:224:16 re-small-vit:64:64 --steps 10
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path


def _step(backbone, optimizer, images, alphas, text, scale) -> None:
    import torch.nn.functional as F

    from ..losses import masked_contrastive_loss

    image = F.normalize(backbone.encode_image(images, alpha=alphas), dim=-1)
    loss = masked_contrastive_loss(scale * image @ text.T)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def run_case(model: str, size: int, batch: int, steps: int, warmup: int = 2, seed: int = 0) -> dict:
    """Alternate plain and alpha training steps; returns median/mean step times and the overhead."""
    import torch
    import torch.nn.functional as F

    from ..backbones import OpenCLIPBackbone
    from ..backbones.alpha import alpha_from_masks

    torch.manual_seed(seed)
    plain = OpenCLIPBackbone(model, image_size=size)
    alpha = copy.deepcopy(plain).enable_alpha()
    for b in (plain, alpha):
        b.train()
        b.set_trainable(image=True, alpha=True)  # as AlphaCLIPModule: the image tower (and the alpha conv) train
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    masks = (torch.rand(batch, size, size, generator=g) > 0.5).float()
    alphas = alpha_from_masks(masks)
    text = F.normalize(torch.randn(batch, plain.embed_dim, generator=g), dim=-1)
    scale = torch.tensor(100.0)
    variants = {
        "plain": (plain, torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-6), None),
        "alpha": (alpha, torch.optim.AdamW([p for p in alpha.parameters() if p.requires_grad], lr=1e-6), alphas),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup + steps):
        for name, (backbone, optimizer, a) in variants.items():
            start = time.perf_counter()
            _step(backbone, optimizer, images, a, text, scale)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": model,
        "size": size,
        "batch": batch,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "plain_median_s": med["plain"],
        "alpha_median_s": med["alpha"],
        "plain_images_per_s": batch / med["plain"],
        "alpha_images_per_s": batch / med["alpha"],
        "overhead_pct": 100 * (med["alpha"] / med["plain"] - 1),
        "alpha_params": sum(p.numel() for p in alpha.alpha_embed.parameters()),
        "visual_params": sum(p.numel() for p in plain.image_tower.parameters()),
    }


def table(records: list[dict]) -> str:
    lines = [
        "| model | size | batch | plain step (s) | alpha step (s) | plain img/s | alpha img/s | overhead |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['model']} | {r['size']} | {r['batch']} | {r['plain_median_s']:.3f} | {r['alpha_median_s']:.3f} | "
            f"{r['plain_images_per_s']:.1f} | {r['alpha_images_per_s']:.1f} | {r['overhead_pct']:+.1f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m regionembed.bench alpha", description=__doc__)
    parser.add_argument(
        "--models", nargs="+", default=["ViT-B-16:224:16", "re-small-vit:64:64"], help="MODEL:SIZE:BATCH cases"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--out", default=None, help="also write the records there as JSON")
    args = parser.parse_args(argv)
    records = []
    for case in args.models:
        model, size, batch = case.split(":")
        record = run_case(model, int(size), int(batch), args.steps)
        print(json.dumps(record), flush=True)
        records.append(record)
    print(table(records))
    if args.out:
        from ..io import save_json

        save_json(records, Path(args.out))
