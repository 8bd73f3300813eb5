"""The Gradio app of the browser demo (started by :func:`regionembed.demo.cli.main`).

The page wires :mod:`regionembed.demo.core` to controls; it binds to a loopback address only, never shares, and
turns Gradio's analytics off. Every file a run writes lies in the output folder (``--output``), including Gradio's
own upload cache (``GRADIO_TEMP_DIR``, set there unless given).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry, no checks
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import gradio as gr
import pandas as pd

from .. import inversion, zoo
from ..data.synthetic import SyntheticWorld, WorldConfig
from ..io import load_image, save_png
from . import core

__all__ = ["DemoState", "build_app", "launch", "model_spec"]

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SYNTHETIC = f"Synthetic CLIP (project-trained, {zoo.MODELS['clip_synthetic'].model_name})"
TINY = "Tiny random model (re-tiny-vit, for smoke tests)"
OPEN_CLIP = "open_clip model + local weights file or hub tag"
MODEL_KINDS = (SYNTHETIC, TINY, OPEN_CLIP)
STRATEGIES = ("auto", *inversion.STRATEGIES)
INTRO = """# regionembed: what does this region mean?
Give an image and regions (paint one **layer per region** with the brush, upload mask PNGs, or type boxes), type
prompts, and press **Run**. MaskInversion optimises one embedding per region so that its LeGrad map matches the
region; the table says which prompt each region matches. Everything runs locally; nothing leaves this machine."""


def model_spec(kind: str, name: str = "", weights: str = "", alpha: str = "") -> core.ModelSpec:
    """The :class:`~regionembed.demo.core.ModelSpec` of the model controls."""
    if kind == SYNTHETIC:
        return core.ModelSpec(zoo.MODELS["clip_synthetic"].model_name, "regionembed:clip_synthetic")
    if kind == TINY:
        return core.ModelSpec("re-tiny-vit", None)
    if kind != OPEN_CLIP:
        raise ValueError(f"unknown model choice {kind!r}; choose one of {list(MODEL_KINDS)}")
    if not name.strip():
        raise ValueError("open_clip model: enter a model name (e.g. ViT-B-16; see open_clip.list_models())")
    return core.ModelSpec(name.strip(), weights.strip() or None, alpha.strip() or None)


class DemoState:
    """What the server keeps between requests: the output folder, the device, and run numbering.

    Args:
        output: folder for every file the demo writes (runs, example scenes).
        device: where models run.
    """

    def __init__(self, output: str | os.PathLike, device: str = "cpu") -> None:
        self.output = Path(output).resolve()
        self.output.mkdir(parents=True, exist_ok=True)
        self.device = device
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def new_dir(self, prefix: str) -> Path:
        with self._lock:
            path = self.output / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{next(self._counter):04d}"
        path.mkdir(parents=True)
        return path


def _error(err: BaseException) -> str:
    return f"**Error:** {type(err).__name__}: {err}"


def build_app(state: DemoState, default_model: str = SYNTHETIC) -> gr.Blocks:
    """The demo page. Long work runs in Gradio's queue (one run at a time, the model loaded once per process)."""

    def load_model_ui(kind, name, weights, alpha):
        try:
            spec = model_spec(kind, name, weights, alpha)
            backbone = core.load_model(spec, state.device)
        except Exception as err:  # shown in the page; the server keeps serving
            return _error(err)
        size = backbone.preprocess.size
        note = " **Random weights: maps and probabilities are meaningless.**" if spec.random else ""
        alpha_note = " Alpha channel: yes (alpha region methods available)." if backbone.alpha_embed is not None else ""
        return f"Model loaded: {spec.label()}, input {size}x{size}.{alpha_note}{note}"

    def open_image(path):
        if not path:
            return gr.skip(), gr.skip(), gr.skip()
        try:
            image = load_image(path)  # the CLI's reader: a non-image fails here with the file named
        except Exception as err:
            return gr.skip(), _error(err), None  # clear the file box so the next upload is one click
        editor = {"background": image, "layers": [], "composite": image}
        status = f"Image `{Path(path).name}` loaded ({image.width}x{image.height}). Paint, upload or box regions."
        return editor, status, gr.skip()

    def new_scene(index):
        index = int(index or 0)
        image, masks, names = core.synthetic_scene(index)
        folder = state.new_dir(f"scene{index}")
        files = []
        taken: set[str] = set()
        for mask, name in zip(masks, names, strict=True):
            path = folder / f"{core.unique_name(name.replace(' ', '_'), taken)}.png"
            save_png(mask.astype("uint8") * 255, path)
            files.append(str(path))
        classes = SyntheticWorld(WorldConfig()).class_names
        absent = next(c for c in classes if c not in names)  # a prompt for something that is not there
        prompts = "\n".join(dict.fromkeys([*names, absent]))
        editor = {"background": image, "layers": [], "composite": image}
        status = f"Synthetic scene {index}: {', '.join(names)} (masks uploaded below; '{absent}' is not in the image)."
        return editor, files, prompts, "a {}.", index + 1, status

    def show_boxes(image, boxes, first=None):
        """The image with the typed boxes (and a box's first corner) drawn on it."""
        if image is None:
            return None
        try:
            rects = core.parse_box_lines(boxes, image.size)
        except ValueError:
            rects = []  # the run reports malformed boxes; the preview just leaves them out
        return core.draw_boxes(image, rects, first)

    def set_base(editor, boxes):
        """Keep the editor's image server-side for the box preview (clicks then send no image data)."""
        if not editor or editor.get("background") is None:
            return None, None
        image = editor["background"].convert("RGB")
        return image, show_boxes(image, boxes)

    def add_corner(image, boxes, first, evt: gr.SelectData):
        if image is None:
            return gr.skip(), None, gr.skip()
        x, y = (int(v) for v in evt.index)
        if first is None:
            return gr.skip(), (x, y), show_boxes(image, boxes, (x, y))
        (x0, x1), (y0, y1) = sorted((first[0], x)), sorted((first[1], y))
        line = f"{x0} {y0} {x1 + 1} {y1 + 1}"  # clicked pixels are inside the box
        boxes = "\n".join([*core.parse_lines(boxes), line])
        return boxes, None, show_boxes(image, boxes)

    def run_ui(
        kind,
        name,
        weights,
        alpha,
        editor,
        mask_files,
        boxes,
        prompts,
        templates,
        iterations,
        lr,
        strategy,
        layers,
        explainer,
        methods,
        progress=gr.Progress(),  # noqa: B008 - Gradio's way to request a progress tracker
    ):
        empty = (None, None, None, None, None, None, "")  # table, overlays, loss, maps, methods, files, command
        try:
            spec = model_spec(kind, name, weights, alpha)
            if not editor or editor.get("background") is None:
                raise ValueError("no image: upload an image file, drop one on the editor, or make a synthetic scene")
            settings = core.RunSettings(
                prompts=core.parse_lines(prompts),
                templates=core.parse_lines(templates) or ["{}"],
                iterations=int(iterations),
                lr=float(lr),
                strategy=strategy,
                layers=_parse_layers(layers),
                explainer=None if explainer == "none" else explainer,
                methods=list(methods or []),
            )
            progress(0, desc="loading the model")
            result = core.run(
                spec,
                state.new_dir("run"),
                editor["background"],
                settings,
                brush_layers=[layer for layer in editor.get("layers") or [] if layer is not None],
                mask_files=[getattr(f, "name", f) for f in mask_files or []],
                boxes=boxes,
                progress=lambda step, total, msg: progress(
                    (step, max(total, 1)), desc=f"MaskInversion {msg}", unit="steps"
                ),
                device=state.device,
            )
        except Exception as err:  # bad input or model: the library's message, in the page
            log.info("run failed: %s", err)
            return (_error(err), *empty)
        return _present(spec, settings, result)

    with gr.Blocks(title="regionembed demo", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=5):
                with gr.Accordion("Model", open=True):
                    kind = gr.Radio(list(MODEL_KINDS), value=default_model, label="Model", elem_id="model_kind")
                    with gr.Row():
                        name = gr.Textbox(label="open_clip model name", placeholder="ViT-B-16", elem_id="model_name")
                        weights = gr.Textbox(
                            label="weights: local file or hub tag",
                            placeholder="/weights/vit_b16.safetensors or openai",
                            elem_id="model_weights",
                        )
                        alpha = gr.Textbox(label="Alpha-CLIP visual checkpoint (optional)", elem_id="model_alpha")
                    load = gr.Button("Load model", elem_id="load_model")
                    model_info = gr.Markdown(elem_id="model_info")
                with gr.Row():
                    image_file = gr.File(label="Image file", file_types=None, elem_id="image_file", height=120)
                    with gr.Column():
                        scene_index = gr.Number(value=0, precision=0, label="scene", elem_id="scene_index")
                        scene = gr.Button("New synthetic scene", elem_id="new_scene")
                editor = gr.ImageEditor(
                    label="Image: paint one layer per region (layers menu below)",
                    type="pil",
                    image_mode="RGBA",
                    format="png",
                    layers=True,
                    brush=gr.Brush(colors=["#ff0000", "#00ff00", "#0000ff", "#ffff00"], default_size=12),
                    sources=("upload", "clipboard"),
                    elem_id="editor",
                    height=420,
                )
                mask_files = gr.File(
                    label="Mask PNGs (one region each, the image's size; grey/RGBA/palette, 0/255 or 0/1)",
                    file_count="multiple",
                    elem_id="mask_files",
                )
                with gr.Row():
                    box_picker = gr.Image(
                        label="Draw a box: click two opposite corners",
                        type="pil",
                        interactive=False,
                        elem_id="box_picker",
                        height=220,
                    )
                    boxes = gr.Textbox(
                        label="Boxes, one region per line: x0 y0 x1 y1 (pixels)", lines=6, elem_id="boxes"
                    )
                corner = gr.State(None)  # the first corner of a box being drawn
                base = gr.State(None)  # the image under the box preview
                with gr.Row():
                    prompts = gr.Textbox(label="Prompts, one per line", lines=4, elem_id="prompts")
                    templates = gr.Textbox(
                        label="Templates, one per line ('{}' = the prompt; averaged)",
                        value="{}",
                        lines=4,
                        elem_id="templates",
                    )
                explainer = gr.Radio(
                    [*core.EXPLAINERS, "none"],
                    value="LeGrad",
                    label="Explainer for the prompt maps",
                    elem_id="explainer",
                )
                methods = gr.CheckboxGroup(
                    list(core.METHODS),
                    value=["global", "crop", "masked_crop_grey", "red_circle", "mask_inversion", "alpha_mask"],
                    label="Region methods side by side (alpha_*: only for models with an alpha channel)",
                    elem_id="methods",
                )
                with gr.Accordion("MaskInversion settings", open=False), gr.Row():
                    default = core.RunSettings()
                    iterations = gr.Slider(
                        0, 100, value=default.iterations, step=1, label="iterations", elem_id="iterations"
                    )
                    lr = gr.Number(value=default.lr, label="learning rate", elem_id="lr")
                    strategy = gr.Dropdown(
                        list(STRATEGIES), value=default.strategy, label="strategy", elem_id="strategy"
                    )
                    layers = gr.Textbox(
                        value=", ".join(map(str, default.layers)),
                        label="LeGrad layers (comma-separated)",
                        elem_id="layers",
                    )
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=6):
                status = gr.Markdown("Load an image or press **New synthetic scene**.", elem_id="status")
                table = gr.Dataframe(
                    label="Region-to-prompt probabilities (MaskInversion)",
                    interactive=False,
                    wrap=True,
                    elem_id="probabilities",
                )
                overlays = gr.Gallery(
                    label="MaskInversion maps per region (mask outlined in white)",
                    columns=3,
                    height=260,
                    elem_id="overlays",
                )
                loss = gr.LinePlot(x="step", y="loss", title="loss (mean Dice + regulariser)", elem_id="loss")
                maps = gr.Gallery(
                    label="Prompt maps (green: the map's box; VL-Score says present / not present)",
                    columns=3,
                    height=260,
                    elem_id="explainer_maps",
                )
                compare = gr.Dataframe(
                    label="Region methods side by side", interactive=False, wrap=True, elem_id="methods_table"
                )
                downloads = gr.File(label="Downloads", file_count="multiple", elem_id="downloads")
                command = gr.Code(
                    label="Equivalent command (any directory, regionembed installed)",
                    language="shell",
                    wrap_lines=True,
                    elem_id="command",
                )

        load.click(load_model_ui, [kind, name, weights, alpha], model_info)
        kind.change(load_model_ui, [kind, name, weights, alpha], model_info)
        app.load(load_model_ui, [kind, name, weights, alpha], model_info)  # cached after the first page load
        image_file.upload(open_image, image_file, [editor, status, image_file]).then(
            set_base, [editor, boxes], [base, box_picker]
        )
        scene.click(new_scene, scene_index, [editor, mask_files, prompts, templates, scene_index, status]).then(
            set_base, [editor, boxes], [base, box_picker]
        )
        editor.upload(set_base, [editor, boxes], [base, box_picker])
        boxes.blur(show_boxes, [base, boxes], box_picker)
        box_picker.select(add_corner, [base, boxes, corner], [boxes, corner, box_picker])
        run.click(
            run_ui,
            [
                kind,
                name,
                weights,
                alpha,
                editor,
                mask_files,
                boxes,
                prompts,
                templates,
                iterations,
                lr,
                strategy,
                layers,
                explainer,
                methods,
            ],
            [status, table, overlays, loss, maps, compare, downloads, command],
            concurrency_limit=1,  # one model, one run at a time; other requests keep being served
        )
    return app


def _parse_layers(text: str) -> list[int]:
    try:
        layers = [int(p) for p in str(text).replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"LeGrad layers must be integers separated by commas, got {text!r}") from None
    if not layers:
        raise ValueError("give at least one LeGrad layer (-1 is the last block)")
    return layers


def _present(spec: core.ModelSpec, settings: core.RunSettings, result: core.RunResult):
    regions = result.region_names
    if result.probabilities is not None:
        table = pd.DataFrame(result.probabilities.astype(float).round(4), columns=settings.prompts)
        table.insert(0, "best prompt", [settings.prompts[i] for i in result.probabilities.argmax(1)])
        table.insert(0, "region", regions)
    else:
        table = pd.DataFrame({"region": regions, "final Dice loss": [round(v, 4) for v in result.mask_loss]})
    loss = pd.DataFrame({"step": list(range(len(result.loss_history))), "loss": result.loss_history})
    compare = None
    if result.methods_table:
        compare = pd.DataFrame(
            result.methods_table, columns=["region", "method", "best prompt", "p(best)", *settings.prompts]
        )
    warning = " **Random weights: maps and probabilities are meaningless.**" if spec.random else ""
    status = (
        f"**Done** in {result.seconds:.1f} s: {len(regions)} regions, strategy `{result.strategy}`, "
        f"{settings.iterations} iterations, loss {result.loss_history[0]:.3f} -> {result.loss_history[-1]:.3f}. "
        f"Model: {spec.label()}.{warning}"
    )
    files = [str(p) for p in (result.embeddings, result.manifest, result.archive) if p is not None]
    return (
        status,
        table,
        [(str(p), c) for p, c in result.overlays],
        loss,
        [(str(p), c) for p, c in result.explainer_maps] or None,
        compare,
        files,
        result.command,
    )


def launch(app: gr.Blocks, state: DemoState, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> None:
    """Serve ``app`` on a loopback address with the queue on; ``block=False`` returns once the server is up."""
    if host not in LOOPBACK:
        raise ValueError(f"the demo binds to a loopback address only ({', '.join(LOOPBACK)}), got --host {host}")
    app.queue(default_concurrency_limit=1)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace"])
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=not block,
        allowed_paths=[str(state.output)],
        ssr_mode=False,
        quiet=True,
        theme=theme,  # system fonts: the default theme fetches web fonts from the internet
        footer_links=[],
    )
