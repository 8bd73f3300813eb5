import numpy as np
import pytest
import torch
from PIL import Image

from regionembed.backbones.base import PreprocessSpec
from regionembed.io import atomic_write, load_image, load_mask, preprocess_image, save_json


def _save(arr, path, mode=None):
    Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)
    return path


def test_mask_formats(tmp_path):
    m = np.zeros((6, 8), np.uint8)
    m[1:4, 2:6] = 255
    expected = (m > 0).astype(np.float32)
    np.testing.assert_array_equal(load_mask(_save(m, tmp_path / "grey.png")), expected)
    np.testing.assert_array_equal(load_mask(_save((m > 0).astype(np.uint8), tmp_path / "01.png")), expected)
    rgb = np.stack([m] * 3, -1)
    np.testing.assert_array_equal(load_mask(_save(rgb, tmp_path / "rgb.png")), expected)
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, the region is in the alpha channel
    rgba[..., 3] = m
    np.testing.assert_array_equal(load_mask(_save(rgba, tmp_path / "rgba.png", "RGBA")), expected)
    opaque = np.concatenate([rgb, np.full((6, 8, 1), 255, np.uint8)], -1)  # region in the colours, alpha constant
    np.testing.assert_array_equal(load_mask(_save(opaque, tmp_path / "opaque.png", "RGBA")), expected)
    soft = m.copy()
    soft[1, 2] = 128
    assert load_mask(_save(soft, tmp_path / "soft.png"))[1, 2] == pytest.approx(128 / 255)
    pal = Image.fromarray((m > 0).astype(np.uint8) * 3, "P")
    pal.putpalette([0, 0, 0] * 3 + [200, 30, 30])  # index 3 is a red region on black
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "pal.png"), expected)


def test_mask_errors(tmp_path):
    m = np.zeros((6, 8), np.uint8)
    with pytest.raises(ValueError, match="empty"):
        load_mask(_save(m, tmp_path / "empty.png"))
    m[0, 0] = 255
    with pytest.raises(ValueError, match="is 8x6 but its image is 10x6"):
        load_mask(_save(m, tmp_path / "m.png"), size=(10, 6))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read mask"):
        load_mask(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError):
        load_mask(tmp_path / "missing.png")


def test_corrupt_and_truncated_images(tmp_path):
    (tmp_path / "garbage.jpg").write_bytes(np.random.default_rng(1).bytes(64))
    with pytest.raises(ValueError, match=r"cannot read image .*garbage\.jpg"):
        load_image(tmp_path / "garbage.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read image .*cut\.png"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "nope.png")
    assert load_image(tmp_path / "ok.png").mode == "RGB"


def test_preprocess_is_a_square_resize():
    img = Image.fromarray(np.full((30, 50, 3), 255, np.uint8))
    spec = PreprocessSpec(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = preprocess_image(img, spec)
    assert out.shape == (3, 16, 16)
    torch.testing.assert_close(out, torch.ones(3, 16, 16))


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "out.json"
    save_json({"a": 1}, path)
    with pytest.raises(RuntimeError), atomic_write(path, "w") as fh:
        fh.write("partial")
        raise RuntimeError("boom")
    assert path.read_text().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_region_folder_rejects_clashing_image_ids(region_folder):
    from regionembed.data import scan_folder

    Image.new("RGB", (8, 8)).save(region_folder / "images" / "a.jpg")
    with pytest.raises(ValueError, match="share a name"):
        scan_folder(region_folder)
