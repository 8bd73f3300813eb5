"""Region embedding methods: one embedding per region mask, all scored the same way downstream.

Every method maps ``(backbone, image [3, S, S] (normalised), masks [N, S, S] in [0, 1]) -> [N, D]``:

``global``         the whole-image embedding for every region (the floor).
``crop``           the region's tight bounding box cut out of the *model input* and stretched to a square
                   (``roi_align``; no context, aspect ratio lost): the project's first, weaker protocol.
``masked_crop``    as ``crop`` after greying (the dataset mean) or blurring everything outside the mask.
``crop_square``    the literature's protocol (:class:`ContextCropEmbedding`): a square box around the region (aspect
                   ratio kept) grown by a context margin, cut from the *original-resolution* image, padded with the
                   mean colour where it leaves the image, resized once to the model input; ``masked_crop_square_*``
                   greys or blurs outside the mask first.
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
from .backbones.base import Backbone, TokenGridBackbone, require
from .inversion import MaskInversion, check_masks

__all__ = [
    "AlphaEmbedding",
    "ContextCropEmbedding",
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
    #: whether the method uses the original-resolution image when the evaluator has it (see ``__call__``)
    needs_original_image: bool = False

    def __call__(
        self,
        backbone: Backbone,
        image: torch.Tensor,
        masks: torch.Tensor,
        original: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Embed ``masks`` ``[N, S, S]`` of ``image`` ``[3, S, S]`` -> ``[N, D]``.

        ``original`` is ``(uint8 image [3, H, W], uint8 masks [N, H, W])``, the same regions before the resize;
        only methods with ``needs_original_image`` use it.
        """
        masks = _check(backbone, image, masks)
        if self.needs_original_image:
            return self.embed(backbone, image, masks, original=original)
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


def square_boxes(masks: torch.Tensor, context: float) -> torch.Tensor:
    """``[N, 4]`` float xyxy squares centred on each mask's box, side ``max(w, h) * (1 + 2 * context)``.

    Not clipped: the part outside the image is padded by the caller.
    """
    boxes = masks_to_boxes(masks > 0).float()
    boxes[:, 2:] += 1  # inclusive pixel indices -> pixel edges
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1, keepdim=True) * (1 + 2 * context) / 2
    return torch.cat([centre - half, centre + half], dim=1)


class ContextCropEmbedding(RegionEmbedder):
    """The crop baselines as the literature runs them: square, with context, from the original image.

    For each region: the tight box of its mask in the original-resolution image, made square around its centre
    (side = the longer box side, so the aspect ratio is kept), grown by ``context`` of that side on every side; the
    square is cut out of the original image, padded with the normalisation mean (grey) where it leaves the image,
    and resized once to the model input (``roi_align`` with adaptive sampling, i.e. area-averaged when shrinking).
    With ``background`` the pixels outside the mask are first replaced by grey (the mean) or a blurred copy of the
    image, as the masked-crop prompts of Shtedritski et al. (2023, "What does CLIP know about a red circle?") and
    Yang et al. (2023, "Fine-Grained Visual Prompting", blur outside the mask).

    Without an original image (called directly, or by an evaluator that does not pass one) the model input is
    used, which for the square geometry and the context is the same protocol at the input's resolution.
    :class:`~regionembed.modules.RegionClassificationModule` passes it and refuses batches without it (a region data
    module with ``keep_original=True``, which the CLIs set for methods with ``needs_original_image``).

    Args:
        context: margin on every side, as a fraction of the square's side before the margin (0.1 = 10%).
        background: ``None`` (a plain crop), ``"grey"`` or ``"blur"`` outside the mask.
        blur_sigma: Gaussian sigma as a fraction of the image's longer side, for ``"blur"``.
        name: the table/metric name; default ``crop_square`` or ``masked_crop_square_<background>``.
    """

    needs_original_image = True

    def __init__(
        self,
        context: float = 0.1,
        background: Literal["grey", "blur"] | None = None,
        blur_sigma: float = 0.05,
        name: str | None = None,
    ) -> None:
        if context < 0:
            raise ValueError(f"context must be >= 0, got {context}")
        if background not in {None, "grey", "blur"}:
            raise ValueError(f"background must be None, 'grey' or 'blur', got {background!r}")
        self.context, self.background, self.blur_sigma = float(context), background, float(blur_sigma)
        self.name = name or ("crop_square" if background is None else f"masked_crop_square_{background}")

    def _normalised(self, backbone: Backbone, original: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        spec = backbone.preprocess
        mean = torch.tensor(spec.mean, device=like.device, dtype=like.dtype).view(3, 1, 1)
        std = torch.tensor(spec.std, device=like.device, dtype=like.dtype).view(3, 1, 1)
        return (original.to(like.device, like.dtype) / 255.0 - mean) / std

    def embed(self, backbone, image, masks, original=None):
        if original is not None:
            pixels, masks = original
            source = self._normalised(backbone, pixels, image)
            masks = masks.to(image.device, image.dtype)
            if masks.shape[0] != 0 and masks.shape[-2:] != source.shape[-2:]:
                raise ValueError(f"original masks {tuple(masks.shape)} do not match the original image")
        else:
            source = image
        if self.background is None:
            stack = source[None]  # one image, every region's box on it
            batch_index = torch.zeros(len(masks), 1, device=image.device, dtype=image.dtype)
        else:
            if self.background == "grey":
                fill = torch.zeros_like(source)  # the normalisation mean
            else:
                sigma = max(0.5, self.blur_sigma * max(source.shape[-2:]))
                kernel = 2 * int(3 * sigma) + 1
                fill = gaussian_blur(source, [kernel, kernel], [sigma, sigma])
            m = masks[:, None]
            stack = m * source[None] + (1 - m) * fill[None]  # [N, 3, H, W]
            batch_index = torch.arange(len(masks), device=image.device, dtype=image.dtype)[:, None]
        rois = torch.cat([batch_index, square_boxes(masks, self.context).to(image.dtype)], dim=1)
        size = image.shape[-1]
        # roi_align samples outside the image as 0, which is the mean colour in normalised space: the padding.
        crops = roi_align(stack, rois, output_size=(size, size), spatial_scale=1.0, aligned=True)
        with torch.no_grad():
            return backbone.encode_image(crops)

    def __repr__(self) -> str:
        return f"ContextCropEmbedding(context={self.context}, background={self.background!r})"


class MaskPoolEmbedding(RegionEmbedder):
    """Mask-weighted mean of the last block's patch tokens, each passed through the model's head (norm + proj)."""

    name = "mask_pool"

    def embed(self, backbone, image, masks):
        require(backbone, TokenGridBackbone, "mask_pool", alternative="crop, context_crop or mask_inversion")
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

    Args:
        solver: the MaskInversion solver and all its settings (explainer, lr, iterations, strategy, ...); default
            ``MaskInversion()``, the official settings. E.g. ``MaskInversion(explainer=LeGrad(pooling="model"))``
            follows the model's own pooling.
        name: the table/metric name (default ``mask_inversion``), to compare several settings side by side.
    """

    name = "mask_inversion"

    def __init__(self, solver: MaskInversion | None = None, name: str | None = None) -> None:
        self.solver = solver if solver is not None else MaskInversion()
        if name:
            self.name = name

    def embed(self, backbone, image, masks):
        return self.solver(backbone, image[None], masks).embeddings

    def embed_history(
        self, backbone: Backbone, image: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([iterations + 1, N, D] tokens, [iterations + 1, N] Dice loss)`` over the optimisation; the last row
        is what :meth:`embed` returns."""
        masks = _check(backbone, image, masks)
        result = self.solver(backbone, image[None], masks)
        return result.embedding_history, result.mask_loss_history

    def __repr__(self) -> str:
        return f"{type(self).__name__}(solver={self.solver!r}, name={self.name!r})"


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
