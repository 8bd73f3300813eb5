"""The browser demo's computation (regionembed.demo.core) without a browser: regions, results, files, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from regionembed.backbones.weights import PretrainedWeightsUnavailable
from regionembed.demo import core

REPO = Path(__file__).resolve().parents[2]
TINY = core.ModelSpec("re-tiny-vit")


@pytest.fixture
def scene(tmp_path):
    """A 96x80 image, an RGBA brush layer over its left part, an empty layer, and a grey mask file."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
    layer = np.zeros((80, 96, 4), np.uint8)
    layer[10:40, 5:30] = (255, 0, 0, 255)
    empty = Image.fromarray(np.zeros((80, 96, 4), np.uint8), "RGBA")
    mask = np.zeros((80, 96), np.uint8)
    mask[40:70, 50:90] = 255
    Image.fromarray(mask).save(tmp_path / "upload.png")
    return image, [Image.fromarray(layer, "RGBA"), empty], [tmp_path / "upload.png"]


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_run_brush_upload_and_boxes(tmp_path, scene):
    image, layers, uploads = scene
    before = _files_under(tmp_path)
    steps = []
    settings = core.RunSettings(
        prompts=["a cat", "a dog"], templates=["{}", "a photo of {}."], iterations=4, explainer="VL-Score",
        methods=list(core.METHODS),
    )  # fmt: skip
    result = core.run(
        TINY, tmp_path / "run", image, settings, brush_layers=layers, mask_files=uploads, boxes="60 2 90 20",
        progress=lambda step, total, msg: steps.append((step, total)),
    )  # fmt: skip
    assert result.region_names == ["brush_1", "upload", "box_1"]  # the empty layer is not a region
    assert [s for s, _ in steps[: settings.iterations + 1]] == list(range(settings.iterations + 1))
    assert len(result.loss_history) == settings.iterations + 1
    assert result.probabilities.shape == (3, 2)
    np.testing.assert_allclose(result.probabilities.sum(1), 1, atol=1e-5)

    # the files are the CLI's: embeddings in row order of the regions, a manifest, overlays; a zip of the run
    with safe_open(result.embeddings, "pt") as fh:
        assert json.loads(fh.metadata()["mask_names"]) == result.region_names
        assert tuple(fh.get_tensor("maps").shape) == (3, 80, 96)
    manifest = json.loads(result.manifest.read_text())
    assert manifest["strategy"] == result.strategy and manifest["prompts"] == ["a cat", "a dog"]
    for path, caption in result.overlays:
        assert Image.open(path).size == (96, 80) and "Dice loss" in caption
    assert len(result.explainer_maps) == 2
    assert all(c.endswith("(present)") or c.endswith("(not present)") for _, c in result.explainer_maps)
    painted = np.asarray(Image.open(tmp_path / "run" / "inputs" / "masks" / "brush_1.png"))
    assert painted[10:40, 5:30].min() == 255 and painted.sum() == 255 * 30 * 25

    # region methods: the mask_inversion rows are the run's own probabilities; no alpha rows without alpha channel
    rows = {(r[0], r[1]): r[4:] for r in result.methods_table}
    assert {m for _, m in rows} == {"global", "crop", "masked_crop_grey", "masked_crop_blur", "red_circle",
                                    "mask_inversion"}  # fmt: skip
    for i, region in enumerate(result.region_names):
        np.testing.assert_allclose(rows[(region, "mask_inversion")], result.probabilities[i], atol=1e-4)
    assert "regionembed-infer single" in result.command and "--prompts 'a cat' 'a dog'" in result.command

    # nothing outside the run folder and its zip
    written = _files_under(tmp_path) - before
    assert written and all(p == result.archive or (tmp_path / "run") in p.parents for p in written)


def _grey(tmp_path: Path, name: str, array: np.ndarray) -> Path:
    Image.fromarray(array).save(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty_mask", "is empty (all zeros)"),
        ("other_size", "is 40x30 but its image is 96x80"),
        ("not_a_mask", "cannot read mask"),
        ("no_regions", "no regions"),
        ("bad_box", "expected four numbers"),
        ("box_outside", "leaves the 96x80 image"),
        ("template", "placeholder"),
    ],
)
def test_bad_input_gets_the_clis_error(tmp_path, scene, case, message):
    image, _, _ = scene
    uploads, boxes, templates = [], None, ["{}"]
    if case == "empty_mask":
        uploads = [_grey(tmp_path, "empty.png", np.zeros((80, 96), np.uint8))]
    elif case == "other_size":
        uploads = [_grey(tmp_path, "small.png", np.full((30, 40), 255, np.uint8))]
    elif case == "not_a_mask":
        (tmp_path / "notes.png").write_text("not a png")
        uploads = [tmp_path / "notes.png"]
    elif case == "bad_box":
        boxes = "1 2 three 4"
    elif case == "box_outside":
        boxes = "10 10 200 20"
    elif case == "template":
        boxes, templates = "1 1 20 20", ["a photo"]
    settings = core.RunSettings(prompts=["x"], templates=templates, iterations=1)
    with pytest.raises(ValueError, match=re.escape(message)):
        core.run(TINY, tmp_path / "run", image, settings, mask_files=uploads, boxes=boxes)


def test_missing_weights_and_offline_hub_fail_fast(tmp_path, monkeypatch):
    with pytest.raises(PretrainedWeightsUnavailable, match="pretrained weights file not found"):
        core.load_model(core.ModelSpec("re-tiny-vit", str(tmp_path / "missing.safetensors")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsUnavailable, match="Hugging Face hub"):
        core.load_model(core.ModelSpec("ViT-B-16", "openai"))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        core.load_model(core.ModelSpec("no-such-model", None))


def test_project_model_is_never_trained_by_the_demo(monkeypatch):
    """``regionembed:clip_synthetic`` loads the weights shipped in the package; nothing trains."""
    import regionembed.zoo as zoo

    def no_training(*args, **kwargs):
        raise AssertionError("the demo started a training run")

    monkeypatch.setattr(zoo, "retrain", no_training)
    entry = zoo.MODELS["clip_synthetic"]
    backbone = core.load_model(core.ModelSpec(entry.model_name, "regionembed:clip_synthetic"))
    assert backbone.weights == "regionembed:clip_synthetic" and backbone.model_name == entry.model_name


def test_region_methods_get_the_readers_masks(tmp_path, scene, monkeypatch):
    """The methods table embeds the regions from the masks the CLI's reader gives at the model input (0/1, nearest),
    the masks region classification hands to the same methods; not soft masks of the demo's own."""
    from regionembed.data.folder import ImageMaskDataset

    seen = []

    def spy(backbone, image, masks):
        seen.append(masks.detach().cpu().clone())
        return torch.nn.functional.normalize(torch.randn(masks.shape[0], backbone.embed_dim), dim=-1)

    monkeypatch.setitem(core.METHODS, "crop", lambda: spy)
    image, layers, uploads = scene
    settings = core.RunSettings(prompts=["a cat", "a dog"], iterations=1, explainer=None, methods=["crop"])
    result = core.run(TINY, tmp_path / "run", image, settings, brush_layers=layers, mask_files=uploads)
    inputs = tmp_path / "run" / "inputs"
    masks = [inputs / "masks" / f"{name}.png" for name in result.region_names]
    reader = ImageMaskDataset([(inputs / "image.png", masks)], core.load_model(TINY).preprocess)[0]
    assert len(seen) == 1 and torch.equal(seen[0], reader["masks"].float())
    assert set(seen[0].unique().tolist()) == {0.0, 1.0}


def test_a_region_that_vanishes_at_the_model_input_keeps_the_run(tmp_path):
    """A 2x2 region of a 512x512 image is empty at the tiny model's 32x32 input: the region methods give it a row
    saying so (the reader keeps it, unlike region classification's transform), MaskInversion still fits it."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (512, 512, 3), dtype=np.uint8))
    big, small = np.zeros((512, 512), np.uint8), np.zeros((512, 512), np.uint8)
    big[100:300, 100:300], small[401:403, 401:403] = 255, 255
    uploads = [_grey(tmp_path, "big.png", big), _grey(tmp_path, "small.png", small)]
    settings = core.RunSettings(prompts=["a", "b"], iterations=1, explainer=None, methods=["crop", "mask_inversion"])
    result = core.run(TINY, tmp_path / "run", image, settings, mask_files=uploads)
    rows = {(r[0], r[1]): r for r in result.methods_table}
    assert rows[("small", "crop")][2:] == [core.VANISHED, None, None, None]
    assert rows[("big", "crop")][2] in ("a", "b") and rows[("small", "mask_inversion")][2] in ("a", "b")
    np.testing.assert_allclose(rows[("small", "mask_inversion")][4:], result.probabilities[1], atol=1e-4)


def test_alpha_methods_only_with_an_alpha_channel(tiny_backbone):
    from regionembed.backbones import OpenCLIPBackbone

    torch.manual_seed(0)
    alpha = OpenCLIPBackbone("re-tiny-vit", alpha_channel=True).requires_grad_(False)
    image = torch.randn(3, 32, 32)
    masks = torch.zeros(2, 32, 32)
    masks[0, 5:20, 5:20] = 1
    masks[1, 20:30, 10:28] = 1
    text = torch.nn.functional.normalize(torch.randn(3, alpha.embed_dim), dim=-1)
    inversion = torch.randn(2, alpha.embed_dim)
    methods = ["global", "alpha_mask", "alpha_box", "mask_inversion"]
    rows = core.compare_methods(alpha, image, masks, ["a", "b"], text, ["p", "q", "r"], methods, inversion)
    assert [(r[0], r[1]) for r in rows] == [(n, m) for n in ("a", "b") for m in methods]
    rows = core.compare_methods(tiny_backbone, image, masks, ["a", "b"], text, ["p", "q", "r"], methods, inversion)
    assert {r[1] for r in rows} == {"global", "mask_inversion"}


@pytest.fixture
def gradio_in_tmp(tmp_path, monkeypatch):
    """Gradio reads its temporary folder at import time in places (the demo's CLI sets it before importing); keep
    all of it under tmp_path."""
    pytest.importorskip("gradio")
    import gradio.route_utils
    import gradio.routes

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    for module in (gradio.routes, gradio.route_utils):
        monkeypatch.setattr(module, "DEFAULT_TEMP_DIR", str(tmp_path / "gradio"))


def test_app_refuses_non_loopback_hosts(tmp_path, gradio_in_tmp):
    pytest.importorskip("gradio")
    from regionembed.demo.app import TINY as TINY_CHOICE
    from regionembed.demo.app import DemoState, build_app, launch, model_spec

    state = DemoState(tmp_path / "out")
    app = build_app(state, TINY_CHOICE)
    with pytest.raises(ValueError, match="loopback"):
        launch(app, state, host="0.0.0.0", port=1, block=False)
    assert model_spec(TINY_CHOICE) == TINY
    with pytest.raises(ValueError, match="enter a model name"):
        model_spec("open_clip model + local weights file or hub tag", "", "x.safetensors")


def test_a_long_run_does_not_block_other_requests(tmp_path, monkeypatch, gradio_in_tmp):
    """Runs go through the queue: while one is busy, other requests (here: loading a model) are answered."""
    pytest.importorskip("gradio")
    import socket
    import time

    from gradio_client import Client

    from regionembed.demo import app as demo_app

    def slow_spec(*args):  # a stand-in for long work: the run handler's first call
        time.sleep(5)
        raise ValueError("stand-in for a long run")

    monkeypatch.setattr(demo_app, "model_spec", slow_spec)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    state = demo_app.DemoState(tmp_path / "out")
    app = demo_app.build_app(state, demo_app.TINY)
    demo_app.launch(app, state, port=port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path / "client"))
        args = [demo_app.TINY, "", "", "", None, [], "", "a", "{}", 1, 0.5, "auto", "-1", "LeGrad", []]
        start = time.monotonic()
        job = client.submit(*args, api_name="/run_ui")
        time.sleep(0.5)
        client.predict(2, api_name="/new_scene")  # another request while the run is busy
        answered = time.monotonic() - start
        assert not job.done() and answered < 4, answered
        assert "stand-in for a long run" in job.result()[0]  # the run's error, shown in the page's status
        assert time.monotonic() - start >= 5
    finally:
        app.close()
