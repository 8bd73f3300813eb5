"""Overlays: OpenCV's colour map and contours on the image."""

import numpy as np
import pytest
from PIL import Image

from regionembed.viz import colorize, overlay_map


def test_colorize_is_opencv_jet_low_blue_high_red():
    rgb = colorize(np.array([[0.0, 1.0]]))
    assert rgb.shape == (1, 2, 3)
    assert rgb[0, 0].argmax() == 2 and rgb[0, 1].argmax() == 0  # jet: blue at 0, red at 1


def test_overlay_shape_blend_and_mask_outline():
    image = Image.fromarray(np.zeros((20, 30, 3), np.uint8))
    heat = np.zeros((5, 5), np.float32)
    mask = np.zeros((20, 30), np.float32)
    mask[5:15, 10:20] = 1
    out = overlay_map(image, heat, alpha=1.0, mask=mask)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert (out[10, 15] == out[0, 0]).all()  # inside the mask, away from the edge: the colour map only
    assert (out[5, 10:20] == 255).all() and (out[14, 10:20] == 255).all()  # the outline is white
    assert not (out[0, 0] == 255).all()
    plain = overlay_map(image, heat, alpha=0.0)
    assert (plain == 0).all()  # alpha 0 leaves the image untouched


@pytest.mark.parametrize("value", [-1.0, 2.0])
def test_out_of_range_maps_are_clipped(value):
    image = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    clipped = overlay_map(image, np.full((2, 2), min(max(value, 0.0), 1.0)))
    assert (overlay_map(image, np.full((2, 2), value)) == clipped).all()
