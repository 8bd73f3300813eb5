"""`pretrained="regionembed:<name>"`: trained on first use (subprocess train.py), then loaded from the cache."""

from pathlib import Path

import pytest
import torch

from regionembed import zoo
from regionembed.backbones import OpenCLIPBackbone


def test_trained_on_first_use_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("REGIONEMBED_HOME", str(tmp_path))
    monkeypatch.setitem(zoo.MODELS, "tiny_test", zoo.ZooEntry("re-tiny-vit", "configs/tests/tiny_clip.yaml", 1))
    backbone = OpenCLIPBackbone("re-tiny-vit", pretrained="regionembed:tiny_test")
    path = Path(tmp_path / "tiny_test.safetensors")
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    again = OpenCLIPBackbone("re-tiny-vit", pretrained="regionembed:tiny_test")  # cached: no second training
    assert path.stat().st_mtime_ns == stamp
    for a, b in zip(backbone.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


def test_zoo_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("REGIONEMBED_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="unknown regionembed model"):
        zoo.resolve("nope")
    with pytest.raises(ValueError, match="is a re-small-vit model"):
        OpenCLIPBackbone("re-tiny-vit", pretrained="regionembed:clip_synthetic")
    with pytest.raises(FileNotFoundError, match="train it with"):
        zoo.resolve("clip_synthetic", train=False)
