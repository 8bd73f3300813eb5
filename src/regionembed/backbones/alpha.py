"""Alpha-CLIP's alpha channel (Sun et al., 2023): a zero-initialised conv beside the RGB patch embedding.

The alpha map says where to look: ``1`` on the region, ``0`` elsewhere, all ones for "the whole image". It is
resized with the image (same geometry, same crop), normalised with mean 0.5 and std 0.26, passed through a
bias-free conv with the kernel, stride and padding of the RGB stem conv (the ViT patch embedding, or conv1 of a
ResNet stem), and the result is *added* to the RGB conv's output before anything else (class token, positional
embedding, or the stem's first batch norm). Initialised at zero, a freshly added alpha channel changes nothing.

It is an add-on: any backbone that exposes its first RGB convolution as
:attr:`~regionembed.backbones.base.Backbone.rgb_stem_conv` (an ``nn.Conv2d`` patchify or conv stem, run as a module
call) gets it, and no backbone implements alpha logic itself. :func:`enable_alpha` (or the adapters'
``alpha_channel=True``) adds the conv as ``backbone.alpha_embed``; :func:`alpha_input`, which ``encode_image(image,
alpha=...)`` (and ``embed_tokens``/``feature_maps``) wrap around the forward, hooks the stem conv for the duration of
that forward so that its output gets ``alpha_embed(alpha)`` added. Nothing stays attached between calls.

The released Alpha-CLIP checkpoints are state dicts of the *visual* tower of their modified OpenAI CLIP: the same
names as open_clip's visual tower, except ``conv1_alpha.weight`` (our ``alpha_embed.conv.weight``) and, in every
ViT block, ``attn.in_proj.{weight,bias}`` (a ``nn.Linear``) where open_clip's ``nn.MultiheadAttention`` has
``attn.in_proj_{weight,bias}``. :func:`alpha_clip_key_map` makes that correspondence explicit;
:func:`load_alpha_clip_visual` and :func:`export_alpha_clip_visual` use it with strict checking.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .weights import load_lightning_backbone_state, resolve_local_file, weights_error

if TYPE_CHECKING:
    from .base import Backbone

__all__ = [
    "ALPHA_MEAN",
    "ALPHA_STD",
    "AlphaCheckpointError",
    "AlphaPatchEmbed",
    "alpha_clip_key_map",
    "alpha_from_boxes",
    "alpha_from_masks",
    "alpha_input",
    "enable_alpha",
    "export_alpha_clip_visual",
    "load_alpha_clip_visual",
    "normalize_alpha",
    "whole_image_alpha",
]

#: Alpha-CLIP's normalisation of the alpha map: ``(alpha - 0.5) / 0.26``.
ALPHA_MEAN = 0.5
ALPHA_STD = 0.26

#: the official checkpoints' name of the alpha conv, and ours (relative to the backbone)
OFFICIAL_ALPHA_KEY = "conv1_alpha.weight"
ALPHA_KEY = "alpha_embed.conv.weight"

_IN_PROJ = re.compile(r"^(transformer\.resblocks\.\d+\.attn\.)in_proj_(weight|bias)$")


class AlphaCheckpointError(ValueError):
    """An Alpha-CLIP checkpoint that does not fit the model (wrong architecture, missing or extra keys)."""


class AlphaPatchEmbed(nn.Module):
    """The alpha-channel conv: 1 input channel, bias-free, zero-initialised.

    Args:
        out_channels: channels of the RGB stem conv it is added to.
        kernel_size: kernel of the RGB stem conv (the patch size for a ViT, 3 for a ResNet stem).
        stride: stride of the RGB stem conv.
        padding: padding of the RGB stem conv.
    """

    def __init__(self, out_channels: int, kernel_size: int | tuple[int, int], stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        nn.init.zeros_(self.conv.weight)

    @classmethod
    def like(cls, conv: nn.Conv2d) -> AlphaPatchEmbed:
        """An alpha conv with the geometry (channels, kernel, stride, padding) of the RGB conv ``conv``."""
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.dilation != (1, 1):
            raise ValueError(f"the alpha channel needs a plain Conv2d stem, got {conv!r}")
        return cls(conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding)

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        """``[B, 1, H, W]`` normalised alpha -> ``[B, C, h, w]``, added to the RGB conv's output."""
        return self.conv(alpha)


# ------------------------------------------------------------------------------------------------ the add-on
def enable_alpha(backbone: Backbone) -> Backbone:
    """Add a zero-initialised alpha conv shaped like ``backbone.rgb_stem_conv`` as ``backbone.alpha_embed``.

    A no-op when the backbone already has one. Returns ``backbone``.

    Raises:
        UnsupportedModelError: the backbone exposes no RGB stem conv.
    """
    from .attention import UnsupportedModelError

    if backbone.alpha_embed is None:
        conv = backbone.rgb_stem_conv
        if conv is None:
            raise UnsupportedModelError(
                f"{type(backbone).__name__} exposes no rgb_stem_conv (its first RGB convolution): no alpha channel"
            )
        backbone.alpha_embed = AlphaPatchEmbed.like(conv).to(device=conv.weight.device, dtype=conv.weight.dtype)
    return backbone


def check_alpha(backbone: Backbone, alpha: torch.Tensor, image: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``backbone`` has an alpha channel and ``alpha`` is a finite ``[B, 1, H, W]`` map
    matching ``image`` ``[B, 3, H, W]``."""
    if backbone.alpha_embed is None:
        raise ValueError(
            f"{type(backbone).__name__} has no alpha channel: build it with alpha_channel=True (or call "
            "enable_alpha()), or pass alpha=None"
        )
    if not isinstance(alpha, torch.Tensor) or alpha.ndim != 4 or alpha.shape[1] != 1:
        shape = tuple(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__
        raise ValueError(f"alpha must have shape [B, 1, H, W], got {shape}")
    if alpha.shape[0] != image.shape[0] or alpha.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"alpha {tuple(alpha.shape)} does not match the image {tuple(image.shape)} (same batch and size)"
        )
    if not torch.isfinite(alpha).all():
        raise ValueError("alpha contains NaN or infinite values")


@contextlib.contextmanager
def alpha_input(backbone: Backbone, alpha: torch.Tensor | None, image: torch.Tensor) -> Iterator[None]:
    """While active, ``backbone.rgb_stem_conv(x)`` returns ``conv(x) + backbone.alpha_embed(alpha)``.

    A forward hook on the stem conv, removed on exit; with ``alpha=None`` nothing happens. The stem must run inside
    the context (otherwise the alpha would be silently ignored, which raises ``RuntimeError`` instead).

    Args:
        backbone: a backbone with an alpha channel (:func:`enable_alpha`).
        alpha: normalised alpha map ``[B, 1, H, W]`` (see :func:`alpha_from_masks`), or ``None``.
        image: the image ``[B, 3, H, W]`` the forward runs on (to validate ``alpha`` against).
    """
    if alpha is None:
        yield
        return
    check_alpha(backbone, alpha, image)
    calls = []

    def add_alpha(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return output + backbone.alpha_embed(alpha.to(output.dtype))

    handle = backbone.rgb_stem_conv.register_forward_hook(add_alpha)
    try:
        yield
    finally:
        handle.remove()
    if not calls:
        raise RuntimeError(f"{type(backbone).__name__} never ran its rgb_stem_conv: the alpha map was not applied")


# ------------------------------------------------------------------------------------------------- alpha maps
def normalize_alpha(alpha: torch.Tensor) -> torch.Tensor:
    """Alpha in [0, 1] -> the normalised model input ``(alpha - 0.5) / 0.26`` (same shape)."""
    if not torch.isfinite(alpha).all():
        raise ValueError("alpha contains NaN or infinite values")
    if alpha.numel() and (alpha.min() < 0 or alpha.max() > 1):
        raise ValueError("alpha must lie in [0, 1] before normalisation")
    return (alpha - ALPHA_MEAN) / ALPHA_STD


def alpha_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Region masks ``[N, S, S]`` in [0, 1] (already resized with the image) -> normalised alpha ``[N, 1, S, S]``."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, S, S], got {tuple(masks.shape)}")
    return normalize_alpha(masks.float()[:, None])


def alpha_from_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Boxes ``[N, 4]`` xyxy in pixels (x1/y1 exclusive) -> normalised box-shaped alpha ``[N, 1, H, W]``.

    A pixel is inside when its centre is; every non-degenerate box covers at least its nearest pixel.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4] xyxy, got {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        raise ValueError("boxes contain NaN or infinite values")
    h, w = size
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5
    x0, y0, x1, y1 = boxes.unbind(1)
    # a box thinner than a pixel still marks the pixel its centre falls in
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    x0, x1 = torch.minimum(x0, cx.floor() + 0.5), torch.maximum(x1, cx.floor() + 0.5)
    y0, y1 = torch.minimum(y0, cy.floor() + 0.5), torch.maximum(y1, cy.floor() + 0.5)
    inside_x = (xs[None] >= x0[:, None]) & (xs[None] <= x1[:, None])
    inside_y = (ys[None] >= y0[:, None]) & (ys[None] <= y1[:, None])
    masks = (inside_y[:, :, None] & inside_x[:, None, :]).float()
    return alpha_from_masks(masks)


def whole_image_alpha(n: int, size: tuple[int, int], device=None) -> torch.Tensor:
    """ "Look at everything": normalised all-ones alpha ``[n, 1, H, W]``."""
    return normalize_alpha(torch.ones(n, 1, *size, device=device))


# ------------------------------------------------------------------------------------ official checkpoints
def alpha_clip_key_map(visual_keys: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``{official Alpha-CLIP key: our key}`` for a visual tower with open_clip's ``visual_keys``.

    Our keys are relative to the backbone: ``model.visual.<open_clip key>`` and ``alpha_embed.conv.weight``.
    """
    mapping = {OFFICIAL_ALPHA_KEY: ALPHA_KEY}
    for key in visual_keys:
        official = _IN_PROJ.sub(r"\1in_proj.\2", key)
        mapping[official] = f"model.visual.{key}"
    return mapping


def _read_state(path: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a weights-only torch file; ``module.``/``visual.`` prefixes dropped."""
    path = resolve_local_file(path)
    if path.endswith(".ckpt"):  # a regionembed Lightning checkpoint of an alpha backbone
        state = load_lightning_backbone_state(path, prefix="backbone.")
        out = {k[len("model.visual.") :]: v for k, v in state.items() if k.startswith("model.visual.")}
        if ALPHA_KEY in state:
            out[OFFICIAL_ALPHA_KEY] = state[ALPHA_KEY]
        return {_IN_PROJ.sub(r"\1in_proj.\2", k): v for k, v in out.items()}
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise weights_error(path, err, "an Alpha-CLIP visual tower") from err
    if not path.endswith(".safetensors") and isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AlphaCheckpointError(f"{path} is not a state dict of tensors")
    for prefix in ("module.", "visual."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_alpha_clip_visual(backbone: Backbone, path: str | Path) -> Backbone:
    """Load an Alpha-CLIP visual checkpoint (official format, or our export) into ``backbone``, strictly.

    The backbone's visual tower and alpha conv are replaced; its text tower is left as it is (Alpha-CLIP keeps
    the original CLIP text tower, so build the backbone with the matching base weights, e.g. ``openai``).

    Args:
        backbone: an open_clip backbone (ViT or ModifiedResNet); its alpha channel is enabled if needed.
        path: ``.pth``/``.pt``/``.bin`` (weights-only), ``.safetensors``, or a regionembed ``.ckpt``.

    Raises:
        AlphaCheckpointError: missing or unexpected keys, or shapes that do not fit the model (e.g. a ViT-L/14
            checkpoint into a ViT-B/16 model, or a LoRA variant).
    """
    state = _read_state(str(path))
    backbone.enable_alpha()
    visual = backbone.model.visual
    ours = {k: v for k, v in visual.state_dict().items() if not k.endswith("num_batches_tracked")}
    mapping = alpha_clip_key_map(list(ours))
    missing = sorted(k for k in mapping if k not in state)
    unexpected = sorted(k for k in state if k not in mapping and not k.endswith("num_batches_tracked"))
    target = {f"model.visual.{k}": v for k, v in ours.items()}
    target[ALPHA_KEY] = backbone.alpha_embed.conv.weight
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[mapping[k]].shape)}"
        for k in mapping
        if k in state and state[k].shape != target[mapping[k]].shape
    ]
    if missing or unexpected or mismatched:
        name = backbone.model_name or type(backbone).__name__
        details = []
        if missing:
            details.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            details.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if mismatched:
            details.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:2]})")
        raise AlphaCheckpointError(
            f"{path} is not an Alpha-CLIP visual checkpoint for {name}: " + "; ".join(details) + ". Check that "
            "the model name matches the checkpoint (clip_b16_* -> ViT-B-16, clip_l14_* -> ViT-L-14, "
            "clip_l14_336_* -> ViT-L-14-336); LoRA checkpoints are not supported."
        )
    prefix = len("model.visual.")
    visual_state = {mapping[k][prefix:]: v for k, v in state.items() if k in mapping and k != OFFICIAL_ALPHA_KEY}
    visual.load_state_dict(visual_state, strict=False)  # num_batches_tracked may be absent; all else checked above
    with torch.no_grad():
        backbone.alpha_embed.conv.weight.copy_(state[OFFICIAL_ALPHA_KEY])
    return backbone


def export_alpha_clip_visual(backbone: Backbone, path: str | Path) -> Path:
    """Write ``backbone``'s visual tower and alpha conv in the official Alpha-CLIP format (atomic).

    ``.safetensors`` or a torch file (``.pth``/``.pt``), loadable by :func:`load_alpha_clip_visual` and by the
    official ``alpha_clip.load(..., alpha_vision_ckpt_pth=...)`` for the architectures it knows.
    """
    from ..io import atomic_write, save_safetensors

    if backbone.alpha_embed is None:
        raise ValueError("the backbone has no alpha channel to export")
    visual = backbone.model.visual
    state = {_IN_PROJ.sub(r"\1in_proj.\2", k): v for k, v in visual.state_dict().items()}
    state[OFFICIAL_ALPHA_KEY] = backbone.alpha_embed.conv.weight
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        save_safetensors(state, path, metadata={"format": "alpha_clip_visual"})
    else:
        with atomic_write(path) as fh:
            torch.save(state, fh)
    return path
