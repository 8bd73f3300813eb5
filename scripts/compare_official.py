"""Compare regionembed's MaskInversion solver with the official implementation on identical inputs.

The official code is ``maskinversion-torch==1.1`` + ``legrad-torch==1.1``, which need ``open_clip_torch<=2.23.0``
while regionembed runs on open_clip 3.x, so the two sides live in two virtual environments and exchange files
(safetensors + JSON) through a work directory. ``scripts/compare_official.sh`` runs the whole procedure:

1. ``prepare`` (our venv): create a randomly initialised open_clip ``ViT-B-16`` (fixed seed) and save its
   ``state_dict`` (``weights.safetensors``), a random image ``[1, 3, 224, 224]`` and two sets of masks
   (``inputs.safetensors``): ``m224``, four masks at 224x224 (two rectangles and an ellipse of different sizes and
   one soft, non-binary Gaussian blob), and ``m112``, one ellipse at 112x112 (maps are resized to the mask size).
2. ``official`` (official venv; never imports regionembed): load the weights into open_clip 2.23's
   ``create_model("ViT-B-16")`` with ``strict=True``, wrap it in ``maskinversion.MaskInversion`` and run
   ``compute_maskinversion(image, masks, return_expl_map=True)`` per mask set. The per-iteration losses are recorded
   by wrapping ``maskinversion.maskinversion.batched_dice_loss`` (alpha = 0, so it is the whole loss). The maps of
   the returned embeddings are computed afterwards with ``compute_legrad(F.normalize(emb))`` and resized bilinearly
   to the mask size exactly as the official loop does.
3. ``ours`` (our venv): load the same weights into ``OpenCLIPBackbone`` and run ``MaskInversion`` with each strategy
   (``naive``, ``naive_lean``, ``per_step``, ``precomputed``) for ``K`` iterations, and again for ``K - 1``.
4. ``compare`` (our venv): print a JSON report (also written to ``report.json``) and exit with status 1 when a
   target is missed (final maps max-abs <= 1e-5, embedding cosine >= 0.9999).

The one documented difference: the official ``compute_maskinversion`` returns the explainability map computed at
the start of its last iteration, i.e. the map of the embedding *before* the final optimizer step, while our
``InversionResult.maps`` are the maps of the embeddings actually returned. Hence our final maps are compared with
``compute_legrad`` of the official returned embeddings, and the official returned map is compared with our maps
after ``K - 1`` iterations (which must coincide). Likewise the official records ``K`` losses (before each step)
and our ``loss_history`` has ``K + 1`` entries: the first ``K`` are compared with the official losses and the last
one with the Dice loss of the official final map.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = REPO / "outputs" / "compare_official"

MODEL = "ViT-B-16"
IMAGE_SIZE = 224
LR = 0.5
SEED = 0
STRATEGIES = ("naive", "naive_lean", "per_step", "precomputed")
MAP_TARGET = 1e-5
COSINE_TARGET = 0.9999


# ---------------------------------------------------------------------------------------------------- inputs
def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates ``(y, x)`` of a ``size x size`` mask."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    return torch.meshgrid(coords, coords, indexing="ij")


def _rectangle(size: int, top: int, left: int, bottom: int, right: int) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[top:bottom, left:right] = 1.0
    return mask


def _ellipse(size: int, cy: float, cx: float, ry: float, rx: float) -> torch.Tensor:
    y, x = _grid(size)
    return (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1).float()


def _soft_blob(size: int, cy: float, cx: float, sigma: float) -> torch.Tensor:
    y, x = _grid(size)
    return torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))


def make_inputs(seed: int) -> dict[str, torch.Tensor]:
    """The image and the two mask sets (``masks_m224`` ``[4, 224, 224]``, ``masks_m112`` ``[1, 112, 112]``)."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    m224 = torch.stack(
        [
            _rectangle(224, 30, 20, 80, 100),  # small rectangle
            _rectangle(224, 96, 40, 216, 200),  # large rectangle
            _ellipse(224, 70.0, 160.0, 45.0, 30.0),  # ellipse
            _soft_blob(224, 150.0, 90.0, 28.0),  # soft, non-binary target
        ]
    )
    m112 = _ellipse(112, 60.0, 48.0, 30.0, 40.0)[None]  # a mask at another resolution
    return {"image": image, "masks_m224": m224, "masks_m112": m112}


def mask_sets(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key.removeprefix("masks_"): value for key, value in inputs.items() if key.startswith("masks_")}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(path))


# --------------------------------------------------------------------------------------------------- prepare
def cmd_prepare(args: argparse.Namespace) -> None:
    """Our venv: random weights of our open_clip model, the image and the masks."""
    import open_clip

    from regionembed.backbones import OpenCLIPBackbone

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    backbone = OpenCLIPBackbone(MODEL, pretrained=None)
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(work / "weights.safetensors"))
    _save(work / "inputs.safetensors", make_inputs(args.seed))
    config = {
        "model": MODEL,
        "image_size": IMAGE_SIZE,
        "lr": LR,
        "iterations": args.iterations,
        "seed": args.seed,
        "prepared_with": {"torch": torch.__version__, "open_clip": open_clip.__version__},
    }
    _write_json(work / "config.json", config)
    print(f"prepared {work}: weights.safetensors, inputs.safetensors, config.json")


# -------------------------------------------------------------------------------------------------- official
def cmd_official(args: argparse.Namespace) -> None:
    """Official venv: ``maskinversion-torch`` on the saved weights and inputs (regionembed is never imported)."""
    import importlib
    from importlib.metadata import version

    import open_clip
    from maskinversion import MaskInversion as OfficialMaskInversion

    # ``maskinversion.maskinversion`` does ``from .utils import batched_dice_loss``: patch the name it looks up
    mi_module = importlib.import_module("maskinversion.maskinversion")
    original_dice = mi_module.batched_dice_loss
    recorded: list[float] = []

    def recording_dice(input, target):  # the official keyword names
        loss = original_dice(input=input, target=target)
        recorded.append(loss.item())
        return loss

    mi_module.batched_dice_loss = recording_dice

    work = args.workdir
    config = json.loads((work / "config.json").read_text())
    iterations = config["iterations"]
    model = open_clip.create_model(config["model"], pretrained=None)
    weights = load_file(str(work / "weights.safetensors"))
    # open_clip 3.x and 2.23 CLIP share parameter and persistent-buffer names; the text ``attn_mask`` is a
    # non-persistent buffer in both (absent from the state dict, rebuilt identically), so strict loading works as is.
    model.load_state_dict(weights, strict=True)
    model.eval()
    inputs = load_file(str(work / "inputs.safetensors"))
    image = inputs["image"]

    wrapper = OfficialMaskInversion(model, layer_index=-1, alpha=0.0, lr=config["lr"], iterations=iterations, wd=0.0)
    timings = {}
    for name, masks in mask_sets(inputs).items():
        recorded.clear()
        start = time.perf_counter()
        embedding, returned_map = wrapper.compute_maskinversion(image, masks, return_expl_map=True)
        solve_s = time.perf_counter() - start
        losses = list(recorded)
        # maps of the returned embeddings, from the hooks of the (single) forward of the N image copies
        start = time.perf_counter()
        final_map = wrapper.compute_legrad(text_embedding=F.normalize(embedding, dim=-1))
        final_map = F.interpolate(final_map, size=masks.shape[-2:], mode="bilinear")
        final_map_s = time.perf_counter() - start
        final_loss = original_dice(input=final_map, target=masks).item()
        with torch.no_grad():
            image_embedding = model.encode_image(image)
        _save(
            work / f"official_{name}.safetensors",
            {
                "embedding": embedding,  # [N, D], un-normalised
                "returned_map": returned_map[0],  # [N, H, W]: map of the embedding before the last step
                "final_map": final_map[0],  # [N, H, W]: map of the returned embedding
                "image_embedding": image_embedding,  # [1, D]
                "losses": torch.tensor([*losses, final_loss]),  # [K + 1], as our loss_history
            },
        )
        timings[name] = {"compute_maskinversion_s": solve_s, "final_compute_legrad_s": final_map_s}
        print(f"official {name}: {len(losses)} losses, {solve_s:.2f} s", file=sys.stderr)
    assert "regionembed" not in sys.modules, "the official side must not import regionembed"
    meta = {
        "timings": timings,
        "versions": {
            name: version(name)
            for name in ("torch", "open_clip_torch", "legrad-torch", "maskinversion-torch", "timm", "safetensors")
        },
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    _write_json(work / "official.json", meta)


# ------------------------------------------------------------------------------------------------------ ours
def cmd_ours(args: argparse.Namespace) -> None:
    """Our venv: every strategy for K iterations (final maps) and K - 1 iterations (the official returned map)."""
    import open_clip

    from regionembed.backbones import OpenCLIPBackbone
    from regionembed.inversion import MaskInversion

    work = args.workdir
    config = json.loads((work / "config.json").read_text())
    iterations = config["iterations"]
    backbone = OpenCLIPBackbone(config["model"], pretrained=None)
    backbone.model.load_state_dict(load_file(str(work / "weights.safetensors")), strict=True)
    backbone.eval()
    inputs = load_file(str(work / "inputs.safetensors"))
    image = inputs["image"]

    timings: dict[str, dict] = {}
    for strategy in args.strategies:
        timings[strategy] = {}
        for name, masks in mask_sets(inputs).items():
            out = {}
            for k, suffix in ((iterations, ""), (iterations - 1, "_prev")):
                solver = MaskInversion(backbone, strategy=strategy, lr=config["lr"], iterations=k)
                start = time.perf_counter()
                result = solver(image, masks)
                elapsed = time.perf_counter() - start
                if result.strategy != strategy:
                    raise RuntimeError(f"asked for {strategy}, ran {result.strategy}")
                out[f"maps{suffix}"] = result.maps
                if not suffix:
                    out.update(
                        embedding=result.embeddings,
                        loss_history=result.loss_history,
                        image_embedding=result.image_embedding,
                    )
                    timings[strategy][name] = {"solve_s": elapsed}
            _save(work / f"ours_{strategy}_{name}.safetensors", out)
            print(f"ours {strategy} {name}: {timings[strategy][name]['solve_s']:.2f} s", file=sys.stderr)
    meta = {
        "timings": timings,
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        "threads": torch.get_num_threads(),
    }
    _write_json(work / "ours.json", meta)


# --------------------------------------------------------------------------------------------------- compare
def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double(), b.double(), dim=-1).min().item()


def _dice(maps: torch.Tensor, masks: torch.Tensor) -> list[float]:
    p, t = maps.flatten(1).double(), masks.flatten(1).double()
    return (1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)).tolist()


def compare(work: Path, strategies: tuple[str, ...]) -> dict:
    """The report: per strategy and mask set, our results against the official ones."""
    inputs = load_file(str(work / "inputs.safetensors"))
    official_meta = json.loads((work / "official.json").read_text())
    ours_meta = json.loads((work / "ours.json").read_text())
    sets = mask_sets(inputs)
    official = {name: load_file(str(work / f"official_{name}.safetensors")) for name in sets}

    report = {
        "config": json.loads((work / "config.json").read_text()),
        "targets": {"final_maps_max_abs": MAP_TARGET, "embedding_min_cosine": COSINE_TARGET},
        "mask_sets": {name: list(masks.shape) for name, masks in sets.items()},
        "official": {
            "versions": official_meta["versions"],
            "threads": official_meta["threads"],
            "wall_s": official_meta["timings"],
            # the documented difference: what the official map is, and how far it is from the final one
            "returned_map": {
                name: {
                    "max_abs_vs_map_of_returned_embedding": _max_abs(o["returned_map"], o["final_map"]),
                    "dice_loss_returned_map": _dice(o["returned_map"], sets[name]),
                    "dice_loss_map_of_returned_embedding": _dice(o["final_map"], sets[name]),
                }
                for name, o in official.items()
            },
        },
        "ours": {"versions": ours_meta["versions"], "threads": ours_meta["threads"]},
        "strategies": {},
    }
    all_ok = True
    for strategy in strategies:
        entry = {}
        for name, o in official.items():
            ours = load_file(str(work / f"ours_{strategy}_{name}.safetensors"))
            losses_ours, losses_official = ours["loss_history"], o["losses"]
            row = {
                "final_maps_max_abs": _max_abs(ours["maps"], o["final_map"]),
                "embedding_min_cosine": _min_cosine(ours["embedding"], o["embedding"]),
                "embedding_max_abs": _max_abs(ours["embedding"], o["embedding"]),
                "image_embedding_max_abs": _max_abs(ours["image_embedding"], o["image_embedding"]),
                # losses before each of the K steps (recorded by the official loop) and of the returned embeddings
                "loss_steps_max_abs": _max_abs(losses_ours[:-1], losses_official[:-1]),
                "loss_final_abs": _max_abs(losses_ours[-1:], losses_official[-1:]),
                "loss_ours": losses_ours.tolist(),
                # the official returned (pre-final-step) map is our map after K - 1 iterations ...
                "official_returned_map_vs_ours_k_minus_1_max_abs": _max_abs(ours["maps_prev"], o["returned_map"]),
                # ... and differs from our (and its own) map of the returned embeddings by design
                "official_returned_map_vs_ours_final_max_abs": _max_abs(ours["maps"], o["returned_map"]),
                "wall_s_ours": ours_meta["timings"][strategy][name]["solve_s"],
                "wall_s_official": official_meta["timings"][name]["compute_maskinversion_s"],
            }
            row["ok"] = (
                row["final_maps_max_abs"] <= MAP_TARGET
                and row["embedding_min_cosine"] >= COSINE_TARGET
                and row["official_returned_map_vs_ours_k_minus_1_max_abs"] <= MAP_TARGET
            )
            all_ok &= row["ok"]
            entry[name] = row
        report["strategies"][strategy] = entry
    report["official"]["losses"] = {name: o["losses"].tolist() for name, o in official.items()}
    report["all_within_targets"] = all_ok
    return report


def cmd_compare(args: argparse.Namespace) -> int:
    report = compare(args.workdir, tuple(args.strategies))
    text = json.dumps(report, indent=2)
    (args.workdir / "report.json").write_text(text + "\n")
    print(text)
    return 0 if report["all_within_targets"] else 1


# ------------------------------------------------------------------------------------------------------- cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("prepare", "our venv: save random weights, image and masks"),
        ("official", "official venv: run maskinversion-torch 1.1 on them"),
        ("ours", "our venv: run every strategy of regionembed's MaskInversion"),
        ("compare", "our venv: print the JSON report (exit 1 when a target is missed)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"default: {DEFAULT_WORKDIR}")
        if name == "prepare":
            p.add_argument("--iterations", type=int, default=10)
            p.add_argument("--seed", type=int, default=SEED)
        if name in ("ours", "compare"):
            p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    args = parser.parse_args(argv)
    if args.command == "prepare" and args.iterations < 1:
        parser.error("--iterations must be >= 1")
    commands = {"prepare": cmd_prepare, "official": cmd_official, "ours": cmd_ours, "compare": cmd_compare}
    return commands[args.command](args) or 0


if __name__ == "__main__":
    sys.exit(main())
