"""The standing bad-input suite: every class of bad input, through the CLI (``infer.py``/``train.py``, in-process) and
the Python API, with the exact behaviour asserted (an error naming the file or setting, or the correct output).

Sections: names that could escape the output folder; runs that must never mix (resume, re-runs, concurrent runs);
inputs that were silently dropped or misread; messages naming the problem; inputs handled before (kept here so they
stay handled).
"""

import json
import logging
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from regionembed.backbones import OpenCLIPBackbone
from regionembed.backbones.weights import PretrainedWeightsUnavailable, load_lightning_backbone_state, weights_error
from regionembed.callbacks import InversionWriter
from regionembed.cli import infer_main, train_main
from regionembed.data import RegionFolderDataModule
from regionembed.data.folder import scan_folder
from regionembed.data.refcoco import load_refs
from regionembed.explainers import LeGrad
from regionembed.inversion import MaskInversion
from regionembed.io import load_image, load_mask
from regionembed.modules import MaskInversionModule
from regionembed.outputs import OutputLock
from regionembed.text import encode_prompts

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "infer" / "maskinversion.yaml")
TINY = str(ROOT / "configs" / "backbone" / "tiny.yaml")
FAST = ["--model.init_args.solver.init_args.iterations=2", "--trainer.enable_progress_bar=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
# the test helpers (callbacks) importable, and whatever PYTHONPATH selected this checkout's package kept
HELPERS_ENV = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}


# ------------------------------------------------------------------------------------------------ helpers
def _image(path: Path, h: int = 40, w: int = 56, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"  # names like "...png" have no suffix
    Image.fromarray(rgb).save(path, format=fmt)
    return path


def _mask(path: Path, h: int = 40, w: int = 56, box=(5, 20, 10, 30), value: int = 255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((h, w), np.uint8)
    m[box[0] : box[1], box[2] : box[3]] = value
    img = Image.fromarray(m)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, format="JPEG", quality=100)
    elif path.suffix.lower() in (".tif", ".tiff"):
        img.save(path, format="TIFF")
    else:
        img.save(path, format="PNG")
    return path


def _folder(root: Path, images: dict[str, list[str]]) -> Path:
    """``images``: image file name -> mask file names."""
    for i, (name, masks) in enumerate(images.items()):
        _image(root / "images" / name, seed=i)
        for j, m in enumerate(masks):
            _mask(root / "masks" / Path(name).stem / m, box=(2 + 3 * j, 20 + 3 * j, 4 + 2 * j, 30))
    return root


def _predict(*args: str):
    return infer_main(["predict", f"--config={CONFIG}", f"--model.init_args.backbone={TINY}", *FAST, *args])


def _predict_image(image: Path, masks: list[Path], out: Path, *args: str):
    """What ``infer.py single IMAGE MASK... --output OUT`` runs."""
    return _predict(
        "--data=regionembed.data.RegionFolderDataModule",
        "--data.root=null",
        f"--data.image={image}",
        f"--data.masks={json.dumps([str(m) for m in masks])}",
        f"--writer.output_dir={out}",
        *args,
    )


def _cli_error(capsys, fn, *args, **kwargs) -> str:
    """Run a CLI call that must stop with exit status 2 and one ``error:`` line; return that line."""
    with pytest.raises(SystemExit) as exc:
        fn(*args, **kwargs)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _writer(cli) -> InversionWriter:
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, InversionWriter))


def _image_dirs(out: Path) -> list[str]:
    """The image folders of an output folder (not the lock, staging leftovers or a saved run config)."""
    return sorted(p.name for p in out.iterdir() if p.is_dir() and p.name[0] != ".")


def _tree(root: Path) -> dict[str, bytes]:
    """Every file of every image folder, by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for d in _image_dirs(root)
        for p in sorted((root / d).rglob("*"))
        if p.is_file()
    }


def _regions(folder: Path) -> list[str]:
    return [r["name"] for r in json.loads((folder / "manifest.json").read_text())["regions"]]


# ------------------------------------------------------------------------- 1. names that could escape
def test_image_named_dots_writes_inside_the_output_folder(tmp_path):
    image = _image(tmp_path / "data" / "...png")  # image id ".."
    mask = _mask(tmp_path / "data" / "m.png")
    out = tmp_path / "out" / "x"
    _predict_image(image, [mask], out)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x"]  # nothing beside x
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert folder.name != ".." and json.loads((folder / "manifest.json").read_text())["image_id"] == ".."
    assert (folder / "embeddings.safetensors").is_file() and (folder / "overlays" / "m.png").is_file()


def test_single_form_with_an_image_named_dots(tmp_path):
    """The issue's command: ``infer.py single "<dir>/...png" mask.png --output out/x``."""
    image = _image(tmp_path / "data" / "...png")
    mask = _mask(tmp_path / "data" / "mask.png")
    out = tmp_path / "out" / "x"
    infer_main(
        [
            "single",
            str(image),
            str(mask),
            "--output",
            str(out),
            "--config",
            CONFIG,
            f"--model.init_args.backbone={TINY}",
            *FAST,
        ]
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x"]
    assert [json.loads((out / d / "manifest.json").read_text())["image_id"] for d in _image_dirs(out)] == [".."]


def test_image_named_dot_png_writes_inside_the_output_folder(tmp_path):
    image = _image(tmp_path / "data" / "..png")  # image id "."
    out = tmp_path / "out"
    _predict_image(image, [_mask(tmp_path / "data" / "m.png")], out)
    assert not (out / "manifest.json").exists() and not (out / "embeddings.safetensors").exists()
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert json.loads((folder / "manifest.json").read_text())["image_id"] == "."


def test_folder_image_whose_id_is_a_dot_never_reads_outside_its_mask_folder(tmp_path, caplog):
    root = _folder(tmp_path / "regions", {"ok.png": ["a.png"]})
    _image(root / "images" / "..png")
    _mask(root / "masks" / "stray.png")  # what the old code read as the masks of "..png"
    with pytest.raises(ValueError, match=r"no image's mask folder.*\['stray\.png'\]"):
        scan_folder(root)
    (root / "masks" / "stray.png").unlink()
    with caplog.at_level(logging.WARNING):
        assert [(i.name, [m.name for m in ms]) for i, ms in scan_folder(root)] == [("ok.png", ["a.png"])]
    assert "..png" in caplog.text  # hidden file: reported, not read
    out = tmp_path / "out"
    _predict(f"--data.root={root}", f"--writer.output_dir={out}")
    assert _image_dirs(out) == ["ok"]


def test_image_ids_differing_only_in_case_are_refused(tmp_path):
    root = _folder(tmp_path / "regions", {"Cat.png": ["a.png"], "cat.jpg": ["a.png"]})
    with pytest.raises(ValueError, match=r"differ only in case.*Cat\.png.*cat\.jpg"):
        scan_folder(root)


def test_region_names_that_are_paths_stay_inside(tmp_path):
    image = _image(tmp_path / "data" / "img.png")
    masks = [_mask(tmp_path / "data" / n) for n in ("CON.png", "Cat.png", "cat.PNG", "~.png")]
    out = tmp_path / "out"
    _predict_image(image, masks, out)
    folder = out / "img"
    assert _regions(folder) == ["CON", "Cat", "cat", "~"]
    overlays = json.loads((folder / "manifest.json").read_text())["files"]["overlays"]
    assert len({v.casefold() for v in overlays.values()}) == 4
    assert all((folder / v).is_file() for v in overlays.values())
    assert overlays["Cat"] != "overlays/Cat.png" and "CON" not in overlays["CON"].split("/")[1].split("~")[1:]


# ---------------------------------------------------------------------------- 2. runs never mix
def test_resume_computes_only_missing_images_and_matches_a_straight_run(tmp_path):
    root = _folder(tmp_path / "regions", {f"img{i}.png": ["cat.png", "dog.png"] for i in range(4)})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli = _predict(f"--data.root={root}", f"--writer.output_dir={straight}")
    assert (_writer(cli).written, _writer(cli).skipped) == (4, 0)
    good = (root / "images" / "img2.png").read_bytes()
    (root / "images" / "img2.png").write_bytes(good[: len(good) // 3])  # the run dies at img2
    with pytest.raises(ValueError, match=r"img2\.png"):
        _predict(f"--data.root={root}", f"--writer.output_dir={resumed}")
    assert _image_dirs(resumed) == ["img0", "img1"]
    inodes = {n: (resumed / n).stat().st_ino for n in ("img0", "img1")}
    (root / "images" / "img2.png").write_bytes(good)
    cli = _predict(f"--data.root={root}", f"--writer.output_dir={resumed}")
    assert (_writer(cli).written, _writer(cli).skipped) == (2, 2)  # only the missing images were computed
    assert {n: (resumed / n).stat().st_ino for n in ("img0", "img1")} == inodes
    assert _tree(resumed) == _tree(straight)  # byte-identical to the straight run
    cli = _predict(f"--data.root={root}", f"--writer.output_dir={resumed}", "--writer.overwrite=true")
    assert (_writer(cli).written, _writer(cli).skipped) == (4, 0)
    assert _tree(resumed) == _tree(straight)


def test_changed_settings_recompute(tmp_path):
    root = _folder(tmp_path / "regions", {"img0.png": ["cat.png"]})
    out = tmp_path / "out"
    _predict(f"--data.root={root}", f"--writer.output_dir={out}")
    cli = _predict(f"--data.root={root}", f"--writer.output_dir={out}", "--model.init_args.solver.init_args.lr=0.25")
    assert _writer(cli).written == 1
    cli = _predict(f"--data.root={root}", f"--writer.output_dir={out}", "--writer.overlays=false")
    assert _writer(cli).written == 1 and not (out / "img0" / "overlays").exists()


def test_rerun_with_changed_masks_replaces_the_folder_whole(tmp_path):
    root = _folder(tmp_path / "regions", {"img0.png": ["cat.png", "cat2.png", "dog.png"]})
    out = tmp_path / "out"
    _predict(f"--data.root={root}", f"--writer.output_dir={out}")
    (root / "masks" / "img0" / "cat2.png").unlink()
    _mask(root / "masks" / "img0" / "cat.png", box=(1, 9, 1, 9))  # changed bytes
    cli = _predict(f"--data.root={root}", f"--writer.output_dir={out}")
    assert _writer(cli).written == 1
    folder = out / "img0"
    assert _regions(folder) == ["cat", "dog"]
    assert sorted(p.name for p in (folder / "overlays").iterdir()) == ["cat.png", "dog.png"]
    with safe_open(str(folder / "embeddings.safetensors"), "pt") as f:
        assert f.get_tensor("embeddings").shape[0] == 2
        assert f.metadata()["key"] == json.loads((folder / "manifest.json").read_text())["key"]


def test_rerun_killed_before_the_swap_leaves_the_previous_folder(tmp_path, monkeypatch):
    root = _folder(tmp_path / "regions", {"img0.png": ["x.png", "y.png", "z.png"]})
    out = tmp_path / "out"
    _predict(f"--data.root={root}", f"--writer.output_dir={out}")
    before = _tree(out)
    (root / "masks" / "img0" / "y.png").unlink()
    (root / "masks" / "img0" / "z.png").unlink()

    def killed(*args, **kwargs):
        raise RuntimeError("killed")  # the process dies while staging the new folder

    monkeypatch.setattr("regionembed.callbacks.writer.save_json", killed)
    with pytest.raises(RuntimeError, match="killed"):
        _predict(f"--data.root={root}", f"--writer.output_dir={out}")
    assert _tree(out) == before  # img0 still holds the complete previous result: 3 regions everywhere
    assert _regions(out / "img0") == ["x", "y", "z"]


def test_a_second_run_into_a_busy_output_folder_is_refused(tmp_path):
    root = _folder(tmp_path / "regions", {"img0.png": ["cat.png"]})
    out = tmp_path / "out"
    with OutputLock(out), pytest.raises(RuntimeError, match=r"in use by another run"):
        _predict(f"--data.root={root}", f"--writer.output_dir={out}")
    assert not (out / "img0").exists()
    _predict(f"--data.root={root}", f"--writer.output_dir={out}")  # free once the other run ends
    assert _regions(out / "img0") == ["cat"]


def _infer_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "infer.py"),
        "predict",
        f"--config={CONFIG}",
        f"--model.init_args.backbone={TINY}",
        f"--data.root={root}",
        f"--writer.output_dir={out}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def test_sigkill_mid_run_then_resume(tmp_path):
    root = _folder(tmp_path / "regions", {f"img{i:02d}.png": ["cat.png", "dog.png"] for i in range(6)})
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = HELPERS_ENV
    subprocess.run(_infer_cmd(root, straight), env=env, cwd=tmp_path, check=True, capture_output=True)
    kill = ["--trainer.callbacks+=helpers.callbacks.KillAtPredictBatch", "--trainer.callbacks.batch=4"]
    proc = subprocess.run(_infer_cmd(root, killed, *kill), env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == -9
    assert _image_dirs(killed) == [f"img{i:02d}" for i in range(4)]
    proc = subprocess.run(_infer_cmd(root, killed), env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 image(s) written, 4 already up to date" in proc.stderr + proc.stdout  # only the missing ones
    assert _tree(killed) == _tree(straight)  # byte-identical to a straight run
    assert sorted(p.name for p in killed.iterdir() if p.name[0] == ".") == [".regionembed.lock"]


@pytest.mark.slow
def test_two_concurrent_runs_never_interleave(tmp_path):
    root = _folder(tmp_path / "regions", {f"img{i}.png": ["cat.png", "dog.png"] for i in range(8)})
    other = _folder(tmp_path / "other", {f"img{i}.png": ["x.png", "y.png", "z.png"] for i in range(8)})
    out = tmp_path / "out"
    env = HELPERS_ENV
    slow = ["--trainer.callbacks+=helpers.callbacks.SlowPredict", "--trainer.callbacks.seconds=4"]
    first = subprocess.Popen(_infer_cmd(root, out, *slow), env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*/manifest.json")):
        time.sleep(0.05)
    second = subprocess.run(_infer_cmd(other, out), env=env, cwd=tmp_path, capture_output=True, text=True)
    assert first.poll() is None, "the first run ended before the second started: no overlap was tested"
    first.communicate()
    assert first.returncode == 0
    assert second.returncode != 0 and "in use by another run" in second.stderr
    for i in range(8):
        folder = out / f"img{i}"
        with safe_open(str(folder / "embeddings.safetensors"), "pt") as f:
            assert json.loads(f.metadata()["mask_names"]) == _regions(folder) == ["cat", "dog"]


# ------------------------------------------------------------------ 3. inputs dropped or misread
def test_masks_of_any_image_suffix_and_case_are_used(tmp_path):
    root = _folder(tmp_path / "regions", {"img0.png": ["a.PNG", "b.jpg", "c.Tif", "d.png"]})
    out = tmp_path / "out"
    _predict(f"--data.root={root}", f"--writer.output_dir={out}")
    assert _regions(out / "img0") == ["a", "b", "c", "d"]


def test_files_that_are_not_masks_are_named(tmp_path):
    root = _folder(tmp_path / "regions", {"img0.png": ["cat.png"]})
    (root / "masks" / "img0" / "notes.txt").write_text("x")
    (root / "masks" / "img0" / "cat.heic").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\['cat.heic', 'notes.txt'\]"):
        _predict(f"--data.root={root}", f"--writer.output_dir={tmp_path / 'out'}")
    (root / "masks" / "img0" / "notes.txt").unlink()
    (root / "masks" / "img0" / "cat.heic").unlink()
    (root / "images" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match=r"\['readme.md'\]"):
        scan_folder(root)


def test_hidden_files_are_reported_not_dropped_silently(tmp_path, caplog):
    root = _folder(tmp_path / "regions", {"img0.png": ["cat.png"]})
    (root / "masks" / "img0" / ".DS_Store").write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        assert [m.name for m in scan_folder(root)[0][1]] == ["cat.png"]
    assert ".DS_Store" in caplog.text


def test_masks_sharing_a_name_and_orphan_mask_folders_are_refused(tmp_path):
    root = _folder(tmp_path / "regions", {"img0.png": ["cat.png", "cat.jpg"]})
    with pytest.raises(ValueError, match=r"different suffixes.*\['cat'\]"):
        scan_folder(root)
    (root / "masks" / "img0" / "cat.jpg").unlink()
    _mask(root / "masks" / "img9" / "x.png")
    with pytest.raises(ValueError, match=r"no image's mask folder.*\['img9'\]"):
        scan_folder(root)


def test_palette_masks_are_read_by_colour(tmp_path):
    m = np.zeros((40, 56), np.uint8)
    m[5:20, 10:30] = 255
    pal = Image.fromarray(np.stack([m] * 3, -1)).convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    assert pal.getpalette()[:3] == [255, 255, 255]  # PIL's adaptive palette: white at index 0
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "pal.png"), (m > 0).astype(np.float32))
    # through the CLI: the same region as the grey mask, hence the same loss
    image = _image(tmp_path / "img.png")
    grey = _mask(tmp_path / "grey.png")
    _predict_image(image, [grey, tmp_path / "pal.png"], tmp_path / "out")
    losses = [r["final_dice_loss"] for r in json.loads((tmp_path / "out/img/manifest.json").read_text())["regions"]]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    # indices whose colours are the same: ambiguous, refused
    amb = Image.fromarray((m > 0).astype(np.uint8), "P")
    amb.putpalette([7, 7, 7, 7, 7, 7])
    amb.save(tmp_path / "amb.png")
    with pytest.raises(ValueError, match=r"amb\.png is a palette image.*ambiguous"):
        load_mask(tmp_path / "amb.png")


def test_sixteen_bit_masks(tmp_path, caplog):
    def save16(values, name):
        arr = np.zeros((6, 8), np.uint16)
        arr[1:4, 2:6] = values
        Image.fromarray(arr).save(tmp_path / name)
        return tmp_path / name

    expected = np.zeros((6, 8), np.float32)
    expected[1:4, 2:6] = 1
    for top in (1, 255, 65535):
        np.testing.assert_array_equal(load_mask(save16(top, f"m{top}.png")), expected)
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(load_mask(save16(1000, "m1000.png")), expected)  # not max 0.015
    assert "m1000.png is a 16-bit mask with values 0/1000" in caplog.text
    soft = np.array([[500, 1000, 1000, 1000]] * 3, np.uint16)
    with pytest.raises(ValueError, match=r"msoft\.png is a 16-bit mask with maximum 1000"):
        load_mask(save16(soft, "msoft.png"))


def test_duplicate_prompts_are_refused(tmp_path, tiny_backbone, capsys):
    with pytest.raises(ValueError, match=r"prompts must be unique.*'a cat'"):
        MaskInversionModule(tiny_backbone, prompts=["a cat", "a dog", "a cat"])
    image, mask = _image(tmp_path / "img.png"), _mask(tmp_path / "m.png")
    line = _cli_error(capsys, _predict_image, image, [mask], tmp_path / "out", '--model.init_args.prompts=["a","a"]')
    assert "prompts must be unique" in line
    assert not (tmp_path / "out" / "img").exists()


def test_overlong_prompts_warn(tiny_backbone, caplog):
    long = " ".join(["word"] * 100)
    with caplog.at_level(logging.WARNING):
        encode_prompts(tiny_backbone, ["a cat", long])
    assert re.search(r"has \d+ tokens, more than the text context of 16: it is truncated", caplog.text)
    assert caplog.text.count("truncated") == 1  # "a cat" is fine


# ------------------------------------------------------------------------ 4. messages naming the problem
@pytest.mark.ddp
def test_predict_with_more_processes_than_images(tmp_path):
    root = _folder(tmp_path / "regions", {"a.png": ["m.png"], "b.png": ["m.png"]})
    out = tmp_path / "out"
    extra = ["--model.init_args.solver.init_args.iterations=2", "--trainer.accelerator=cpu", "--trainer.devices=3"]
    proc = subprocess.run(
        [*_infer_cmd(root, out, *extra), "--trainer.strategy=ddp"],
        env=ENV,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 image(s) over 3 processes: 1 process(es) will idle" in proc.stderr
    assert sorted(json.loads((out / n / "manifest.json").read_text())["rank"] for n in ("a", "b")) == [0, 1]


def test_test_with_more_processes_than_images_stops_with_a_message(tmp_path):
    from types import SimpleNamespace

    root = _folder(tmp_path / "regions", {"a.png": ["m.png"], "b.png": ["m.png"]})
    dm = RegionFolderDataModule(root=str(root))
    dm.preprocess = OpenCLIPBackbone("re-tiny-vit").preprocess
    dm.trainer = SimpleNamespace(world_size=3, global_rank=0)
    with pytest.raises(ValueError, match=r"`test` over 2 image\(s\) cannot use 3 processes.*devices to at most 2"):
        dm.setup("test")


@pytest.fixture
def weights(tmp_path):
    """Corrupt, truncated, malicious and wrong-architecture weight files (the last marks a code execution)."""
    import open_clip
    from safetensors.torch import save_file

    marker = tmp_path / "pwned"
    d = tmp_path / "weights"
    d.mkdir()
    small = open_clip.create_model("re-small-vit").state_dict()
    save_file({k: v.contiguous() for k, v in small.items()}, d / "small.safetensors")
    data = (d / "small.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (d / "random.pt").write_bytes(_GARBAGE[0])
    (d / "empty.bin").write_bytes(b"")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name in ("evil.pt", "evil.bin", "evil.ckpt"):
        torch.save({"state_dict": {"x": Evil()}}, d / name)
    return d, marker


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("truncated.safetensors", "cannot read weights file .*truncated.safetensors: it is corrupt or truncated"),
        ("random.pt", "cannot read weights file .*random.pt"),
        ("empty.bin", "cannot read weights file .*empty.bin"),
        ("evil.pt", r"cannot read weights file .*evil.pt.*GLOBAL posix.system"),
        ("evil.bin", r"cannot read weights file .*evil.bin.*safe loading refuses"),
        ("evil.ckpt", r"cannot read checkpoint .*evil.ckpt"),
        ("small.safetensors", "small.safetensors does not fit the architecture re-tiny-vit"),
    ],
)
def test_bad_weights_name_the_file(weights, name, message, capsys):
    d, marker = weights
    with pytest.raises(PretrainedWeightsUnavailable, match=message) as exc:
        OpenCLIPBackbone("re-tiny-vit", pretrained=str(d / name))
    assert "weights_only=False" not in str(exc.value) and "\n" not in str(exc.value)
    line = _cli_error(
        capsys,
        _predict,
        f"--data.root={d}",
        f"--writer.output_dir={d / 'out'}",
        f"--model.init_args.backbone.init_args.pretrained={d / name}",
    )
    assert name in line
    assert not marker.exists()


# Seeded garbage whose weights-only unpickling fails with other error types than UnpicklingError (IndexError,
# KeyError, UnicodeDecodeError): CI once drew such bytes from os.urandom and got "does not fit the architecture".
_GARBAGE = [random.Random(seed).randbytes(512) for seed in range(200)]


def test_garbage_weights_are_unreadable_whatever_the_unpickler_raises(tmp_path):
    kinds = set()
    for i, blob in enumerate(_GARBAGE):
        path = tmp_path / f"g{i}.pt"
        path.write_bytes(blob)
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            kinds.add(type(err).__name__)
            assert str(weights_error(path, err, "re-tiny-vit")).startswith(f"cannot read weights file {path}")
    assert {"UnpicklingError", "IndexError", "KeyError", "UnicodeDecodeError"} <= kinds  # the test covers them


@pytest.mark.parametrize("zip_format", [True, False])
def test_readable_weights_of_another_model_do_not_fit(tmp_path, zip_format, monkeypatch):
    """The safe re-read that tells unreadable from unfit maps zip checkpoints and falls back for the legacy format."""
    path = tmp_path / "other.pt"
    torch.save({"x": torch.zeros(2)}, path, _use_new_zipfile_serialization=zip_format)
    calls = []
    load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(PretrainedWeightsUnavailable, match=r"other\.pt does not fit the architecture re-tiny-vit"):
        OpenCLIPBackbone("re-tiny-vit", pretrained=str(path))
    rereads = [c for c in calls if c.get("mmap")]  # the re-read maps the file instead of loading it a second time
    assert len(rereads) == 1 and all(c.get("weights_only") for c in calls)


def test_malicious_pickles_never_run(weights, tmp_path):
    d, marker = weights
    with pytest.raises(PretrainedWeightsUnavailable, match=r"evil\.ckpt"):
        load_lightning_backbone_state(str(d / "evil.ckpt"))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "refs.p").write_bytes(pickle.dumps([{"ref_id": 0, "x": Evil()}]))
    with pytest.raises(ValueError, match=r"refs\.p"):
        load_refs(tmp_path / "refs.p")
    assert not marker.exists()


def test_decompression_bomb_names_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 56x40 = 2240 pixels: more than twice the limit
    image = _image(tmp_path / "bomb.png")
    with pytest.raises(ValueError, match=r"image .*bomb\.png is too large to decode safely.*MAX_IMAGE_PIXELS"):
        load_image(image)
    with pytest.raises(ValueError, match=r"mask .*bomb\.png is too large"):
        load_mask(image)
    with pytest.raises(ValueError, match=r"bomb\.png is too large"):
        _predict_image(image, [image], tmp_path / "out")


def test_layers_out_of_range(tmp_path, tiny_backbone, capsys):
    with pytest.raises(ValueError, match=r"layers=\[99\]: layer index 99 is out of range for a model with 2 blocks"):
        MaskInversionModule(tiny_backbone, MaskInversion(LeGrad(layers=[99])))
    image, mask = _image(tmp_path / "img.png"), _mask(tmp_path / "m.png")
    layers = "--model.init_args.solver.init_args.explainer.init_args.layers=[99]"
    line = _cli_error(capsys, _predict_image, image, [mask], tmp_path / "out", layers)
    assert "layers=[99]" in line


def test_invalid_output_is_found_before_the_compute(tmp_path, capsys, monkeypatch):
    built = []
    monkeypatch.setattr(MaskInversionModule, "setup", lambda self, stage: built.append(stage))
    image, mask = _image(tmp_path / "img.png"), _mask(tmp_path / "m.png")
    (tmp_path / "afile").write_text("x")
    for out, why in [(tmp_path / "afile", "exists and is not a folder"), (tmp_path / "afile" / "sub", "cannot be")]:
        line = _cli_error(capsys, _predict_image, image, [mask], out)
        assert "--writer.output_dir" in line and str(out) in line and why in line
    assert not built


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.init_args.lr=0", "lr must be a positive learning rate, got 0"),
        ("--model.init_args.lr=-1e-3", "lr must be a positive learning rate"),
        ("--model.init_args.warmup_steps=-5", "warmup_steps must be >= 0, got -5"),
    ],
)
def test_training_settings_that_train_nothing_are_refused(tmp_path, override, message, capsys):
    config = ROOT / "configs" / "tests" / "tiny_clip.yaml"
    line = _cli_error(
        capsys, train_main, ["fit", f"--config={config}", f"--trainer.default_root_dir={tmp_path}", override]
    )
    assert message in line


def test_training_modules_refuse_bad_optimizer_settings(tiny_backbone):
    from regionembed.modules import AlphaCLIPModule, ComposedRetrievalModule, ContrastiveModule

    with pytest.raises(ValueError, match="lr must be a positive learning rate, got 0"):
        ContrastiveModule(tiny_backbone, lr=0)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        ContrastiveModule(tiny_backbone, warmup_steps=-1)
    with pytest.raises(ValueError, match="lr_alpha must be a positive"):
        AlphaCLIPModule(OpenCLIPBackbone("re-tiny-vit"), lr_alpha=0.0)
    with pytest.raises(ValueError, match="combiner_lr must be a positive"):
        ComposedRetrievalModule(tiny_backbone, combiner_lr=0.0)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        ComposedRetrievalModule(tiny_backbone, warmup_steps=-2)


# ----------------------------------------------------------------------- 5. handled before, kept handled
def test_wrong_size_and_empty_masks_name_the_file(tmp_path):
    image = _image(tmp_path / "img.png")
    small = _mask(tmp_path / "small.png", h=5, w=5, box=(0, 5, 0, 5))
    empty = _mask(tmp_path / "empty.png", value=0)
    with pytest.raises(ValueError, match=r"small\.png is 5x5 but its image is 56x40"):
        _predict_image(image, [small], tmp_path / "out")
    with pytest.raises(ValueError, match=r"empty\.png is empty"):
        _predict_image(image, [empty], tmp_path / "out")
    assert not list((tmp_path / "out").glob("*/manifest.json"))


@pytest.mark.parametrize("kind", ["truncated", "zero-byte", "text"])
def test_unreadable_images_name_the_file(tmp_path, kind):
    image = _image(tmp_path / "img.png")
    data = image.read_bytes()
    bad = {"truncated": data[: len(data) // 2], "zero-byte": b"", "text": b"hello, I am not a PNG\n"}[kind]
    image.write_bytes(bad)
    with pytest.raises(ValueError, match=r"cannot read image .*img\.png"):
        load_image(image)
    with pytest.raises(ValueError, match=r"cannot read image .*img\.png"):
        _predict_image(image, [_mask(tmp_path / "m.png")], tmp_path / "out")


def test_cmyk_images_work(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert load_image(tmp_path / "cmyk.jpg").mode == "RGB"
    _predict_image(tmp_path / "cmyk.jpg", [_mask(tmp_path / "m.png")], tmp_path / "out")
    assert _regions(tmp_path / "out" / "cmyk") == ["m"]


def test_large_images_work(tmp_path):
    h, w = 4000, 6000
    Image.new("RGB", (w, h), (40, 90, 160)).save(tmp_path / "big.png")
    _mask(tmp_path / "m.png", h=h, w=w, box=(1000, 3000, 2000, 5000))
    _predict_image(tmp_path / "big.png", [tmp_path / "m.png"], tmp_path / "out", "--writer.overlays=false")
    with safe_open(str(tmp_path / "out" / "big" / "embeddings.safetensors"), "pt") as f:
        assert tuple(f.get_slice("maps").get_shape()) == (1, h, w)


def test_nothing_is_written_outside_the_output_folder(tmp_path):
    """Across a normal run: the only new files are under the output folder (and the saved config in the cwd)."""
    root = _folder(tmp_path / "regions", {"img0.png": ["a.png", "b.png"]})
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    _predict(f"--data.root={root}", f"--writer.output_dir={out}")
    new = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert {p for p in new if out not in p.parents} <= {tmp_path / "config.yaml"}
    shutil.rmtree(out)
