"""Safe output names, staged image folders, run keys and the output lock (regionembed.outputs, write_inversion)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from regionembed import outputs
from regionembed.callbacks.writer import FORMAT_VERSION, image_folder, is_up_to_date, write_inversion
from regionembed.outputs import (
    ConcurrentWriteError,
    OutputLock,
    OutputLockedError,
    clean_stale_staging,
    fingerprint_inputs,
    safe_filename,
    safe_filenames,
    write_staged_folder,
)

HOSTILE = [
    ".",
    "..",
    "../../evil",
    "..\\..\\evil",
    "/etc/passwd",
    "C:\\Windows\\x",
    "~",
    "~/x",
    "a\x00b",
    "CON",
    "nul.txt",
    "com1",
    "Lpt9.png",
    ".hidden",
    "-rf",
    "trailing.",
    "trailing ",
    "",
    "ümlaut",
    "a/b",
    "x" * 300,
]


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_plain_names_are_kept():
    for name in ["cat", "img_001", "A.B-c d", "0", "region.v2"]:
        assert safe_filename(name) == name


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_become_one_portable_component(name):
    out = safe_filename(name)
    assert out not in ("", ".", "..") and not out.startswith((".", "-", "~"))
    assert not any(c in out for c in "/\\\x00:") and len(out) <= 100
    assert out.split(".")[0].upper() not in outputs._WINDOWS_RESERVED
    assert Path(out).name == out and (Path("/root") / out).parent == Path("/root")
    assert safe_filename(name) == out  # deterministic: a re-run finds the same folder


def test_encoded_names_stay_distinct():
    encoded = [safe_filename(n) for n in HOSTILE]
    assert len(set(encoded)) == len(HOSTILE)
    assert len({e.casefold() for e in encoded}) == len(HOSTILE)


def test_names_differing_only_in_case_get_distinct_files():
    out = safe_filenames(["Cat", "cat", "dog"])
    assert out[2] == "dog"
    assert len({o.casefold() for o in out}) == 3
    with pytest.raises(ValueError, match=r"more than once.*'cat'"):
        safe_filenames(["cat", "cat"])


def _result(image_path: Path | None, names: list[str], h: int = 12, w: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = len(names)
    masks = torch.zeros(n, h, w)
    masks[:, 2:8, 3:9] = 1
    return {
        "image_id": image_path.stem if image_path else "img",
        "image_path": str(image_path) if image_path else None,
        "mask_names": names,
        "embeddings": torch.randn(n, 8, generator=g),
        "image_embedding": torch.randn(1, 8, generator=g),
        "maps": torch.rand(n, h, w, generator=g),
        "loss_history": torch.tensor([0.9, 0.5]),
        "mask_loss": torch.full((n,), 0.5),
        "strategy": "naive",
        "masks": masks,
    }


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "data" / "img.png"
    path.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(path)
    return path


def test_write_inversion_never_leaves_the_output_folder(tmp_path, image):
    out = tmp_path / "deep" / "out"
    names = ["../../evil", "/abs", "~", "a\x00b", "CON", "Cat", "cat", ".."]
    result = _result(image, names)
    result["image_id"] = "../../escape"
    folder = write_inversion(result, out)
    before_out = _files_under(tmp_path) - _files_under(out)
    assert before_out == {image}, "something was written outside the output folder"
    assert folder.parent == out and folder == image_folder(out, "../../escape")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["image_id"] == "../../escape" and manifest["folder"] == folder.name
    assert [r["name"] for r in manifest["regions"]] == names
    overlays = manifest["files"]["overlays"]
    assert list(overlays) == names
    for rel in overlays.values():
        assert (folder / rel).is_file() and (folder / rel).parent == folder / "overlays"
    assert len({rel.casefold() for rel in overlays.values()}) == len(names)
    with safe_open(str(folder / "embeddings.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["mask_names"]) == names
        assert f.metadata()["key"] == manifest["key"]
    assert manifest["format_version"] == FORMAT_VERSION


def test_rewrite_replaces_the_whole_folder(tmp_path, image):
    out = tmp_path / "out"
    write_inversion(_result(image, ["x", "y", "z"]), out)
    folder = write_inversion(_result(image, ["cat"], seed=1), out)
    assert sorted(p.name for p in (folder / "overlays").iterdir()) == ["cat.png"]  # old overlays gone
    with safe_open(str(folder / "embeddings.safetensors"), "pt") as f:
        assert f.get_tensor("embeddings").shape[0] == 1
    assert [r["name"] for r in json.loads((folder / "manifest.json").read_text())["regions"]] == ["cat"]
    assert sorted(p.name for p in out.iterdir()) == ["img"]  # no staging or old folders left


def test_a_crash_while_writing_keeps_the_previous_folder(tmp_path, image, monkeypatch):
    out = tmp_path / "out"
    folder = write_inversion(_result(image, ["x", "y", "z"]), out)
    snapshot = {p.relative_to(folder): p.read_bytes() for p in _files_under(folder)}
    calls = []

    def dying_png(array, path):  # the process "dies" after the embeddings were staged
        calls.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr("regionembed.callbacks.writer.save_png", dying_png)
    with pytest.raises(KeyboardInterrupt):
        write_inversion(_result(image, ["cat"], seed=1), out)
    assert calls
    assert {p.relative_to(folder): p.read_bytes() for p in _files_under(folder)} == snapshot
    assert sorted(p.name for p in out.iterdir()) == ["img"]


def test_a_crash_between_the_renames_restores_the_previous_folder(tmp_path, image, monkeypatch):
    out = tmp_path / "out"
    folder = write_inversion(_result(image, ["x"]), out)
    manifest = (folder / "manifest.json").read_bytes()
    real_rename = os.rename

    def rename(src, dst):
        if str(src).endswith(".staging"):
            raise KeyboardInterrupt
        return real_rename(src, dst)

    monkeypatch.setattr(outputs.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        write_inversion(_result(image, ["cat"], seed=1), out)
    monkeypatch.setattr(outputs.os, "rename", real_rename)
    assert (folder / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in out.iterdir()) == ["img"]


def test_clean_stale_staging_after_a_kill(tmp_path):
    out = tmp_path / "out"
    (out / ".a.k3y_.staging").mkdir(parents=True)
    (out / ".a.k3y_.staging" / "manifest.json").write_text("{}")
    (out / ".b.x1.old").mkdir()  # killed between the two renames: b/ is missing
    (out / ".b.x1.old" / "manifest.json").write_text('{"old": true}')
    (out / "c").mkdir()
    (out / ".c.y2.old").mkdir()  # killed after the swap, before deleting the old folder
    assert clean_stale_staging(out) == 3
    assert sorted(p.name for p in out.iterdir()) == ["b", "c"]
    assert json.loads((out / "b" / "manifest.json").read_text()) == {"old": True}


def test_a_second_writer_appearing_during_the_swap_is_detected(tmp_path):
    out = tmp_path / "out"

    def fill(staging):
        (staging / "mine").write_text("a")
        (out / "img").mkdir(exist_ok=True)
        (out / "img" / "theirs").write_text("b")  # another writer created the folder meanwhile

    with pytest.raises(ConcurrentWriteError, match="another writer"):
        write_staged_folder(out, "img", fill)
    assert sorted(p.name for p in (out / "img").iterdir()) == ["theirs"]  # never a mix of the two
    assert sorted(p.name for p in out.iterdir()) == ["img"]


def test_up_to_date_needs_the_same_key_and_intact_files(tmp_path, image):
    out = tmp_path / "out"
    folder = write_inversion(_result(image, ["cat"]), out)
    key = json.loads((folder / "manifest.json").read_text())["key"]
    assert is_up_to_date(out, "img", key)
    assert not is_up_to_date(out, "img", "0" * 64)
    assert not is_up_to_date(out, "other", key)
    data = (folder / "embeddings.safetensors").read_bytes()
    (folder / "embeddings.safetensors").write_bytes(data[:20])
    assert not is_up_to_date(out, "img", key)


def test_input_fingerprint_sees_bytes_names_and_order():
    base = fingerprint_inputs(b"img", [("a", b"1"), ("b", b"2")])
    assert base == fingerprint_inputs(b"img", [("a", b"1"), ("b", b"2")])
    for other in (
        fingerprint_inputs(b"img2", [("a", b"1"), ("b", b"2")]),
        fingerprint_inputs(b"img", [("a", b"1"), ("b", b"3")]),
        fingerprint_inputs(b"img", [("b", b"2"), ("a", b"1")]),
        fingerprint_inputs(b"img", [("a", b"1"), ("c", b"2")]),
    ):
        assert other != base


def test_output_lock_refuses_a_second_holder(tmp_path):
    out = tmp_path / "out"
    with OutputLock(out), pytest.raises(OutputLockedError, match=rf"in use by another run \(pid {os.getpid()}"):
        OutputLock(out).acquire()
    OutputLock(out).acquire().release()  # free again


def test_output_lock_of_a_killed_process_is_released(tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys, time; from regionembed.outputs import OutputLock; "
        f"OutputLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=f"pid {proc.pid}"):
            OutputLock(out).acquire()
    finally:
        proc.kill()
        proc.wait()
    OutputLock(out).acquire().release()


def test_writer_expands_home_in_the_output_folder():
    from regionembed.callbacks import InversionWriter

    assert InversionWriter(output_dir="~/maskinv").output_dir == str(Path.home() / "maskinv")  # not ./~/maskinv
