"""Compare regionembed's LeGrad on an attention-pool head (SigLIP or CoCa) with the official ``legrad-torch==1.1``.

The official code needs ``open_clip_torch<=2.23.0`` while regionembed runs on open_clip 3.x, so the two sides run in
two virtual environments and exchange files (safetensors + JSON) through a work directory;
``scripts/compare_official_legrad.sh`` runs the whole procedure. ``--model``: ``ViT-B-16-SigLIP`` (default; the
official ``compute_legrad_siglip``) or ``coca_ViT-B-32`` (the official ``compute_legrad_coca``, which
``LeWrapper`` picks for an open_clip ``VisionTransformer`` with an ``attn_pool``).

1. ``prepare`` (our venv): a randomly initialised open_clip model (fixed seed); its ``state_dict``
   (``weights.safetensors``; the visual keys are the same in open_clip 3.3 and 2.23, no renaming: SigLIP's timm tower
   has timm's own keys, CoCa's ``VisionTransformer``/``AttentionalPooler`` keys did not change), random images
   at 224 and 320 pixels and random unit-norm targets (``inputs.safetensors``).
2. ``official`` (official venv; never imports regionembed): load the visual tower's weights into open_clip 2.23's
   ``create_model(model)`` with ``strict=True``, wrap it in ``legrad.LeWrapper(model, layer_index=L)``
   and call ``compute_legrad(target, image, apply_correction=False)`` per target (SigLIP's "empty text" correction
   needs the hub tokenizer; it is a post-processing the official code lets one switch off; CoCa has none). A fresh
   model per layer setting and image size (the official CoCa path resizes the positional embedding in place).
3. ``ours`` (our venv): ``OpenCLIPBackbone(model, pretrained=weights.safetensors, image_size=s)`` and
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
DEFAULT_WORKDIR = REPO / "outputs" / "compare_official_legrad"  # /<model> below it
# --model: the official LeWrapper routes a timm tower (SigLIP) to its SigLIP recipe and an open_clip
# VisionTransformer with ``attn_pool`` (CoCa) to its CoCa recipe (``compute_legrad_coca``)
MODELS = ("ViT-B-16-SigLIP", "coca_ViT-B-32")
SIZES = (224, 320)
LAYER_INDICES = (-1, -2, 0)  # LeWrapper's layer_index: the first explained block (-2 is its default)
NUM_TARGETS = 3
SEED = 0
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def prepare(workdir: Path, model_name: str) -> None:
    import open_clip

    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = open_clip.create_model(model_name, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(workdir / "weights.safetensors"))
    g = torch.Generator().manual_seed(SEED)
    inputs = {f"image{s}": torch.randn(1, 3, s, s, generator=g) for s in SIZES}
    targets = torch.randn(NUM_TARGETS, int(open_clip.get_model_config(model_name)["embed_dim"]), generator=g)
    inputs["targets"] = torch.nn.functional.normalize(targets, dim=-1)
    save_file(inputs, str(workdir / "inputs.safetensors"))


def official(workdir: Path, model_name: str, dtype: str) -> None:
    import open_clip
    from legrad import LeWrapper

    state = load_file(str(workdir / "weights.safetensors"))
    inputs = load_file(str(workdir / "inputs.safetensors"))
    out = {}
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    targets = inputs["targets"].to(DTYPES[dtype])
    for layer_index in LAYER_INDICES:
        for s in SIZES:
            # a fresh model per size: on an open_clip VisionTransformer (CoCa) the official dynamic-size forward
            # (legrad.utils.vit_dynamic_size_forward) overwrites positional_embedding.data with a resampled
            # [1, T, C] copy, which its next resampling cannot read (a second size fails in timm's reshape)
            model = open_clip.create_model(model_name, pretrained=None)
            model.visual.load_state_dict(visual, strict=True)
            model.eval()
            wrapped = LeWrapper(model, layer_index=layer_index)
            model.to(DTYPES[dtype])  # the wrapper's own .to is the model's (LeWrapper copies the model's attributes)
            image = inputs[f"image{s}"].to(DTYPES[dtype])
            maps = [
                wrapped.compute_legrad(targets[i : i + 1], image=image, apply_correction=False)[0, 0]
                for i in range(NUM_TARGETS)
            ]
            out[f"L{layer_index}_s{s}"] = torch.stack(maps).detach().contiguous()
    save_file(out, str(workdir / f"official_{dtype}.safetensors"))


def ours(workdir: Path, model_name: str, dtype: str) -> None:
    sys.path.insert(0, str(REPO / "src"))
    from regionembed.backbones import OpenCLIPBackbone
    from regionembed.explainers import LeGrad

    inputs = load_file(str(workdir / "inputs.safetensors"))
    out = {}
    for s in SIZES:
        backbone = OpenCLIPBackbone(
            model_name, pretrained=str(workdir / "weights.safetensors"), image_size=s, tokenizer=False
        )  # no text is encoded here (and SigLIP's tokenizer is on the hub)
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
    parser.add_argument("--workdir", type=Path, default=None, help=f"default: {DEFAULT_WORKDIR}/<model>")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--model", choices=list(MODELS), default="ViT-B-16-SigLIP")
    args = parser.parse_args()
    args.workdir = args.workdir or DEFAULT_WORKDIR / args.model
    if args.step == "prepare":
        prepare(args.workdir, args.model)
    elif args.step == "official":
        official(args.workdir, args.model, args.dtype)
    elif args.step == "ours":
        ours(args.workdir, args.model, args.dtype)
    else:
        sys.exit(compare(args.workdir))


if __name__ == "__main__":
    main()
