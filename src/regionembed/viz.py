"""Overlays of explainability maps and masks on images (numpy/PIL, no plotting library)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def _jet(values: np.ndarray) -> np.ndarray:
    """A jet-like colormap: ``[H, W]`` in [0, 1] -> ``[H, W, 3]`` in [0, 1]."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.concatenate([r, g, b], axis=-1)


def overlay_map(image: Image.Image, heatmap: torch.Tensor | np.ndarray, alpha: float = 0.5, mask=None) -> np.ndarray:
    """Blend a ``[h, w]`` map in [0, 1] (resized to the image) over an RGB image; optionally outline a mask (any
    resolution of the same uncropped frame, resized to the image).

    Returns:
        ``[H, W, 3]`` uint8 array.
    """
    if isinstance(heatmap, torch.Tensor):
        heatmap = heatmap.detach().float().cpu().numpy()
    width, height = image.size
    resized = np.asarray(
        Image.fromarray(np.clip(heatmap, 0, 1).astype(np.float32), mode="F").resize((width, height), Image.BILINEAR)
    )
    base = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
    out = (1 - alpha) * base + alpha * _jet(resized)
    if mask is not None:
        m = np.asarray(mask, dtype=np.float32) > 0.5
        if m.shape != (height, width):  # a mask in the model's S x S frame (squash resize): back to the image's
            m = np.asarray(Image.fromarray(m).resize((width, height), Image.NEAREST))
        edge = m ^ np.roll(m, 1, 0) | m ^ np.roll(m, 1, 1)
        out[edge] = (1.0, 1.0, 1.0)
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
