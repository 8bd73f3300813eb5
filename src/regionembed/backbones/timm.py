"""timm vision transformers as a :class:`~regionembed.backbones.base.TokenGridBackbone` (image only)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import timm
import torch
from timm.layers import LayerScale, Mlp
from timm.models.eva import EvaAttention, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .attention import UnsupportedModelError, check_library_versions
from .base import BlockParts, PreprocessSpec, TokenGridBackbone
from .weights import (
    hub_offline,
    looks_like_path,
    normalize_pretrained,
    offline_error,
    resolve_local_file,
    weights_error,
)


class TimmBackbone(TokenGridBackbone):
    """A timm ``VisionTransformer`` as a regionembed backbone.

    The embedding space is the model head's output (class logits, or features when ``num_classes=0``); there is no
    text tower, so targets are embeddings such as classifier weights or MaskInversion tokens.

    Args:
        model_name: a timm ViT name (``timm.list_models("vit_*")``), e.g. ``test_vit`` for tests.
        pretrained: ``None``/``False`` for random init, ``True`` for timm's default hub weights, or a local
            weights file.
        image_size: square input side (positional embeddings resampled by timm's dynamic image size).
        num_classes: override the head size (``0`` keeps pooled features).
        alpha_channel: add Alpha-CLIP's zero-initialised alpha conv beside ``patch_embed.proj``
            (:mod:`regionembed.backbones.alpha`).
    """

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        pretrained: bool | str | None = None,
        image_size: int | None = None,
        num_classes: int | None = None,
        alpha_channel: bool = False,
    ) -> None:
        super().__init__()
        check_library_versions("timm")
        self.model_name = model_name
        kwargs: dict = {"dynamic_img_size": True}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        self.pretrained = pretrained = normalize_pretrained(pretrained)
        if isinstance(pretrained, str) and pretrained:
            kwargs["pretrained_cfg_overlay"] = {"file": resolve_local_file(pretrained)}
            load = True
        elif pretrained is True:
            if hub_offline() and not os.environ.get("HF_HUB_OFFLINE"):
                raise offline_error(
                    f"timm weights {model_name}",
                    f"TimmBackbone({model_name!r}, pretrained='/path/to/model.safetensors')",
                )
            load = True
        else:
            load = False
        if isinstance(pretrained, str) and pretrained and not looks_like_path(pretrained):
            raise ValueError(f"pretrained must be a bool or a weights file, got {pretrained!r}")
        try:
            self.model = timm.create_model(model_name, pretrained=load, **kwargs)
        except Exception as err:
            if isinstance(pretrained, str) and pretrained:
                raise weights_error(pretrained, err, model_name) from err
            if pretrained is True and hub_offline():
                raise offline_error(f"timm weights {model_name}", "pretrained='/path/to/model.safetensors'") from err
            raise
        if not isinstance(self.model, VisionTransformer) or self.model.attn_pool is not None:
            raise UnsupportedModelError(f"{model_name}: only timm VisionTransformer without attention pooling")
        self.num_prefix_tokens = int(self.model.num_prefix_tokens)
        self._patch = int(self.model.patch_embed.patch_size[0])
        cfg = timm.data.resolve_model_data_config(self.model)
        size = int(image_size or cfg["input_size"][-1])
        if size % self._patch:
            raise ValueError(f"image_size {size} is not a multiple of the patch size {self._patch}")
        self._preprocess = PreprocessSpec(
            size=size,
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
            interpolation=str(cfg.get("interpolation", "bicubic")),
            resize_mode="shortest",
        )
        if alpha_channel:
            self.enable_alpha()
        self.model.eval()

    @property
    def patch_size(self) -> int:
        return self._patch

    @property
    def embed_dim(self) -> int:
        return int(self.model.num_classes or self.model.num_features)

    @property
    def preprocess(self) -> PreprocessSpec:
        return self._preprocess

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.model.blocks

    @property
    def rgb_stem_conv(self) -> nn.Conv2d:
        return self.model.patch_embed.proj

    def input_tokens(self, image: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(image)  # proj -> layout -> norm: the alpha channel joins right after proj (its hook)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def pool_tokens(self, tokens: torch.Tensor, explicit_attention: bool = False) -> torch.Tensor:
        # attention-pool ViTs are refused at construction: the head has no attention, ``explicit_attention`` is moot
        return self.model.forward_head(self.model.norm(tokens))

    def legrad_head(self, pooled: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.head(m.fc_norm(m.norm(pooled)))

    def block_parts(self, block: nn.Module) -> BlockParts | None:
        return vit_block_parts(block)

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, image_size={self.preprocess.size}"


def vit_block_parts(block: nn.Module) -> BlockParts | None:
    """:class:`BlockParts` of a plain timm ViT ``Block`` (``x + fc2(act(fc1(norm2(x))))``), or ``None`` for any other
    block: gated or inner-normed attention, SwiGLU or normed MLPs (EVA02's blocks, for one) do not fit the formulas
    of the decomposed MaskInversion strategies."""
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    plain = (
        isinstance(block, Block)
        and isinstance(block.norm2, nn.LayerNorm)
        and isinstance(attn.norm, nn.Identity)
        and getattr(attn, "gate", None) is None
        and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)
        and hasattr(mlp, "fc1")
        and hasattr(mlp, "fc2")
    )
    if not plain:
        return None
    ls1 = block.ls1.gamma if isinstance(block.ls1, LayerScale) else None
    ls2 = block.ls2.gamma if isinstance(block.ls2, LayerScale) else None
    return _timm_block_parts(block, ls1, ls2)


def eva_block_parts(block: nn.Module) -> BlockParts | None:
    """:class:`BlockParts` of a timm ``EvaBlock`` of EVA01's form, or ``None`` for any other block.

    EVA01's blocks (``eva_giant_patch14_*``) are pre-norm: ``x + gamma_1 * proj(attn(norm1(x)))`` and
    ``x + gamma_2 * fc2(act(fc1(norm2(x))))`` with a GELU ``Mlp``, the optional layer scales ``gamma_1``/``gamma_2``
    and ``EvaAttention``'s q/v biases (which only shape the attention probabilities and ``V``, not the block's tail).
    EVA02's variants do not fit the formulas, told apart by these attributes in timm 1.0: its MLP is gated
    (``block.mlp`` a ``SwiGLU``, with an inner norm under ``scale_mlp``, or a ``GluMlp``; an ``Mlp`` with a norm,
    ``mlp.norm``, is refused too), its attention norms its output before ``proj`` (``scale_attn_inner``: ``attn.norm``
    is a ``LayerNorm``), and EVA02-E's blocks are ``EvaBlockPostNorm`` (normed after each branch). A gated attention
    (``attn.gate``) or timm's ``AttentionRope`` (PE-Core) is not taken either.
    """
    # exact types: EvaBlockPostNorm is a sibling class, SwiGLU/GluMlp are not Mlp subclasses, and a subclass could
    # change the forward the formulas describe
    if type(block) is not EvaBlock:
        return None
    attn, mlp = block.attn, block.mlp
    plain = (
        type(attn) is EvaAttention
        and isinstance(attn.norm, nn.Identity)
        and attn.gate is None
        and type(mlp) is Mlp
        and isinstance(mlp.norm, nn.Identity)
        and isinstance(mlp.fc1, nn.Linear)  # not Mlp(use_conv=True)
        and isinstance(block.norm2, nn.LayerNorm)
    )
    if not plain:
        return None
    return _timm_block_parts(block, block.gamma_1, block.gamma_2)


def _timm_block_parts(block: nn.Module, ls1: torch.Tensor | None, ls2: torch.Tensor | None) -> BlockParts:
    """:class:`BlockParts` of a timm pre-norm block whose form was checked: ``block.attn`` (heads, ``proj``),
    ``block.norm2``, ``block.mlp`` (``fc1``, ``act``, ``fc2``) and the layer scales ``ls1``/``ls2`` ``[C]``."""
    attn, mlp = block.attn, block.mlp
    return BlockParts(
        num_heads=attn.num_heads,
        head_dim=attn.head_dim,
        out_proj_weight=attn.proj.weight,
        norm2=block.norm2,
        fc1=mlp.fc1,
        act=mlp.act,
        fc2=mlp.fc2,
        ls1=ls1,
        ls2=ls2,
    )
