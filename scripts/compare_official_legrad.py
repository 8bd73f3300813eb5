"""Compare regionembed's LeGrad on a SigLIP attention-pool head with the official ``legrad-torch==1.1``.

The official code needs ``open_clip_torch<=2.23.0`` while regionembed runs on open_clip 3.x, so the two sides run in
two virtual environments and exchange files (safetensors + JSON) through a work directory;
``scripts/compare_official_legrad.sh`` runs the whole procedure:

1. ``prepare`` (our venv): a randomly initialised open_clip ``ViT-B-16-SigLIP`` (fixed seed); its ``state_dict``
   (``weights.safetensors``, loadable by both open_clip versions: the timm tower's keys are timm's own), random images
   at 224 and 320 pixels and random unit-norm targets (``inputs.safetensors``).
2. ``official`` (official venv; never imports regionembed): load the visual tower's weights into open_clip 2.23's
   ``create_model("ViT-B-16-SigLIP")`` with ``strict=True``, wrap it in ``legrad.LeWrapper(model, layer_index=L)``
   and call ``compute_legrad(target, image, apply_correction=False)`` per target (the "empty text" correction needs
   the hub tokenizer; it is a post-processing the official code lets one switch off).
3. ``ours`` (our venv): ``OpenCLIPTimmBackbone("ViT-B-16-SigLIP", pretrained=weights.safetensors)`` and
   ``LeGrad(layers=range(L, 0))``, all targets of an image in one batch.
4. ``compare``: the max abs difference of the maps per image size, layer setting and dtype, printed as JSON (also
   ``report.json``); exit status 1 when float32 exceeds 1e-4 or float64 exceeds 1e-10.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = REPO / "outputs" / "compare_official_legrad"
MODEL = "ViT-B-16-SigLIP"
SIZES = (224, 320)
LAYER_INDICES = (-1, -2, 0)  # LeWrapper's layer_index: the first explained block (-2 is its default)
NUM_TARGETS = 3
SEED = 0
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def prepare(workdir: Path) -> None:
    import open_clip

    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = open_clip.create_model(MODEL, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(workdir / "weights.safetensors"))
    g = torch.Generator().manual_seed(SEED)
    inputs = {f"image{s}": torch.randn(1, 3, s, s, generator=g) for s in SIZES}
    targets = torch.randn(NUM_TARGETS, int(open_clip.get_model_config(MODEL)["embed_dim"]), generator=g)
    inputs["targets"] = torch.nn.functional.normalize(targets, dim=-1)
    save_file(inputs, str(workdir / "inputs.safetensors"))


def official(workdir: Path, dtype: str) -> None:
    import open_clip
    from legrad import LeWrapper

    state = load_file(str(workdir / "weights.safetensors"))
    inputs = load_file(str(workdir / "inputs.safetensors"))
    out = {}
    for layer_index in LAYER_INDICES:
        model = open_clip.create_model(MODEL, pretrained=None)
        visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
        model.visual.load_state_dict(visual, strict=True)
        model.eval()
        wrapped = LeWrapper(model, layer_index=layer_index)
        model.to(DTYPES[dtype])  # the wrapper's own .to is the model's (LeWrapper copies the model's attributes)
        targets = inputs["targets"].to(DTYPES[dtype])
        for s in SIZES:
            image = inputs[f"image{s}"].to(DTYPES[dtype])
            maps = [
                wrapped.compute_legrad(targets[i : i + 1], image=image, apply_correction=False)[0, 0]
                for i in range(NUM_TARGETS)
            ]
            out[f"L{layer_index}_s{s}"] = torch.stack(maps).detach().contiguous()
    save_file(out, str(workdir / f"official_{dtype}.safetensors"))


def ours(workdir: Path, dtype: str) -> None:
    sys.path.insert(0, str(REPO / "src"))
    from regionembed.backbones import OpenCLIPBackbone
    from regionembed.explainers import LeGrad

    inputs = load_file(str(workdir / "inputs.safetensors"))
    out = {}
    for s in SIZES:
        # SigLIP's tokenizer is on the hub and no text is encoded here: no tokenizer
        backbone = OpenCLIPBackbone(
            MODEL, pretrained=str(workdir / "weights.safetensors"), image_size=s, tokenizer=False
        )
        backbone = backbone.to(DTYPES[dtype]).requires_grad_(False)
        targets = inputs["targets"].to(DTYPES[dtype])
        image = inputs[f"image{s}"].to(DTYPES[dtype])
        n = len(backbone.blocks)
        for layer_index in LAYER_INDICES:
            first = layer_index % n
            maps = LeGrad(layers=tuple(range(first, n)))(backbone, image, targets)
            out[f"L{layer_index}_s{s}"] = maps.detach().contiguous()
    save_file(out, str(workdir / f"ours_{dtype}.safetensors"))


def compare(workdir: Path) -> int:
    report, failed = {}, False
    for dtype, tol in (("float32", 1e-4), ("float64", 1e-10)):
        a = load_file(str(workdir / f"official_{dtype}.safetensors"))
        b = load_file(str(workdir / f"ours_{dtype}.safetensors"))
        for key in sorted(a):
            diff = float((a[key].double() - b[key].double()).abs().max())
            report[f"{dtype}/{key}"] = {"max_abs_diff": diff, "shape": list(a[key].shape), "tolerance": tol}
            failed |= diff > tol
    text = json.dumps(report, indent=2)
    print(text)
    (workdir / "report.json").write_text(text + "\n")
    return int(failed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["prepare", "official", "ours", "compare"])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.workdir)
    elif args.step == "official":
        official(args.workdir, args.dtype)
    elif args.step == "ours":
        ours(args.workdir, args.dtype)
    else:
        sys.exit(compare(args.workdir))


if __name__ == "__main__":
    main()
