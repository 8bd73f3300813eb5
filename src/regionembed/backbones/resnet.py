"""open_clip ``ModifiedResNet`` image towers (RN50, RN101, ...) as a :class:`FeatureMapBackbone`.

A ResNet has no tokens and no attention blocks: it is not a :class:`TokenGridBackbone`, so LeGrad, attention
rollout and the decomposed MaskInversion strategies refuse it (naming the CAM explainers). What it offers is a
convolutional feature pyramid (:meth:`OpenCLIPResNetBackbone.feature_maps`) and the attention-pooling head on top of
it (:meth:`OpenCLIPResNetBackbone.pool_features`), which is what the CAM family (Grad-CAM, Score-CAM, VL-Score) needs.
"""

from __future__ import annotations

import torch
from open_clip.modified_resnet import ModifiedResNet
from timm.layers import resample_abs_pos_embed
from torch import nn
from torch.func import functional_call

from .attention import UnsupportedModelError
from .base import FeatureMapBackbone
from .open_clip import OpenCLIPBackbone

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


class OpenCLIPResNetBackbone(OpenCLIPBackbone, FeatureMapBackbone):
    """An open_clip CLIP model with a ``ModifiedResNet`` image tower as a regionembed backbone.

    ``OpenCLIPBackbone("RN50", ...)`` builds this adapter (it takes the same arguments, model name first, see
    :class:`~regionembed.backbones.open_clip.OpenCLIPBackbone`). Images must have sides that are multiples of the
    total stride (32): :attr:`patch_size` is 32 so that :meth:`check_image` and :meth:`grid_size` describe the
    ``layer4`` grid. At sizes other than the native one the attention pool's positional embedding is resampled
    (bicubic, on the fly, as for ViTs); the model's parameters are never modified. The alpha channel joins after
    ``conv1`` (:attr:`rgb_stem_conv`): ``act1(bn1(conv1(x) + alpha_embed(alpha)))``, as Alpha-CLIP's RN variant.
    """

    def _init_tower(self, image_size: int | None) -> int:
        visual = self.model.visual
        if not isinstance(visual, ModifiedResNet):
            raise UnsupportedModelError(
                f"{self.model_name}: OpenCLIPResNetBackbone needs an open_clip ModifiedResNet image tower (RN50, ...); "
                f"build it with OpenCLIPBackbone({self.model_name!r}), which picks the adapter"
            )
        self._stride = 32  # stem /4 (conv1 stride 2 + avgpool 2), then layer2..layer4 halve the grid each
        native = int(visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0])
        self._native_grid = (native // self._stride, native // self._stride)
        size = int(image_size or native)
        if size % self._stride:
            raise ValueError(f"image_size {size} is not a multiple of the ResNet's total stride {self._stride}")
        # BatchNorm stays in eval mode (the model is put in eval): items of a batch never interact
        return size

    # ----------------------------------------------------------------------------------------- properties
    @property
    def patch_size(self) -> int:
        """The total stride (32): image sides must be multiples of it; :meth:`grid_size` is the ``layer4`` grid."""
        return self._stride

    @property
    def feature_dim(self) -> int:
        """Channels C of the ``layer4`` feature map (2048 for RN50)."""
        return int(self.model.visual.attnpool.k_proj.in_features)

    @property
    def stages(self) -> tuple[str, ...]:
        """Names of the residual stages, in order (``layer1`` ... ``layer4``)."""
        return STAGES

    # ------------------------------------------------------------------------------------------- forward
    def stem(self, image: torch.Tensor) -> torch.Tensor:
        """The 3-conv stem and its average pool: ``[B, 3, H, W] -> [B, width, H/4, W/4]``."""
        v = self.model.visual
        x = v.act1(v.bn1(v.conv1(image)))
        x = v.act2(v.bn2(v.conv2(x)))
        x = v.act3(v.bn3(v.conv3(x)))
        return v.avgpool(x)

    def forward_stages(self, image: torch.Tensor, stage: str) -> torch.Tensor:
        x = self.stem(image)
        for name in STAGES[: STAGES.index(stage) + 1]:
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
        self, feats: torch.Tensor, layer: int | str = -1, explicit_attention: bool = False
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
