"""Shared fixtures: tiny models, synthetic images and masks. No downloads, nothing outside tmp_path."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own folder: whatever a run writes relative to the working directory (LightningCLI's
    saved config.yaml, default output folders) lands there, never in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_backbone():
    from regionembed.backbones import OpenCLIPBackbone

    torch.manual_seed(0)
    return OpenCLIPBackbone("re-tiny-vit").requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_ls_backbone():
    """Layer scale, QuickGELU, final LN after pooling: the less common open_clip paths."""
    from regionembed.backbones import OpenCLIPBackbone

    torch.manual_seed(1)
    return OpenCLIPBackbone("re-tiny-vit-ls").requires_grad_(False)


@pytest.fixture(scope="session")
def timm_backbone():
    from regionembed.backbones import TimmBackbone

    torch.manual_seed(2)
    return TimmBackbone("test_vit", image_size=64).requires_grad_(False)


def make_masks(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """``n`` random rectangular binary masks ``[n, height, width]``, none empty."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, height, width)
    for i in range(n):
        y0 = int(torch.randint(0, height // 2, (1,), generator=g))
        x0 = int(torch.randint(0, width // 2, (1,), generator=g))
        h = int(torch.randint(2, height // 2 + 1, (1,), generator=g))
        w = int(torch.randint(2, width // 2 + 1, (1,), generator=g))
        masks[i, y0 : y0 + h, x0 : x0 + w] = 1
    return masks


@pytest.fixture
def region_folder(tmp_path):
    """A region folder with two images (different sizes) and grey/RGBA/0-1 masks."""
    root = tmp_path / "regions"
    rng = np.random.default_rng(0)
    specs = {"a": (40, 56), "b": (64, 48)}
    for name, (h, w) in specs.items():
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
        mdir = root / "masks" / name
        mdir.mkdir(parents=True)
        grey = np.zeros((h, w), np.uint8)
        grey[5:20, 10:30] = 255
        Image.fromarray(grey).save(mdir / "grey.png")
        rgba = np.zeros((h, w, 4), np.uint8)
        rgba[..., :3] = 255
        rgba[20:35, 5:25, 3] = 255
        Image.fromarray(rgba, "RGBA").save(mdir / "rgba.png")
        binary = np.zeros((h, w), np.uint8)
        binary[h // 2 :, w // 2 :] = 1
        Image.fromarray(binary).save(mdir / "zero_one.png")
    return root
