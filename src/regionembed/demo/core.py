"""What the browser demo computes, without any UI: models, regions, one run, and its files.

Everything here goes through the same library paths as ``infer.py single``: the image and the region masks are
written as files into the run folder and read back with :class:`~regionembed.data.ImageMaskDataset` (so the mask
rules and error messages are the CLI's), MaskInversion runs through
:meth:`~regionembed.modules.MaskInversionModule.invert`, and the results are written by
:func:`~regionembed.callbacks.writer.write_inversion` (the CLI's output format). The demo adds views on top: the
explainer maps of each prompt, region methods side by side, and the equivalent command line.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shlex
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..backbones import OpenCLIPBackbone
from ..backbones.base import Backbone
from ..boxes import maps_to_boxes
from ..callbacks.writer import write_inversion
from ..data.folder import ImageMaskDataset
from ..explainers import GradCAM, LeGrad, ScoreCAM, VLScore
from ..explainers.base import Explainer
from ..inversion import MaskInversion
from ..io import atomic_write, load_image, mask_from_pil, save_png
from ..modules.mask_inversion import MaskInversionModule
from ..regions import (
    AlphaEmbedding,
    CropEmbedding,
    GlobalEmbedding,
    MaskedCropEmbedding,
    RedCircleEmbedding,
    RegionEmbedder,
)
from ..viz import overlay_map

__all__ = [
    "EXPLAINERS",
    "METHODS",
    "ModelSpec",
    "RunSettings",
    "draw_boxes",
    "load_model",
    "parse_box_lines",
    "parse_boxes",
    "parse_lines",
    "run",
    "synthetic_scene",
    "unique_name",
]

log = logging.getLogger(__name__)
#: the shipped backbone fragment of a random tiny model (``regionembed.config_files``)
TINY_BACKBONE = "regionembed:backbone/tiny.yaml"

#: explainers offered for the text-conditioned maps (name -> factory)
EXPLAINERS: dict[str, Callable[[Sequence[int]], object]] = {
    "LeGrad": lambda layers: LeGrad(layers),
    "Grad-CAM": lambda layers: GradCAM(),
    "Score-CAM": lambda layers: ScoreCAM(),
    "VL-Score": lambda layers: VLScore(),
}

#: region methods compared side by side (name -> factory); ``mask_inversion`` reuses the run's tokens, the
#: ``alpha_*`` methods need a backbone with an alpha channel
METHODS: dict[str, Callable[[], RegionEmbedder] | None] = {
    "global": GlobalEmbedding,
    "crop": CropEmbedding,
    "masked_crop_grey": lambda: MaskedCropEmbedding("grey"),
    "masked_crop_blur": lambda: MaskedCropEmbedding("blur"),
    "red_circle": RedCircleEmbedding,
    "mask_inversion": None,
    "alpha_mask": lambda: AlphaEmbedding("mask"),
    "alpha_box": lambda: AlphaEmbedding("box"),
}


# ------------------------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class ModelSpec:
    """Which model the demo runs: an open_clip architecture and its weights.

    Attributes:
        model_name: an open_clip model name (``open_clip.list_models()``) or a regionembed tiny config.
        pretrained: ``None`` (random init, seeded with 0 as ``infer.py``'s ``seed_everything: 0``), a hub tag, a
            local weights file, or ``regionembed:<zoo name>``.
        alpha_checkpoint: optional Alpha-CLIP visual checkpoint (adds the ``alpha_*`` region methods).
    """

    model_name: str
    pretrained: str | None = None
    alpha_checkpoint: str | None = None

    @property
    def random(self) -> bool:
        return not self.pretrained

    def label(self) -> str:
        weights = "random weights" if self.random else self.pretrained
        alpha = f", Alpha-CLIP visual {self.alpha_checkpoint}" if self.alpha_checkpoint else ""
        return f"{self.model_name} with {weights}{alpha}"

    def cli_overrides(self) -> list[str]:
        key = "--model.init_args.backbone.init_args"
        if self.random:
            # jsonargparse reads `pretrained=null` on the command line as the string "None"; the tiny fragment's
            # YAML `pretrained: null` is a real None
            out = [f"--model.init_args.backbone={TINY_BACKBONE}", f"{key}.model_name={self.model_name}"]
        else:
            out = [f"{key}.model_name={self.model_name}", f"{key}.pretrained={self.pretrained}"]
        if self.alpha_checkpoint:
            out.append(f"{key}.alpha_checkpoint={self.alpha_checkpoint}")
        return out


_MODELS: dict[ModelSpec, Backbone] = {}
_MODELS_LOCK = threading.Lock()


def load_model(spec: ModelSpec, device: str | torch.device = "cpu") -> Backbone:
    """The backbone of ``spec``, built once per process and cached (frozen, eval mode).

    A ``regionembed:<name>`` model loads the weights shipped in the package (the demo never trains). Errors are the
    library's: unknown model, missing weights file, hub unreachable offline
    (:class:`~regionembed.backbones.weights.PretrainedWeightsUnavailable`).
    """
    with _MODELS_LOCK:
        if spec in _MODELS:
            return _MODELS[spec]
        pretrained = spec.pretrained or None
        if spec.random:
            torch.manual_seed(0)  # the CLI seeds with seed_everything: 0 before building the model
        backbone = OpenCLIPBackbone(spec.model_name, pretrained=pretrained, alpha_checkpoint=spec.alpha_checkpoint)
        backbone = backbone.requires_grad_(False).eval().to(device)
        _MODELS[spec] = backbone
        log.info("loaded %s", spec.label())
        return backbone


# ------------------------------------------------------------------------------------------------ inputs
def parse_lines(text: str | None) -> list[str]:
    """Non-empty stripped lines of ``text``."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def parse_box_lines(text: str | None, size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Box lines ``x0 y0 x1 y1`` (pixels, commas or spaces; ``x1``/``y1`` exclusive) for an image of ``size``.

    Raises:
        ValueError: a line that is not four numbers, or a box that is empty or leaves the image.
    """
    width, height = size
    out = []
    for i, line in enumerate(parse_lines(text), start=1):
        parts = [p for p in re.split(r"[,\s]+", line) if p]
        try:
            if len(parts) != 4:
                raise ValueError
            x0, y0, x1, y1 = (round(float(p)) for p in parts)
        except ValueError:
            raise ValueError(f"box {i} {line!r}: expected four numbers 'x0 y0 x1 y1' in pixels") from None
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(
                f"box {i} {line!r} is empty or leaves the {width}x{height} image (need 0 <= x0 < x1 <= width, "
                "0 <= y0 < y1 <= height)"
            )
        out.append((x0, y0, x1, y1))
    return out


def parse_boxes(text: str | None, size: tuple[int, int]) -> list[np.ndarray]:
    """Box lines (see :func:`parse_box_lines`) -> binary masks ``[H, W]`` float32 for an image of ``size``."""
    width, height = size
    masks = []
    for x0, y0, x1, y1 in parse_box_lines(text, size):
        mask = np.zeros((height, width), np.float32)
        mask[y0:y1, x0:x1] = 1
        masks.append(mask)
    return masks


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    corner: tuple[int, int] | None = None,
    labels: bool = True,
) -> Image.Image:
    """``image`` with ``boxes`` (xyxy pixels, exclusive ends) outlined in green, numbered when ``labels``, and an
    optional pending first corner marked in red."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(1, round(max(out.size) / 200))
    for k, (x0, y0, x1, y1) in enumerate(boxes, start=1):
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 255, 0), width=width)
        if labels:
            draw.text((x0 + 2, y0 + 1), f"box_{k}", fill=(0, 255, 0))
    if corner is not None:
        r = 2 * width + 1
        draw.ellipse([corner[0] - r, corner[1] - r, corner[0] + r, corner[1] + r], outline=(255, 0, 0), width=width)
    return out


def synthetic_scene(index: int, image_size: int = 192, seed: int = 12345) -> tuple[Image.Image, list, list[str]]:
    """A scene of the synthetic world (the project CLIP's domain): image, object masks ``[H, W]`` uint8, names.

    The world seed differs from the training world's (0), so examples are unseen scenes.
    """
    from ..data.synthetic import SyntheticWorld, WorldConfig

    world = SyntheticWorld(WorldConfig(image_size=image_size, min_objects=2, max_objects=4), seed=seed)
    scene = world.scene(int(index))
    return Image.fromarray(scene.image), list(scene.masks()), scene.names


def unique_name(name: str, taken: set[str]) -> str:
    """``name`` made file-safe and distinct from ``taken`` (``name_2``, ``name_3``, ...); added to ``taken``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "region"
    out, k = name, 2
    while out in taken:
        out, k = f"{name}_{k}", k + 1
    taken.add(out)
    return out


def _mask_png(mask: np.ndarray) -> np.ndarray:
    return (np.clip(mask, 0, 1) * 255).round().astype(np.uint8)


def write_inputs(
    run_dir: Path,
    image: Image.Image,
    brush_layers: Sequence[Image.Image] = (),
    mask_files: Sequence[str | Path] = (),
    boxes: str | None = None,
) -> tuple[Path, list[Path]]:
    """Write the image and every region as files under ``run_dir/inputs`` (the files the CLI command reads).

    Brush layers become ``brush_<k>.png`` (empty layers are skipped; a layer of another size than the image is
    resized, nearest), uploaded masks are copied under their own names, boxes become ``box_<k>.png``. Uploaded
    masks are checked later by the CLI's reader (size, emptiness, format).

    Raises:
        ValueError: no region at all, or a malformed box.
    """
    inputs = run_dir / "inputs"
    (inputs / "masks").mkdir(parents=True, exist_ok=True)
    image_path = inputs / "image.png"
    save_png(np.asarray(image.convert("RGB")), image_path)
    taken: set[str] = set()
    paths = []
    k = 0
    for layer in brush_layers:
        mask = mask_from_pil(layer, name="brush layer")
        if mask.max() <= 0:
            continue  # an unused layer is not a region
        if mask.shape[::-1] != image.size:
            mask = np.asarray(Image.fromarray(mask, mode="F").resize(image.size, Image.NEAREST))
        k += 1
        path = inputs / "masks" / f"{unique_name(f'brush_{k}', taken)}.png"
        save_png(_mask_png(mask), path)
        paths.append(path)
    for src in mask_files:
        src = Path(src)
        path = inputs / "masks" / f"{unique_name(src.stem, taken)}{src.suffix.lower() or '.png'}"
        shutil.copyfile(src, path)
        paths.append(path)
    for k, mask in enumerate(parse_boxes(boxes, image.size), start=1):
        path = inputs / "masks" / f"{unique_name(f'box_{k}', taken)}.png"
        save_png(_mask_png(mask), path)
        paths.append(path)
    if not paths:
        raise ValueError("no regions: paint a layer with the brush, upload mask PNGs, or enter boxes")
    return image_path, paths


# ------------------------------------------------------------------------------------------------ a run
#: the solver's defaults (the official settings), which the demo's controls start from
OFFICIAL = MaskInversion()


@dataclass
class RunSettings:
    """The knobs of one run (MaskInversion's build a :class:`~regionembed.inversion.MaskInversion` with LeGrad on
    ``layers``; defaults: the official ones)."""

    prompts: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=lambda: ["{}"])
    iterations: int = OFFICIAL.iterations
    lr: float = OFFICIAL.lr
    strategy: str = OFFICIAL.strategy
    layers: list[int] = field(default_factory=lambda: list(OFFICIAL.explainer.layers))
    explainer: str | None = "LeGrad"
    methods: list[str] = field(default_factory=lambda: ["global", "crop", "masked_crop_grey", "mask_inversion"])


@dataclass
class RunResult:
    """Everything a run shows and offers for download (paths are inside the run folder)."""

    run_dir: Path
    strategy: str
    region_names: list[str]
    loss_history: list[float]
    mask_loss: list[float]
    probabilities: np.ndarray | None  # [N, P]
    overlays: list[tuple[Path, str]]  # MaskInversion maps over the image, mask outlined
    explainer_maps: list[tuple[Path, str]]
    methods_table: list[list] = field(default_factory=list)  # rows: region, method, best prompt, p(best), p...
    command: str = ""
    embeddings: Path | None = None
    manifest: Path | None = None
    archive: Path | None = None
    seconds: float = 0.0


@contextlib.contextmanager
def optimizer_steps(callback: Callable[[int], None]) -> Iterator[None]:
    """Call ``callback(step)`` after every optimiser step taken *in this thread* (MaskInversion's AdamW steps).

    Uses torch's global optimiser hook, filtered by thread, so the solver needs no progress argument and other
    threads' optimisers are left alone.
    """
    thread = threading.get_ident()
    count = 0

    def hook(optimizer, args, kwargs):
        nonlocal count
        if threading.get_ident() == thread:
            count += 1
            callback(count)

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def explainer_maps(
    backbone: Backbone,
    image: Image.Image,
    tensor: torch.Tensor,
    text: torch.Tensor,
    prompts: Sequence[str],
    name: str,
    layers: Sequence[int],
    out_dir: Path,
) -> list[tuple[Path, str]]:
    """Text-conditioned maps of ``prompts`` (``text`` ``[P, D]``) on the preprocessed ``tensor`` ``[3, S, S]``,
    saved as overlays with the box of each map (threshold 0.6 of the map's maximum, largest component); VL-Score
    maps carry its present / "not present" verdict."""
    explainer = EXPLAINERS[name](layers)
    maps, found_all = explainer.explain_with_presence(backbone, tensor[None].to(text.device), text)
    maps = maps.detach().cpu()  # [P, S, S]
    # a verdict only from explainers that decide presence (VL-Score); the others always say "present"
    decides = type(explainer).explain_presence is not Explainer.explain_presence
    present = found_all.cpu() if decides else None
    scale = (image.width / maps.shape[-1], image.height / maps.shape[-2])
    out = []
    for i, prompt in enumerate(prompts):
        found = present is None or bool(present[i])
        overlay = overlay_map(image, maps[i])
        caption = f"{name}: {prompt}"
        if found:
            boxes = maps_to_boxes(maps[i], threshold=0.6).boxes
            boxes = boxes * torch.tensor([scale[0], scale[1], scale[0], scale[1]])  # model input -> image pixels
            overlay = np.asarray(draw_boxes(Image.fromarray(overlay), boxes.tolist(), labels=False))
            if present is not None:
                caption += " (present)"
        else:
            caption += " (not present)"
        path = out_dir / f"{i:02d}_{unique_name(prompt, set())}.png"
        save_png(overlay, path)
        out.append((path, caption))
    return out


#: the "best prompt" cell of a region method's row when the region vanishes at the model input
VANISHED = "(region vanishes at the model input)"


def compare_methods(
    backbone: Backbone,
    tensor: torch.Tensor,
    masks: torch.Tensor,
    names: Sequence[str],
    text: torch.Tensor,
    prompts: Sequence[str],
    methods: Sequence[str],
    inversion: torch.Tensor,
) -> list[list]:
    """Rows ``[region, method, best prompt, p(best), p(prompt_1), ...]`` for each region and method.

    ``masks`` ``[N, S, S]`` are the reader's masks at the model input (nearest; soft values kept), the ones the region
    methods get in region classification; probabilities are a softmax of the model's logit scale times the cosines,
    as in :class:`MaskInversionModule`. A region too small to survive at the model input (its mask is all zeros there)
    gets :data:`VANISHED` and empty probabilities from the region methods instead of stopping the run; MaskInversion
    fits the full-resolution masks, so its rows are always there.
    """
    masks_s = masks.float().to(text.device)
    present = masks_s.flatten(1).amax(1) > 0  # [N]
    scale = backbone.logit_scale.exp() if backbone.logit_scale is not None else 100.0
    image = tensor.to(text.device)
    rows = []
    embeddings = {}
    for method in methods:
        if method == "mask_inversion":
            embeddings[method] = inversion.to(text.device)
        elif method.startswith("alpha_") and backbone.alpha_embed is None:
            continue  # the model has no alpha channel
        else:
            emb = torch.full((len(names), text.shape[-1]), float("nan"), dtype=text.dtype, device=text.device)
            if present.any():
                emb[present] = METHODS[method]()(backbone, image, masks_s[present]).to(emb.dtype)
            embeddings[method] = emb
    for i, region in enumerate(names):
        for method, emb in embeddings.items():
            if method != "mask_inversion" and not present[i]:
                rows.append([region, method, VANISHED, None, *(None for _ in prompts)])
                continue
            probs = (scale * F.normalize(emb[i : i + 1], dim=-1) @ text.T).softmax(-1)[0].detach().cpu()
            best = int(probs.argmax())
            rows.append(
                [region, method, prompts[best], round(float(probs[best]), 4), *(round(float(p), 4) for p in probs)]
            )
    return rows


def _zip(run_dir: Path) -> Path:
    """Zip ``run_dir`` into ``<run_dir>.zip`` beside it (written under a temporary name, then renamed)."""
    tmp = shutil.make_archive(str(run_dir.parent / f".{run_dir.name}.tmp"), "zip", root_dir=run_dir)
    archive = run_dir.parent / f"{run_dir.name}.zip"
    Path(tmp).replace(archive)
    return archive


def command_line(
    spec: ModelSpec,
    image_path: Path,
    mask_paths: Sequence[Path],
    settings: RunSettings,
    output: Path,
    device: str | torch.device = "cpu",
) -> str:
    """The ``regionembed-infer single`` command that reproduces a run's embeddings (``python infer.py single`` in a
    checkout is the same command)."""
    args = ["regionembed-infer", "single", str(image_path), *map(str, mask_paths)]
    if settings.prompts:
        args += ["--prompts", *settings.prompts]
    args += [
        "--output",
        str(output),
        *spec.cli_overrides(),
        f"--model.init_args.solver.init_args.iterations={settings.iterations}",
        f"--model.init_args.solver.init_args.lr={settings.lr}",
        f"--model.init_args.solver.init_args.strategy={settings.strategy}",
        f"--model.init_args.solver.init_args.explainer.init_args.layers={list(settings.layers)}",
        f"--trainer.accelerator={'cpu' if torch.device(device).type == 'cpu' else 'gpu'}",
    ]
    if settings.prompts:
        args.append(f"--model.init_args.prompt_templates={list(settings.templates)}".replace("'", '"'))
    return shlex.join(args)


def run(
    spec: ModelSpec,
    run_dir: Path,
    image: Image.Image,
    settings: RunSettings,
    brush_layers: Sequence[Image.Image] = (),
    mask_files: Sequence[str | Path] = (),
    boxes: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    device: str | torch.device = "cpu",
) -> RunResult:
    """One demo run: regions -> files -> the CLI's reader -> MaskInversion -> the CLI's writer, plus the extra views.

    Args:
        spec: the model.
        run_dir: a new folder for this run; everything the run writes goes here, and its zip beside it
            (``<run_dir>.zip``, inside the demo's output folder).
        image: the image (RGB).
        settings: prompts, templates, MaskInversion settings, explainer, region methods.
        brush_layers: painted RGBA layers, one region each (empty layers ignored).
        mask_files: uploaded mask files (the CLI's rules: same size as the image, not empty).
        boxes: box lines ``x0 y0 x1 y1``.
        progress: ``progress(step, total, message)`` during MaskInversion.
        device: where the model runs.

    Raises:
        ValueError / FileNotFoundError / RuntimeError: bad input or model, with the CLI's messages.
    """
    start = time.perf_counter()
    backbone = load_model(spec, device)
    if any("{}" not in t for t in settings.templates):
        raise ValueError(f"every template needs a '{{}}' placeholder, got {settings.templates}")
    image_path, mask_paths = write_inputs(run_dir, image, brush_layers, mask_files, boxes)
    sample = ImageMaskDataset([(image_path, mask_paths)], backbone.preprocess)[0]  # the CLI's reader and errors
    solver = MaskInversion(
        LeGrad(settings.layers), lr=settings.lr, iterations=settings.iterations, strategy=settings.strategy
    )
    module = MaskInversionModule(
        backbone, solver, prompts=settings.prompts or None, prompt_templates=settings.templates
    ).to(device)
    n = sample["masks"].shape[0]
    strategy = module.solver.plan(backbone, sample["image"].shape[-1], n)
    if progress is not None:
        progress(0, settings.iterations, f"MaskInversion: {n} regions, strategy {strategy}")
    with optimizer_steps(lambda step: progress and progress(step, settings.iterations, f"strategy {strategy}")):
        result = module.invert(sample)
    out_dir = write_inversion(result, run_dir / "outputs")
    names = result["mask_names"]
    overlays = [
        (out_dir / "overlays" / f"{name}.png", f"{name}: Dice loss {float(result['mask_loss'][i]):.3f}")
        for i, name in enumerate(names)
    ]
    probabilities = result["probabilities"].numpy() if "probabilities" in result else None
    maps: list[tuple[Path, str]] = []
    table: list[list] = []
    if settings.prompts:
        text = module.text_embeddings()
        pil = load_image(image_path)
        if settings.explainer:
            if progress is not None:
                progress(settings.iterations, settings.iterations, f"{settings.explainer} maps")
            maps = explainer_maps(
                backbone,
                pil,
                sample["image"],
                text,
                settings.prompts,
                settings.explainer,
                settings.layers,
                out_dir / "explainer",
            )
        if settings.methods:
            table = compare_methods(
                backbone,
                sample["image"],
                sample["masks"],  # at the model input, as region classification gives them to the region methods
                names,
                text,
                settings.prompts,
                settings.methods,
                result["embeddings"],
            )
    command = command_line(spec, image_path, mask_paths, settings, run_dir / "cli", device)
    with atomic_write(run_dir / "command.txt", "w") as fh:
        fh.write(command + "\n")
    archive = _zip(run_dir)
    return RunResult(
        run_dir=run_dir,
        strategy=result["strategy"],
        region_names=names,
        loss_history=[float(v) for v in result["loss_history"]],
        mask_loss=[float(v) for v in result["mask_loss"]],
        probabilities=probabilities,
        overlays=overlays,
        explainer_maps=maps,
        methods_table=table,
        command=command,
        embeddings=out_dir / "embeddings.safetensors",
        manifest=out_dir / "manifest.json",
        archive=archive,
        seconds=time.perf_counter() - start,
    )
