"""Boxes from saliency maps: threshold at a fraction of each map's maximum, connected components, one box each.

This is the box step of the CAM weakly-supervised localization protocol (Zhou et al., 2016): keep the pixels whose
value reaches ``threshold * max(map)``, split them into 8- (or 4-) connected components
(``scipy.ndimage.label``), and box each component (:func:`component_boxes`, also the box step of MaxBoxAccV2 in
:mod:`regionembed.metrics`). Plain torch, no Lightning.

Boxes follow the package convention (see :mod:`regionembed.metrics.functional`): ``[K, 4]`` xyxy in continuous pixel
coordinates, pixel ``(r, c)`` covering ``[c, c + 1] x [r, r + 1]``, so a component over columns ``c0..c1`` spans
``x`` in ``[c0, c1 + 1]``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch
from scipy import ndimage
from torchvision.ops import nms

__all__ = ["MapBoxes", "component_boxes", "empty_box", "maps_to_boxes"]

BoxMode = Literal["largest", "all", "merge"]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_STRUCTURES = {8: _EIGHT_CONNECTED, 4: ndimage.generate_binary_structure(2, 1)}


class MapBoxes(NamedTuple):
    """The boxes of one map, best first.

    Attributes:
        boxes: ``[K, 4]`` float32 xyxy.
        scores: ``[K]`` float32 mean map value over each box's component pixels (in map units).
        areas: ``[K]`` int64 number of component pixels (for ``"merge"``: of all kept components).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    areas: torch.Tensor


def empty_box(device: torch.device | None = None) -> torch.Tensor:
    """A zero-area box ``[1, 4]`` at the origin: IoU 0 with every box, the stand-in for "no box found"."""
    return torch.zeros(1, 4, device=device)


def component_boxes(
    foreground: np.ndarray | torch.Tensor, connectivity: int = 8
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """The connected components of a binary map and the tight box of each: the one component boxing of the package.

    Args:
        foreground: ``[H, W]`` bool (numpy or torch).
        connectivity: 8 (diagonal neighbours join a component) or 4 (edge neighbours only).

    Returns:
        ``(labels, boxes, areas)``: ``labels`` ``[H, W]`` int numpy array (0 background, ``1..K`` components, as
        ``scipy.ndimage.label``), ``boxes`` ``[K, 4]`` float64 xyxy on the CPU in continuous pixel coordinates
        (a component over columns ``c0..c1`` spans ``x`` in ``[c0, c1 + 1]``), ``areas`` ``[K]`` int64 pixel counts;
        component ``k`` is ``labels == k + 1``.
    """
    if isinstance(foreground, torch.Tensor):
        foreground = foreground.detach().cpu().numpy()
    if connectivity not in _STRUCTURES:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    labels, n = ndimage.label(np.asarray(foreground, dtype=bool), structure=_STRUCTURES[connectivity])
    slices = ndimage.find_objects(labels)
    boxes = torch.tensor([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices], dtype=torch.float64)
    areas = torch.from_numpy(np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.int64))
    return labels, boxes.reshape(-1, 4), areas


def _min_pixels(min_area: float, num_pixels: int) -> float:
    if not min_area >= 0:  # also rejects NaN
        raise ValueError(f"min_area must be >= 0, got {min_area}")
    # below 1: a fraction of the map; from 1 on: a pixel count
    return min_area * num_pixels if min_area < 1 else min_area


def _one_map_boxes(
    m: torch.Tensor, threshold: float, min_pixels: float, mode: BoxMode, nms_iou: float | None, connectivity: int = 8
) -> MapBoxes:
    empty = MapBoxes(
        torch.zeros(0, 4, device=m.device), torch.zeros(0, device=m.device), torch.zeros(0, dtype=torch.long)
    )
    peak = float(m.max())
    if peak <= 0:  # all-zero (or non-positive) map: nothing is salient
        return empty
    labels, all_boxes, areas = component_boxes(m >= threshold * peak, connectivity)
    n = len(areas)
    if n == 0:
        return empty
    labels_t = torch.from_numpy(labels).to(m.device)
    mass = torch.zeros(n + 1, dtype=torch.float64, device=m.device).index_add_(
        0, labels_t.flatten(), m.flatten().double()
    )[1:]
    keep = torch.nonzero(areas >= min_pixels)[:, 0]
    if keep.numel() == 0:
        return empty
    boxes = all_boxes[keep]
    if mode == "merge":
        boxes = torch.cat([boxes[:, :2].min(0).values, boxes[:, 2:].max(0).values])[None]  # the union's box
        mass, areas = mass[keep].sum()[None], areas[keep].sum()[None]
    else:
        mass, areas = mass[keep], areas[keep]
    boxes = boxes.float().to(m.device)
    scores = (mass / areas.to(mass.device).double()).float()
    order = torch.argsort(mass, descending=True, stable=True).cpu()
    boxes, scores, areas = boxes[order], scores[order], areas[order]
    if mode == "largest":
        # the component with the most pixels (the CAM protocol); argmax takes the first, so ties go to larger mass
        best = int(torch.argmax(areas))
        return MapBoxes(boxes[best : best + 1], scores[best : best + 1], areas[best : best + 1])
    if mode == "all" and nms_iou is not None:
        kept = nms(boxes, mass[order.to(mass.device)].float(), nms_iou).cpu()
        boxes, scores, areas = boxes[kept], scores[kept], areas[kept]
    return MapBoxes(boxes, scores, areas)


def maps_to_boxes(
    maps: torch.Tensor,
    threshold: float = 0.6,
    min_area: float = 0.0,
    mode: BoxMode = "largest",
    nms_iou: float | None = None,
    connectivity: int = 8,
) -> MapBoxes | list[MapBoxes]:
    """Boxes of the salient regions of one map or a batch of maps.

    Args:
        maps: ``[H, W]`` or ``[B, H, W]`` finite maps (any scale; explainers give [0, 1]).
        threshold: a pixel is salient where ``map >= threshold * max(map)`` (a fraction of *each* map's maximum,
            in ``[0, 1]``; 0.6 is a common choice for CLIP maps, CAM used 0.2).
        min_area: drop components smaller than this: below 1 it is a fraction of the map's ``H * W`` pixels,
            from 1 on a pixel count (``0``: keep all).
        mode: ``"largest"``: the box of the component with the most pixels (one box, the CAM protocol);
            ``"all"``: one box per component, ordered by decreasing mass (sum of map values);
            ``"merge"``: one box, the union of all kept components.
        nms_iou: with ``mode="all"``, drop boxes overlapping a higher-mass box by more than this IoU
            (``torchvision.ops.nms``); ``None``: keep all.
        connectivity: 8 (diagonal neighbours join a component, the CAM protocol's contours) or 4 (only edge
            neighbours, ``cv2.connectedComponents(connectivity=4)`` as in VL-Score's code).

    Returns:
        :class:`MapBoxes` (boxes ``[K, 4]``, scores, areas) for a ``[H, W]`` map, a list of them for ``[B, H, W]``.
        A map with no salient component left (all zero or non-positive, or every component below ``min_area``)
        gets ``K = 0`` boxes; use :func:`empty_box` where exactly one box is needed (it localises nothing).

    Raises:
        ValueError: wrong number of dimensions, an empty map, NaN/inf values, a threshold outside [0, 1], a negative
            ``min_area``, an unknown ``mode``.
    """
    if maps.ndim not in (2, 3):
        raise ValueError(f"maps must have shape [H, W] or [B, H, W], got {tuple(maps.shape)}")
    if maps.shape[-1] == 0 or maps.shape[-2] == 0:
        raise ValueError(f"maps must have at least one pixel, got shape {tuple(maps.shape)}")
    if not maps.is_floating_point():
        maps = maps.float()
    if not bool(torch.isfinite(maps).all()):
        raise ValueError("maps contain NaN or infinite values")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a fraction of the map maximum in [0, 1], got {threshold}")
    if mode not in ("largest", "all", "merge"):
        raise ValueError(f"mode must be 'largest', 'all' or 'merge', got {mode!r}")
    if connectivity not in _STRUCTURES:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    if nms_iou is not None and not 0 <= nms_iou <= 1:
        raise ValueError(f"nms_iou must be in [0, 1] or None, got {nms_iou}")
    min_pixels = _min_pixels(min_area, maps.shape[-1] * maps.shape[-2])
    maps = maps.detach()
    if maps.ndim == 2:
        return _one_map_boxes(maps, threshold, min_pixels, mode, nms_iou, connectivity)
    return [_one_map_boxes(m, threshold, min_pixels, mode, nms_iou, connectivity) for m in maps]
