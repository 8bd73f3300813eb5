"""Overlays of explainability maps and masks on images (OpenCV colour maps and contours, no plotting library)."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image


def colorize(heatmap: np.ndarray, colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """An OpenCV colour map applied to a map in [0, 1]: ``[H, W]`` -> ``[H, W, 3]`` RGB float in [0, 1]."""
    levels = (np.clip(heatmap, 0.0, 1.0) * 255).round().astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(levels, colormap), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def overlay_map(
    image: Image.Image,
    heatmap: torch.Tensor | np.ndarray,
    alpha: float = 0.5,
    mask=None,
    colormap: int = cv2.COLORMAP_JET,
) -> np.ndarray:
    """Blend a ``[h, w]`` map in [0, 1] (resized bilinearly to the image) over an RGB image; optionally outline a
    mask in white (any resolution of the same uncropped frame, resized to the image).

    Args:
        image: the RGB image.
        heatmap: ``[h, w]`` map in [0, 1].
        alpha: weight of the coloured map.
        mask: optional ``[h, w]`` mask (> 0.5 inside) whose outline is drawn; resized (nearest) to the image
            when its size differs (a mask in the model's S x S frame after a squash resize).
        colormap: an OpenCV colour map (``cv2.COLORMAP_*``).

    Returns:
        ``[H, W, 3]`` uint8 array.
    """
    if isinstance(heatmap, torch.Tensor):
        heatmap = heatmap.detach().float().cpu().numpy()
    width, height = image.size
    resized = cv2.resize(np.clip(heatmap, 0, 1).astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    base = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
    out = (1 - alpha) * base + alpha * colorize(resized, colormap)
    if mask is not None:
        inside = (np.asarray(mask, dtype=np.float32) > 0.5).astype(np.uint8)
        if inside.shape != (height, width):
            inside = cv2.resize(inside, (width, height), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(inside, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, (1.0, 1.0, 1.0), thickness=1)
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
