"""Region embedding methods: one embedding per region mask, all scored the same way downstream.

Every method maps ``(backbone, image [3, S, S] (normalised), masks [N, S, S] in [0, 1]) -> [N, D]``:

``global``         the whole-image embedding for every region (the floor).
``crop``           the region's bounding box cropped and resized to the model's input (``roi_align``).
``masked_crop``    as ``crop`` after greying (the dataset mean) or blurring everything outside the mask.
``mask_pool``      mask-weighted average of the projected patch tokens of the last block (dense CLIP features).
``red_circle``     a red ellipse drawn around the region on the full image (Shtedritski et al., 2023).
``mask_inversion`` MaskInversion's localized embedding tokens.
``alpha_<kind>``   an Alpha-CLIP model on the full image with alpha = the region's mask, box, or everything.
"""

from __future__ import annotations

import abc
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import masks_to_boxes, roi_align
from torchvision.transforms.v2.functional import gaussian_blur

from .backbones.alpha import alpha_from_boxes, alpha_from_masks, whole_image_alpha
from .backbones.base import Backbone
from .inversion import MaskInversion, check_masks

__all__ = [
    "AlphaEmbedding",
    "CropEmbedding",
    "GlobalEmbedding",
    "MaskInversionEmbedding",
    "MaskPoolEmbedding",
    "MaskedCropEmbedding",
    "RedCircleEmbedding",
    "RegionEmbedder",
]


def _check(backbone: Backbone, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, S, S], got {tuple(image.shape)}")
    masks = check_masks(masks)
    if masks.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"masks {tuple(masks.shape[-2:])} and image {tuple(image.shape[-2:])} differ in size")
    return masks.to(image.device, image.dtype)


def _region_boxes(masks: torch.Tensor, context: float = 0.0) -> torch.Tensor:
    """``[N, 4]`` float xyxy boxes of ``masks > 0`` (pixel edges), grown by ``context`` of their size, clipped."""
    boxes = masks_to_boxes(masks > 0).float()
    boxes[:, 2:] += 1  # masks_to_boxes gives inclusive pixel indices
    if context:
        wh = (boxes[:, 2:] - boxes[:, :2]) * context / 2
        boxes = boxes + torch.cat([-wh, wh], dim=1)
    size = masks.shape[-1]
    return boxes.clamp(0, size)


class RegionEmbedder(abc.ABC):
    """Base class: validates inputs and returns ``[N, D]`` embeddings (not normalised)."""

    #: short name used in logs and tables
    name: str = "region"

    def __call__(self, backbone: Backbone, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Embed ``masks`` ``[N, S, S]`` of ``image`` ``[3, S, S]`` -> ``[N, D]``."""
        masks = _check(backbone, image, masks)
        return self.embed(backbone, image, masks)

    @abc.abstractmethod
    def embed(self, backbone: Backbone, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GlobalEmbedding(RegionEmbedder):
    """The image embedding, repeated for each region."""

    name = "global"

    def embed(self, backbone, image, masks):
        with torch.no_grad():
            return backbone.encode_image(image[None]).expand(masks.shape[0], -1)


class CropEmbedding(RegionEmbedder):
    """Embedding of the region's box, cropped and resized (bilinear) to the input size.

    Args:
        context: grow the box by this fraction of its size before cropping.
    """

    name = "crop"

    def __init__(self, context: float = 0.0) -> None:
        self.context = context

    def _crops(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        boxes = _region_boxes(masks, self.context)
        rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], dim=1)
        size = image.shape[-1]
        return roi_align(image[None], rois, output_size=(size, size), spatial_scale=1.0, aligned=True)

    def embed(self, backbone, image, masks):
        with torch.no_grad():
            return backbone.encode_image(self._crops(image, masks))


class MaskedCropEmbedding(CropEmbedding):
    """Crop after replacing the background: ``"grey"`` (the normalisation mean, i.e. 0) or ``"blur"``.

    Args:
        background: ``"grey"`` or ``"blur"``.
        blur_sigma: Gaussian sigma as a fraction of the image size for ``"blur"``.
        context: see :class:`CropEmbedding`.
    """

    name = "masked_crop"

    def __init__(self, background: str = "grey", blur_sigma: float = 0.05, context: float = 0.0) -> None:
        super().__init__(context)
        if background not in {"grey", "blur"}:
            raise ValueError(f"background must be 'grey' or 'blur', got {background!r}")
        self.background = background
        self.blur_sigma = blur_sigma
        self.name = f"masked_crop_{background}"

    def embed(self, backbone, image, masks):
        if self.background == "grey":
            fill = torch.zeros_like(image)
        else:
            sigma = max(0.5, self.blur_sigma * image.shape[-1])
            kernel = 2 * int(3 * sigma) + 1
            fill = gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        m = masks[:, None]
        composites = m * image[None] + (1 - m) * fill[None]  # [N, 3, S, S]
        boxes = _region_boxes(masks, self.context)
        rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], dim=1)
        rois[:, 0] = torch.arange(len(boxes), dtype=rois.dtype, device=rois.device)
        size = image.shape[-1]
        crops = roi_align(composites, rois, output_size=(size, size), spatial_scale=1.0, aligned=True)
        with torch.no_grad():
            return backbone.encode_image(crops)


class MaskPoolEmbedding(RegionEmbedder):
    """Mask-weighted mean of the last block's patch tokens, each passed through the model's head (norm + proj)."""

    name = "mask_pool"

    def embed(self, backbone, image, masks):
        with torch.no_grad():
            tokens = backbone.forward_blocks(backbone.embed_tokens(image[None]))[0, backbone.num_prefix_tokens :]
            dense = backbone.legrad_head(tokens)  # [h*w, D]
            grid = backbone.grid_size(tuple(image.shape[-2:]))
            weights = F.adaptive_avg_pool2d(masks[:, None], grid).flatten(1)  # [N, h*w]
            weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)
            return weights @ dense


class RedCircleEmbedding(RegionEmbedder):
    """Full-image embedding with a red ellipse drawn around each region's box (one forward per region).

    Args:
        thickness: ring thickness as a fraction of the image size.
        margin: ellipse radii relative to the box half-sizes.
    """

    name = "red_circle"

    def __init__(self, thickness: float = 0.03, margin: float = 1.25) -> None:
        self.thickness = thickness
        self.margin = margin

    def embed(self, backbone, image, masks):
        spec = backbone.preprocess
        mean = torch.tensor(spec.mean, device=image.device).view(3, 1, 1)
        std = torch.tensor(spec.std, device=image.device).view(3, 1, 1)
        red = (torch.tensor([1.0, 0.0, 0.0], device=image.device).view(3, 1, 1) - mean) / std
        size = image.shape[-1]
        boxes = _region_boxes(masks)
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        radii = ((boxes[:, 2:] - boxes[:, :2]) / 2 * self.margin).clamp_min(2.0)
        coords = torch.arange(size, device=image.device, dtype=image.dtype) + 0.5
        dx = (coords[None, None, :] - centre[:, 0, None, None]) / radii[:, 0, None, None]
        dy = (coords[None, :, None] - centre[:, 1, None, None]) / radii[:, 1, None, None]
        radius = torch.sqrt(dx**2 + dy**2)  # 1 on the ellipse
        ring_width = self.thickness * size / radii.min(dim=1).values.view(-1, 1, 1)
        ring = ((radius - 1).abs() <= ring_width / 2).to(image.dtype)[:, None]  # [N, 1, S, S]
        drawn = ring * red[None] + (1 - ring) * image[None]
        with torch.no_grad():
            return backbone.encode_image(drawn)


class MaskInversionEmbedding(RegionEmbedder):
    """MaskInversion's localized embedding tokens (all masks of an image solved together).

    Args: the :class:`~regionembed.inversion.MaskInversionConfig` fields (defaults: the official ones).
    """

    name = "mask_inversion"

    def __init__(
        self,
        layers: list[int] | None = None,
        lr: float = 0.5,
        iterations: int = 10,
        alpha: float = 0.0,
        weight_decay: float = 0.0,
        strategy: str = "auto",
    ) -> None:
        self.config = {
            "layers": tuple(layers or (-1,)),
            "lr": lr,
            "iterations": iterations,
            "alpha": alpha,
            "weight_decay": weight_decay,
            "strategy": strategy,
        }

    def embed(self, backbone, image, masks):
        return MaskInversion(backbone, **self.config)(image[None], masks).embeddings

    def __repr__(self) -> str:
        return f"MaskInversionEmbedding({self.config})"


class AlphaEmbedding(RegionEmbedder, nn.Module):
    """Alpha-CLIP: the full image, with the alpha channel set to the region's mask, its box, or the whole image.

    Args:
        alpha: ``"mask"``, ``"box"`` (the mask's bounding box) or ``"whole"`` (alpha = 1, the region is ignored).
        backbone: the alpha model (e.g. ``OpenCLIPBackbone(..., alpha_checkpoint=...)``); ``None`` uses the
            evaluator's backbone, which then needs an alpha channel. Text embeddings come from the evaluator's
            backbone, so both must share the text tower (Alpha-CLIP keeps it frozen).
    """

    def __init__(self, alpha: Literal["mask", "box", "whole"] = "mask", backbone: Backbone | None = None) -> None:
        nn.Module.__init__(self)
        if alpha not in {"mask", "box", "whole"}:
            raise ValueError(f"alpha must be 'mask', 'box' or 'whole', got {alpha!r}")
        self.alpha = alpha
        self.backbone = backbone
        self.name = f"alpha_{alpha}"

    def embed(self, backbone, image, masks):
        model = self.backbone if self.backbone is not None else backbone
        if model.alpha_embed is None:
            raise ValueError(f"{self.name}: the backbone has no alpha channel (use alpha_channel/alpha_checkpoint)")
        if model.preprocess != backbone.preprocess:
            raise ValueError(f"{self.name}: the alpha model expects {model.preprocess}, the data {backbone.preprocess}")
        size = tuple(image.shape[-2:])
        if self.alpha == "mask":
            alphas = alpha_from_masks(masks)
        elif self.alpha == "box":
            alphas = alpha_from_boxes(_region_boxes(masks), size)
        else:
            alphas = whole_image_alpha(masks.shape[0], size, device=image.device)
        with torch.no_grad():
            images = image[None].expand(masks.shape[0], -1, -1, -1)
            return model.encode_image(images, alpha=alphas.to(image.dtype))

    def __repr__(self) -> str:
        return f"AlphaEmbedding(alpha={self.alpha!r})"
