"""open_clip ``ModifiedResNet`` image towers (RN50, RN101, ...) behind the :class:`Backbone` interface.

A ResNet has no tokens and no attention blocks, so the ViT-only members of :class:`Backbone` (``blocks``,
``embed_tokens``, ``pool_tokens``, ``legrad_head``, ``block_parts``) raise ``NotImplementedError``: LeGrad and the
decomposed MaskInversion strategies need a ViT. What a ResNet offers instead is a convolutional feature pyramid
(:meth:`OpenCLIPResNetBackbone.feature_maps`) and the attention-pooling head on top of it
(:meth:`OpenCLIPResNetBackbone.pool_features`), which is what the CAM family (Grad-CAM, Score-CAM, VL-Score) needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.modified_resnet import ModifiedResNet
from timm.layers import resample_abs_pos_embed
from torch import nn
from torch.func import functional_call

from .attention import UnsupportedModelError, check_library_versions
from .base import Backbone, BlockParts
from .open_clip import OpenCLIPModelMixin, _create_open_clip
from .weights import normalize_pretrained

__all__ = ["OpenCLIPResNetBackbone"]

#: the residual stages of a ModifiedResNet, in order; ``feature_maps`` and ``pool_features`` take these names
STAGES = ("layer1", "layer2", "layer3", "layer4")


def _explicit_attnpool(pool: nn.Module, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """open_clip's ``AttentionPool2d`` with an explicit softmax: ``[B, C, h, w] -> [B, D]``.

    Only the first (mean) token's query is computed: it is the only output open_clip keeps.
    """
    b, c = x.shape[:2]
    x = x.flatten(2).transpose(1, 2)  # [B, hw, C]
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pos.to(x.dtype)  # [B, 1 + hw, C]
    h = pool.num_heads
    dh = c // h
    q = pool.q_proj(x[:, :1]).view(b, 1, h, dh).transpose(1, 2)  # [B, H, 1, dh]
    k = pool.k_proj(x).view(b, -1, h, dh).transpose(1, 2)  # [B, H, T, dh]
    v = pool.v_proj(x).view(b, -1, h, dh).transpose(1, 2)
    probs = ((q * dh**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, 1, T]
    return pool.c_proj((probs @ v).transpose(1, 2).reshape(b, c))


class OpenCLIPResNetBackbone(OpenCLIPModelMixin, Backbone):
    """An open_clip CLIP model with a ``ModifiedResNet`` image tower as a regionembed backbone.

    Images must have sides that are multiples of the total stride (32): :attr:`patch_size` is 32 so that
    :meth:`check_image` and :meth:`grid_size` describe the ``layer4`` grid. At sizes other than the native one the
    attention pool's positional embedding is resampled (bicubic, on the fly, as :class:`OpenCLIPBackbone` does for
    ViTs); the model's parameters are never modified.

    Args:
        model_name: an open_clip ResNet config (``RN50``, ``RN101``, ``RN50x4``, ...) or ``re-tiny-rn`` (tests).
        pretrained: ``None`` for random init, an open_clip pretrained tag (needs the hub; fails fast offline), a
            local weights file, or ``regionembed:<name>``; loaded by the same factory as :class:`OpenCLIPBackbone`.
        image_size: square input side (multiple of 32). Defaults to the model's native size.
        cache_dir: open_clip download cache.
        alpha_channel: add the zero-initialised alpha conv (:meth:`Backbone.enable_alpha`) beside ``conv1``.
        alpha_checkpoint: an Alpha-CLIP visual checkpoint (``conv1_alpha.weight`` plus the ResNet's keys, or our
            export) that replaces the visual tower and alpha conv (``alpha.load_alpha_clip_visual``); implies
            ``alpha_channel``.
    """

    def __init__(
        self,
        model_name: str = "RN50",
        pretrained: str | None = None,
        image_size: int | None = None,
        cache_dir: str | None = None,
        alpha_channel: bool = False,
        alpha_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        check_library_versions("open_clip")
        self.model_name = model_name
        self.pretrained = pretrained = normalize_pretrained(pretrained)
        self.model = _create_open_clip(model_name, pretrained, cache_dir)
        visual = self.model.visual
        if not isinstance(visual, ModifiedResNet):
            raise UnsupportedModelError(
                f"{model_name}: OpenCLIPResNetBackbone needs an open_clip ModifiedResNet image tower (RN50, ...); "
                "use OpenCLIPBackbone for ViTs"
            )
        self._stride = 32  # stem /4 (conv1 stride 2 + avgpool 2), then layer2..layer4 halve the grid each
        native = int(visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0])
        self._native_grid = (native // self._stride, native // self._stride)
        size = int(image_size or native)
        if size % self._stride:
            raise ValueError(f"image_size {size} is not a multiple of the ResNet's total stride {self._stride}")
        # BatchNorm in eval mode: items of a batch never interact (explainers rely on it)
        self._init_open_clip(size, alpha_channel, alpha_checkpoint)

    # ----------------------------------------------------------------------------------------- properties
    @property
    def patch_size(self) -> int:
        """The total stride (32): image sides must be multiples of it; :meth:`grid_size` is the ``layer4`` grid."""
        return self._stride

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def feature_dim(self) -> int:
        """Channels C of the ``layer4`` feature map (2048 for RN50)."""
        return int(self.model.visual.attnpool.k_proj.in_features)

    @property
    def stages(self) -> tuple[str, ...]:
        """Names of the residual stages, in order (``layer1`` ... ``layer4``)."""
        return STAGES

    # --------------------------------------------------------------------- ViT-only parts of the contract
    def _no_tokens(self, what: str) -> NotImplementedError:
        return NotImplementedError(
            f"{type(self).__name__} ({self.model_name}) is a ResNet: it has no {what}. Token/attention methods "
            "(LeGrad, attention rollout, the decomposed MaskInversion strategies) need a ViT backbone; use "
            "feature_maps()/pool_features() and a CAM explainer (GradCAM, ScoreCAM, VLScore) instead"
        )

    @property
    def blocks(self) -> Sequence[nn.Module]:
        raise self._no_tokens("transformer blocks")

    def embed_tokens(self, image: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        raise self._no_tokens("tokens")

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        raise self._no_tokens("tokens")

    def legrad_head(self, pooled: torch.Tensor) -> torch.Tensor:
        raise self._no_tokens("LeGrad head")

    def block_parts(self, block: nn.Module) -> BlockParts:
        raise self._no_tokens("transformer blocks")

    def forward_blocks(self, tokens: torch.Tensor, stop: int | None = None) -> torch.Tensor:
        raise self._no_tokens("transformer blocks")

    def layer_indices(self, layers: Sequence[int]) -> list[int]:
        """Resolve stage indices (``0..3`` = ``layer1..layer4``, negative allowed) to sorted unique ones.

        A ResNet's "layers" are its four residual stages, so that generic code (e.g. the MaskInversion solver driven
        by a CAM explainer) can validate layer indices without transformer blocks.
        """
        n = len(STAGES)
        out = []
        for layer in layers:
            if not -n <= layer < n:
                raise ValueError(f"layer index {layer} is out of range for a ResNet with {n} stages")
            out.append(layer % n)
        return sorted(set(out))

    # ------------------------------------------------------------------------------------------- forward
    def stage_name(self, layer: int | str) -> str:
        """Normalise a stage given by name (``"layer4"``) or index (``3``, ``-1``) to its name."""
        if isinstance(layer, str):
            if layer not in STAGES:
                raise ValueError(f"unknown ResNet stage {layer!r}; expected one of {STAGES}")
            return layer
        return STAGES[self.layer_indices([int(layer)])[0]]

    def stem(self, image: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """The 3-conv stem and its average pool: ``[B, 3, H, W] -> [B, width, H/4, W/4]``.

        The alpha branch joins after ``conv1``: ``act1(bn1(conv1(x) + alpha_embed(alpha)))`` (Alpha-CLIP's RN
        variant adds the alpha conv to the first conv's output).
        """
        v = self.model.visual
        x = self.add_alpha(v.conv1(image), alpha, image)
        x = v.act1(v.bn1(x))
        x = v.act2(v.bn2(v.conv2(x)))
        x = v.act3(v.bn3(v.conv3(x)))
        return v.avgpool(x)

    def feature_maps(
        self, image: torch.Tensor, layer: int | str = "layer4", alpha: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Activations after a residual stage.

        Args:
            image: ``[B, 3, H, W]`` normalised image, sides multiples of 32.
            layer: stage name (``"layer1"`` ... ``"layer4"``) or index (``-1`` = ``layer4``).
            alpha: optional normalised alpha map ``[B, 1, H, W]`` (needs an alpha channel).

        Returns:
            ``[B, C, h, w]``; for ``layer4`` ``C = feature_dim`` and ``(h, w) = grid_size(image)``.
        """
        self.check_image(image)
        stop = STAGES.index(self.stage_name(layer))
        x = self.stem(image, alpha=alpha)
        for name in STAGES[: stop + 1]:
            x = getattr(self.model.visual, name)(x)
        return x

    def attnpool_positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """``[1 + h*w, C]`` attention-pool positional embedding for a ``layer4`` grid, resampled when it differs."""
        pos = self.model.visual.attnpool.positional_embedding
        if tuple(grid) == self._native_grid:
            return pos
        return resample_abs_pos_embed(
            pos.unsqueeze(0), new_size=list(grid), old_size=list(self._native_grid), num_prefix_tokens=1
        )[0]

    def pool_features(
        self, feats: torch.Tensor, layer: int | str = "layer4", explicit_attention: bool = False
    ) -> torch.Tensor:
        """Run the stages after ``layer`` and the attention pool: ``[B, C, h, w] -> [B, D]`` (not normalised).

        At a non-native grid the attention pool runs with a resampled positional embedding passed through
        ``torch.func.functional_call`` (open_clip's own forward, the module untouched).

        Args:
            feats: activations after ``layer``.
            layer: the stage ``feats`` come from.
            explicit_attention: compute the attention pool with an explicit softmax instead of open_clip's fused
                kernel (equal up to rounding), which has no double backward; needed for gradients of gradients
                (e.g. Grad-CAM driving MaskInversion).
        """
        if feats.ndim != 4:
            raise ValueError(f"expected feature maps [B, C, h, w], got {tuple(feats.shape)}")
        start = STAGES.index(self.stage_name(layer)) + 1
        x = feats
        for name in STAGES[start:]:
            x = getattr(self.model.visual, name)(x)
        pool = self.model.visual.attnpool
        grid = tuple(x.shape[-2:])
        if explicit_attention:
            return _explicit_attnpool(pool, x, self.attnpool_positional_embedding(grid))
        if grid == self._native_grid:
            return pool(x)
        return functional_call(pool, {"positional_embedding": self.attnpool_positional_embedding(grid)}, (x,))

    def encode_image(
        self, image: torch.Tensor, normalize: bool = False, alpha: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embed images ``[B, 3, H, W] -> [B, D]`` (sides multiples of 32; ``alpha`` ``[B, 1, H, W]`` optional)."""
        feats = self.pool_features(self.feature_maps(image, "layer4", alpha=alpha))
        return nn.functional.normalize(feats, dim=-1) if normalize else feats
