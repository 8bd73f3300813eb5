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
   ``compute_maskinversion(image, masks, return_expl_map=True)`` per mask set. The loss and the map of every
   iteration are recorded by wrapping ``maskinversion.maskinversion.batched_dice_loss`` (alpha = 0, so the Dice loss
   is the whole loss). The map of the returned embeddings is computed afterwards with
   ``compute_legrad(F.normalize(emb))`` and resized bilinearly to the mask size exactly as the official loop does.
3. ``ours`` (our venv): load the same weights into ``OpenCLIPBackbone`` and run ``MaskInversion`` with each strategy
   (``naive``, ``naive_lean``, ``per_step``, ``precomputed``); the map of every iteration is recorded the same way,
   by wrapping ``regionembed.inversion.solver.dice_loss``.
4. ``compare`` (our venv): print a JSON report (also written to ``report.json``); exit status 1 when a target is
   missed (float32 final maps max-abs <= 1e-5 and embedding cosine >= 0.9999; float64 agreement to 1e-10).

Both sides also run in float64 (``--dtype float64``, the official wrapper cast with ``.double()`` after its
constructor's ``.float()``): float64 separates differences of algorithm (which survive) from float32 rounding
amplified by the optimisation (which vanishes). The report also gives the official float32 run's own distance to the
float64 one, i.e. the accuracy the reference itself reaches in float32.

Each side warms up (one 1-iteration inversion) before timing; wall times are single runs and somewhat noisy on a
shared 2-core CPU.

The one documented difference: the official ``compute_maskinversion`` returns the explainability map computed at
the start of its last iteration, i.e. the map of the embedding *before* the final optimizer step, while our
``InversionResult.maps`` are the maps of the embeddings actually returned. Hence our final maps are compared with
``compute_legrad`` of the official returned embeddings, and the official returned map is compared with our map at
iteration K - 1 (the one our loop computes before its last step). Likewise the official loop evaluates K losses
(before each step) and our ``loss_history`` has K + 1 entries: the first K are compared with the official ones and
the last one with the Dice loss of the map of the official returned embeddings.
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
MASK_SETS = ("m224", "m112")
STRATEGIES = ("naive", "naive_lean", "per_step", "precomputed")
DTYPES = ("float32", "float64")
#: (final maps max-abs, minimum embedding cosine) per dtype
TARGETS = {"float32": (1e-5, 0.9999), "float64": (1e-10, 1 - 1e-12)}


# ---------------------------------------------------------------------------------------------------- inputs
def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates ``(y, x)`` of a ``size x size`` mask."""
    coords = torch.arange(size, dtype=torch.float64) + 0.5
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
    return torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2)).float()


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


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save tensors in their own dtype (float64 runs keep float64)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def _load_inputs(work: Path, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    inputs = load_file(str(work / "inputs.safetensors"))
    return inputs["image"].to(dtype), {name: inputs[f"masks_{name}"].to(dtype) for name in MASK_SETS}


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
    losses: list[float] = []
    maps: list[torch.Tensor] = []

    def recording_dice(input, target):  # the official keyword names
        loss = original_dice(input=input, target=target)
        losses.append(loss.item())
        maps.append(input.detach()[0].clone())  # [1, N, H, W] -> [N, H, W]
        return loss

    mi_module.batched_dice_loss = recording_dice

    work, dtype = args.workdir, getattr(torch, args.dtype)
    config = json.loads((work / "config.json").read_text())
    iterations = config["iterations"]
    model = open_clip.create_model(config["model"], pretrained=None)
    # open_clip 3.x and 2.23 CLIP share parameter and persistent-buffer names; the text ``attn_mask`` is a
    # non-persistent buffer in both (absent from the state dict, rebuilt identically), so strict loading works as is.
    model.load_state_dict(load_file(str(work / "weights.safetensors")), strict=True)
    model.eval()
    image, mask_sets = _load_inputs(work, dtype)

    wrapper = OfficialMaskInversion(model, layer_index=-1, alpha=0.0, lr=config["lr"], iterations=iterations, wd=0.0)
    wrapper.to(dtype)  # the constructor calls .float(); float64 is the diagnostic run
    # warm-up (untimed); compute_maskinversion stores its keyword arguments, so iterations is passed every time
    wrapper.compute_maskinversion(image, mask_sets[MASK_SETS[-1]], iterations=1)

    timings = {}
    for name, masks in mask_sets.items():
        losses.clear()
        maps.clear()
        start = time.perf_counter()
        embedding, returned_map = wrapper.compute_maskinversion(
            image, masks, iterations=iterations, return_expl_map=True
        )
        solve_s = time.perf_counter() - start
        # map of the returned embeddings, from the hooks of the (single) forward of the N image copies
        start = time.perf_counter()
        final_map = wrapper.compute_legrad(text_embedding=F.normalize(embedding, dim=-1))
        final_map = F.interpolate(final_map, size=masks.shape[-2:], mode="bilinear")
        final_map_s = time.perf_counter() - start
        final_loss = original_dice(input=final_map, target=masks).item()
        if len(losses) != iterations or not torch.equal(maps[-1], returned_map[0]):
            raise RuntimeError("the dice-loss recorder did not see every iteration of the official loop")
        with torch.no_grad():
            image_embedding = model.encode_image(image)
        _save(
            work / f"official_{args.dtype}_{name}.safetensors",
            {
                "embedding": embedding,  # [N, D], un-normalised
                "returned_map": returned_map[0],  # [N, H, W]: map of the embedding before the last step
                "final_map": final_map[0],  # [N, H, W]: map of the returned embedding
                "step_maps": torch.stack(maps),  # [K, N, H, W]: map at the start of each iteration
                "image_embedding": image_embedding,  # [1, D]
                "losses": torch.tensor([*losses, final_loss], dtype=torch.float64),  # [K + 1], as our loss_history
            },
        )
        timings[name] = {"compute_maskinversion_s": solve_s, "final_compute_legrad_s": final_map_s}
        print(f"official {args.dtype} {name}: {solve_s:.2f} s", file=sys.stderr)
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
    _write_json(work / f"official_{args.dtype}.json", meta)


# ------------------------------------------------------------------------------------------------------ ours
def cmd_ours(args: argparse.Namespace) -> None:
    """Our venv: every strategy; the map of every iteration is recorded through the solver's ``dice_loss``."""
    import open_clip

    import regionembed.inversion.solver as solver_module
    from regionembed.backbones import OpenCLIPBackbone
    from regionembed.inversion import MaskInversion

    original_dice = solver_module.dice_loss
    maps: list[torch.Tensor] = []

    def recording_dice(pred, target, **kwargs):
        maps.append(pred.detach().clone())
        return original_dice(pred, target, **kwargs)

    solver_module.dice_loss = recording_dice

    work, dtype = args.workdir, getattr(torch, args.dtype)
    config = json.loads((work / "config.json").read_text())
    iterations = config["iterations"]
    backbone = OpenCLIPBackbone(config["model"], pretrained=None)
    backbone.model.load_state_dict(load_file(str(work / "weights.safetensors")), strict=True)
    backbone.eval().to(dtype)
    image, mask_sets = _load_inputs(work, dtype)
    for strategy in ("naive", "per_step"):  # warm-up (untimed)
        MaskInversion(strategy=strategy, lr=config["lr"], iterations=1)(backbone, image, mask_sets[MASK_SETS[-1]])

    timings: dict[str, dict] = {}
    for strategy in args.strategies:
        timings[strategy] = {}
        solver = MaskInversion(strategy=strategy, lr=config["lr"], iterations=iterations)
        for name, masks in mask_sets.items():
            maps.clear()
            start = time.perf_counter()
            result = solver(backbone, image, masks)
            elapsed = time.perf_counter() - start
            if result.strategy != strategy:
                raise RuntimeError(f"asked for {strategy}, ran {result.strategy}")
            if len(maps) != iterations + 1 or not torch.equal(maps[-1], result.maps):
                raise RuntimeError("the dice-loss recorder did not see every iteration of our loop")
            _save(
                work / f"ours_{args.dtype}_{strategy}_{name}.safetensors",
                {
                    "embedding": result.embeddings,
                    "maps": result.maps,
                    "step_maps": torch.stack(maps[:-1]),  # [K, N, H, W]: map at the start of each iteration
                    "loss_history": result.loss_history.double(),
                    "image_embedding": result.image_embedding,
                },
            )
            timings[strategy][name] = {"solve_s": elapsed}
            print(f"ours {args.dtype} {strategy} {name}: {elapsed:.2f} s", file=sys.stderr)
    meta = {
        "timings": timings,
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        "threads": torch.get_num_threads(),
    }
    _write_json(work / f"ours_{args.dtype}.json", meta)


# --------------------------------------------------------------------------------------------------- compare
def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double(), b.double(), dim=-1).min().item()


def _dice(maps: torch.Tensor, masks: torch.Tensor) -> list[float]:
    p, t = maps.flatten(1).double(), masks.flatten(1).double()
    return (1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)).tolist()


def _per_step_max_abs(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return (a.double() - b.double()).abs().flatten(1).amax(1).tolist()


def _load(work: Path, stem: str) -> dict[str, torch.Tensor]:
    return load_file(str(work / f"{stem}.safetensors"))


def compare_dtype(work: Path, dtype: str, strategies: tuple[str, ...]) -> dict:
    """Our results against the official ones, run in ``dtype``, per strategy and mask set."""
    max_map, min_cos = TARGETS[dtype]
    official_meta = json.loads((work / f"official_{dtype}.json").read_text())
    ours_meta = json.loads((work / f"ours_{dtype}.json").read_text())
    official = {name: _load(work, f"official_{dtype}_{name}") for name in MASK_SETS}
    _, mask_sets = _load_inputs(work, torch.float64)
    section = {
        "targets": {"final_maps_max_abs": max_map, "embedding_min_cosine": min_cos},
        "official": {
            "versions": official_meta["versions"],
            "threads": official_meta["threads"],
            "wall_s": official_meta["timings"],
            "losses": {name: o["losses"].tolist() for name, o in official.items()},
            # the documented difference: the official returned map is that of the embedding before the last step
            "returned_map": {
                name: {
                    "max_abs_vs_map_of_returned_embedding": _max_abs(o["returned_map"], o["final_map"]),
                    "dice_loss_per_mask_returned_map": _dice(o["returned_map"], mask_sets[name]),
                    "dice_loss_per_mask_map_of_returned_embedding": _dice(o["final_map"], mask_sets[name]),
                }
                for name, o in official.items()
            },
        },
        "ours": {"versions": ours_meta["versions"], "threads": ours_meta["threads"]},
        "strategies": {},
    }
    ok = True
    for strategy in strategies:
        section["strategies"][strategy] = entry = {}
        for name, o in official.items():
            ours = _load(work, f"ours_{dtype}_{strategy}_{name}")
            row = {
                "final_maps_max_abs": _max_abs(ours["maps"], o["final_map"]),
                "embedding_min_cosine": _min_cosine(ours["embedding"], o["embedding"]),
                "embedding_max_abs": _max_abs(ours["embedding"], o["embedding"]),
                "image_embedding_max_abs": _max_abs(ours["image_embedding"], o["image_embedding"]),
                # the K losses the official loop evaluates, and the loss of the returned embeddings
                "loss_steps_max_abs": _max_abs(ours["loss_history"][:-1], o["losses"][:-1]),
                "loss_final_abs": _max_abs(ours["loss_history"][-1:], o["losses"][-1:]),
                # map at the start of each iteration (index K - 1 is the official returned map)
                "step_maps_max_abs": _per_step_max_abs(ours["step_maps"], o["step_maps"]),
                "official_returned_map_vs_ours_step_k_minus_1_max_abs": _max_abs(
                    ours["step_maps"][-1], o["returned_map"]
                ),
                "official_returned_map_vs_ours_final_max_abs": _max_abs(ours["maps"], o["returned_map"]),
                "wall_s_ours": ours_meta["timings"][strategy][name]["solve_s"],
                "wall_s_official": official_meta["timings"][name]["compute_maskinversion_s"],
            }
            row["within_targets"] = row["final_maps_max_abs"] <= max_map and row["embedding_min_cosine"] >= min_cos
            ok &= row["within_targets"]
            entry[name] = row
    section["all_within_targets"] = ok
    return section


def compare_to_float64(work: Path, strategies: tuple[str, ...]) -> dict:
    """Distance of each float32 run (official and ours) to the official float64 run: the float32 accuracy."""
    out = {}
    for name in MASK_SETS:
        reference = _load(work, f"official_float64_{name}")
        runs = {"official": _load(work, f"official_float32_{name}")}
        runs.update({s: _load(work, f"ours_float32_{s}_{name}") for s in strategies})
        out[name] = {
            run: {
                "final_maps_max_abs": _max_abs(r.get("maps", r.get("final_map")), reference["final_map"]),
                "embedding_min_cosine": _min_cosine(r["embedding"], reference["embedding"]),
                "per_mask_final_maps_max_abs": _per_step_max_abs(
                    r.get("maps", r.get("final_map")), reference["final_map"]
                ),
            }
            for run, r in runs.items()
        }
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    work, strategies = args.workdir, tuple(args.strategies)
    report = {
        "config": json.loads((work / "config.json").read_text()),
        "mask_sets": {name: list(masks.shape) for name, masks in _load_inputs(work, torch.float32)[1].items()},
    }
    dtypes = [d for d in DTYPES if (work / f"official_{d}.json").exists() and (work / f"ours_{d}.json").exists()]
    if not dtypes:
        raise SystemExit(f"no official_*.json / ours_*.json pair in {work}: run `official` and `ours` first")
    for dtype in dtypes:
        report[dtype] = compare_dtype(work, dtype, strategies)
    if set(DTYPES) <= set(dtypes):
        report["float32_runs_vs_official_float64"] = compare_to_float64(work, strategies)
    report["all_within_targets"] = all(report[d]["all_within_targets"] for d in dtypes)
    text = json.dumps(report, indent=2)
    (work / "report.json").write_text(text + "\n")
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
        if name in ("official", "ours"):
            p.add_argument("--dtype", choices=DTYPES, default="float32")
        if name in ("ours", "compare"):
            p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    args = parser.parse_args(argv)
    if args.command == "prepare" and args.iterations < 1:
        parser.error("--iterations must be >= 1")
    commands = {"prepare": cmd_prepare, "official": cmd_official, "ours": cmd_ours, "compare": cmd_compare}
    return commands[args.command](args) or 0


if __name__ == "__main__":
    sys.exit(main())
