"""open_clip models whose image tower is a timm model (``open_clip.timm_model.TimmModel``) as regionembed backbones.

Covers SigLIP and SigLIP2 (timm ``VisionTransformer`` without a class token, attention-pool ``map`` head), EVA02
(timm ``Eva``: rotary position embeddings, SwiGLU MLP, [CLS] pooling) and PE-Core (timm ``Eva`` in its
``vit_pe_core_*`` configuration: rotary embeddings with ``AttentionRope``, a [CLS] token, a pre-transformer norm and
an attention-pool ``map`` head). The open_clip CLIP around the tower provides the text side and the scales.

Tiny random-init architectures for tests (``re-tiny-siglip``, ``re-tiny-eva02``, ``re-tiny-pe``) are open_clip
configs in ``model_configs/`` whose ``timm_model_name`` is a tiny timm model registered here (open_clip passes no
size arguments to timm, so the size lives in the timm registry).

Users build these with ``OpenCLIPBackbone(model_name, ...)``, which returns an :class:`OpenCLIPTimmBackbone` for a
timm tower. SigLIP's tokenizer is a Hugging Face tokenizer that open_clip loads from the hub (``hf_tokenizer_name``);
offline, pass a local tokenizer folder as ``tokenizer=`` (see :class:`~regionembed.backbones.OpenCLIPBackbone`).
"""

from __future__ import annotations

from collections.abc import Sequence

import open_clip
import torch
from open_clip.timm_model import TimmModel
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models import eva, register_model
from timm.models import vision_transformer as timm_vit
from torch import nn

from .attention import UnsupportedModelError, attention_pool_forward, check_library_versions
from .base import AttentionPoolHead, BlockParts, TokenGridBackbone
from .open_clip import OpenCLIPBackbone
from .timm import eva_block_parts, vit_block_parts

__all__ = ["OpenCLIPTimmBackbone"]


# ------------------------------------------------------------------------------- tiny timm architectures
# Random-init test models: the named timm architecture (its blocks, head and preprocessing config) at a tiny size.
_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}


@register_model
def re_tiny_siglip(pretrained: bool = False, **kwargs) -> nn.Module:
    """``vit_base_patch16_siglip_224`` (no class token, ``map`` head) at 32 px, patch 8, width 48, depth 2."""
    return timm_vit.vit_base_patch16_siglip_224(pretrained=False, **{**_TINY, **kwargs})


@register_model
def re_tiny_eva02(pretrained: bool = False, **kwargs) -> nn.Module:
    """``eva02_base_patch16_clip_224`` (rotary embeddings, SwiGLU with its norm) at 32 px, patch 8, width 48."""
    return eva.eva02_base_patch16_clip_224(pretrained=False, **{**_TINY, "ref_feat_shape": (4, 4), **kwargs})


@register_model
def re_tiny_pe(pretrained: bool = False, **kwargs) -> nn.Module:
    """``vit_pe_core_base_patch16_224`` (``AttentionRope``, [CLS], pre-norm, ``map`` head) at 32 px, width 48."""
    tiny = {**_TINY, "ref_feat_shape": (4, 4), "attn_pool_num_heads": 3}
    return eva.vit_pe_core_base_patch16_224(pretrained=False, **{**tiny, **kwargs})


class OpenCLIPTimmBackbone(OpenCLIPBackbone, TokenGridBackbone, AttentionPoolHead):
    """An open_clip CLIP whose image tower is a timm ViT (SigLIP, SigLIP2, EVA02, PE-Core) as a regionembed backbone.

    Built by ``OpenCLIPBackbone(model_name, ...)`` for configs with a timm image tower (``ViT-B-16-SigLIP``,
    ``ViT-B-16-SigLIP2``, ``EVA02-B-16``, ``PE-Core-B-16``, ..., and the tiny ``re-tiny-siglip``, ``re-tiny-eva02``,
    ``re-tiny-pe``); takes the same arguments, with these differences:

    * ``image_size``: absolute positional embeddings are resampled and rotary embeddings rebuilt for the grid on the
      fly (the model's own parameters are never modified). A native size that is not a multiple of the patch size
      (``ViT-SO400M-14-SigLIP-384``) must be given explicitly: the error names the size with the same token grid.
    * ``alpha_checkpoint`` is refused: the released Alpha-CLIP checkpoints are OpenAI CLIP ViTs
      (``alpha_channel=True`` trains an alpha channel on these models).

    On an attention-pool model (SigLIP, PE) the capability :meth:`attention_pool_embed` drives LeGrad, rollout's pool
    row and MaskInversion's ``attention_pool`` strategy; EVA02 pools with its [CLS] token.
    """

    #: the released Alpha-CLIP checkpoints are OpenAI CLIP ViTs
    takes_alpha_checkpoints = False

    def _init_tower(self, image_size: int | None) -> int:
        check_library_versions("timm")
        model_name, visual = self.model_name, self.model.visual
        if not isinstance(visual, TimmModel):
            raise UnsupportedModelError(
                f"{model_name}: {type(self).__name__} needs an open_clip timm image tower, got "
                f"{type(visual).__name__}; build it with OpenCLIPBackbone({model_name!r}), which picks the adapter"
            )
        trunk = visual.trunk
        if type(trunk) not in (timm_vit.VisionTransformer, eva.Eva):
            raise UnsupportedModelError(
                f"{model_name}: timm {type(trunk).__name__} towers are not supported (supported: VisionTransformer "
                "as in SigLIP/SigLIP2, Eva as in EVA02/PE-Core)"
            )
        if type(trunk.patch_embed) is not PatchEmbed or not isinstance(trunk.patch_embed.proj, nn.Conv2d):
            raise UnsupportedModelError(
                f"{model_name}: the timm tower's {type(trunk.patch_embed).__name__} is not a plain patchify conv "
                "(hybrid stems such as MobileCLIP's are not supported)"
            )
        if len(visual.head) or getattr(trunk, "global_pool", "") not in ("map", "token", "avg"):
            raise UnsupportedModelError(f"{model_name}: open_clip timm_pool/timm_proj heads are not supported")
        if getattr(trunk, "rope_mixed", False) or trunk.patch_embed.dynamic_img_pad:
            raise UnsupportedModelError(f"{model_name}: mixed-mode rotary embeddings / padded inputs not supported")
        drop = getattr(trunk, "patch_drop", None)
        if drop is not None and not isinstance(drop, nn.Identity):
            raise UnsupportedModelError(f"{model_name}: patch dropout in the timm tower is not supported")
        self.num_prefix_tokens = int(trunk.num_prefix_tokens)
        self._patch = int(trunk.patch_embed.patch_size[0])
        self._native_grid = tuple(int(g) for g in trunk.patch_embed.grid_size)
        self._embed_dim = int(open_clip.get_model_config(model_name)["embed_dim"])
        native = int(visual.image_size[0])
        if image_size is None and native % self._patch:  # ViT-SO400M-14-SigLIP-384: timm's conv drops the remainder
            whole = native // self._patch * self._patch
            raise UnsupportedModelError(
                f"{model_name}: its native size {native} is not a multiple of the patch size {self._patch} (the "
                f"model's patchify conv drops the last {native - whole} pixels; regionembed's maps and masks cover "
                f"whole patches): pass image_size={whole}, the same {whole // self._patch}x{whole // self._patch} "
                "token grid"
            )
        size = int(image_size or native)
        if size % self._patch:
            raise ValueError(f"image_size {size} is not a multiple of the patch size {self._patch}")
        # rotary embeddings: EvaBlock.forward(x, rope=...) needs the grid's embedding; a pre-hook gives it to blocks
        # called as blk(x) (how the explainers run a tower block by block). Keyed by patch count, set by input_tokens.
        self._ropes: dict[int, torch.Tensor] = {}
        if getattr(trunk, "rope", None) is not None:
            for blk in trunk.blocks:
                blk.register_forward_pre_hook(self._give_rope, with_kwargs=True)
        return size

    # ----------------------------------------------------------------------------------------- properties
    @property
    def trunk(self) -> nn.Module:
        """The timm model inside open_clip's ``TimmModel``."""
        return self.model.visual.trunk

    @property
    def patch_size(self) -> int:
        return self._patch

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.trunk.blocks

    @property
    def rgb_stem_conv(self) -> nn.Conv2d:
        return self.trunk.patch_embed.proj

    # ------------------------------------------------------------------------------------------- forward
    def rotary_embedding(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """The tower's rotary embedding for a token grid (``[h*w, 2*dim]``), rebuilt when the grid is not native."""
        rope = getattr(self.trunk, "rope", None)
        if rope is None:
            return None
        if tuple(grid) == self._native_grid or not rope._use_cached_embed:
            return rope.get_embed(shape=list(grid))
        return rope._build_embed_cat(list(grid), rope.bands)  # cached mode ignores shape: build for this grid

    def _give_rope(self, block: nn.Module, args: tuple, kwargs: dict):
        if "rope" in kwargs or len(args) > 1:  # timm's own forward passes it
            return None
        x = args[0] if args else kwargs["x"]
        n = x.shape[1] - self.num_prefix_tokens
        if n not in self._ropes:
            raise RuntimeError(
                f"{self.model_name}: no rotary embedding for {n} patch tokens; run input_tokens() on the image first"
            )
        return args, {**kwargs, "rope": self._ropes[n]}

    def input_tokens(self, image: torch.Tensor) -> torch.Tensor:
        trunk = self.trunk
        pe = trunk.patch_embed
        x = pe.proj(image)  # [B, C, h, w] (rgb_stem_conv: the alpha channel hooks it)
        grid = tuple(int(g) for g in x.shape[-2:])
        x = pe.norm(x.flatten(2).transpose(1, 2))
        prefix = [t.expand(x.shape[0], -1, -1) for t in (trunk.cls_token, trunk.reg_token) if t is not None]
        pos = trunk.pos_embed
        if pos is not None and grid != self._native_grid:
            pos = resample_abs_pos_embed(
                pos,
                new_size=list(grid),
                old_size=list(self._native_grid),
                num_prefix_tokens=0 if trunk.no_embed_class else self.num_prefix_tokens,
            )
        if trunk.no_embed_class:
            x = x + pos if pos is not None else x
            x = torch.cat([*prefix, x], dim=1) if prefix else x
        else:
            x = torch.cat([*prefix, x], dim=1) if prefix else x
            x = x + pos if pos is not None else x
        x = trunk.pos_drop(x)
        rope = self.rotary_embedding(grid)
        if rope is not None:
            self._ropes[grid[0] * grid[1]] = rope
        return trunk.norm_pre(x)

    def _pool_input(self, tokens: torch.Tensor) -> torch.Tensor:
        # timm's ViT may keep the prefix tokens out of its attention pool (``pool_include_prefix``); Eva never does
        if getattr(self.trunk, "pool_include_prefix", True):
            return tokens
        return tokens[:, self.num_prefix_tokens :]

    def pool_tokens(self, tokens: torch.Tensor, explicit_attention: bool = False) -> torch.Tensor:
        """timm's pooling (the ``map`` attention pool, or the [CLS] token of EVA02) and the heads after it; with
        ``explicit_attention`` an attention pool runs :func:`~regionembed.backbones.attention.attention_pool_forward`
        (the same parameters; timm's own call goes to a fused kernel, which has no double backward)."""
        trunk = self.trunk
        x = trunk.norm(tokens)
        if not explicit_attention or trunk.attn_pool is None:
            return self._after_pool(trunk.pool(x))
        return self._after_pool(attention_pool_forward(trunk.attn_pool, self._pool_input(x), leaf_probs=False)[0])

    def _after_pool(self, pooled: torch.Tensor) -> torch.Tensor:
        """What follows the pool: fc norm, the timm head and open_clip's head (``[..., C] -> [..., D]``)."""
        trunk = self.trunk
        return self.model.visual.head(trunk.head(trunk.head_drop(trunk.fc_norm(pooled))))

    def legrad_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self._after_pool(self.trunk.norm(pooled))

    @property
    def has_attention_pool(self) -> bool:
        return getattr(self.trunk, "attn_pool", None) is not None

    def attention_pool_embed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own route (final norm, pool, head), as :meth:`pool_tokens`, with the pool's attention kept."""
        return self.legrad_pool_embed(self.trunk.norm(tokens))

    def legrad_pool_embed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The official LeGrad's SigLIP score: the pool and head on a block's raw output, without the tower's final
        norm (``trunk.norm``), with the pool's attention kept."""
        pool = getattr(self.trunk, "attn_pool", None)
        if pool is None:
            raise UnsupportedModelError(
                f"{self.model_name} pools with its {self.trunk.global_pool!r} token, not an attention pool; LeGrad "
                "runs the mean-token recipe on it"
            )
        pooled, probs = attention_pool_forward(pool, self._pool_input(tokens))
        return self._after_pool(pooled), probs

    def block_parts(self, block: nn.Module) -> BlockParts | None:
        # timm's plain ViT block (SigLIP) and EVA01's pre-norm EvaBlock fit the formulas; EVA02's SwiGLU
        # (fc2(norm(silu(w1 x) * w2 x))), its attention's inner norm and EVA02-E's post-norm blocks do not (``None``:
        # the solver runs naive)
        if isinstance(block, eva.EvaBlock | eva.EvaBlockPostNorm):
            return eva_block_parts(block)
        return vit_block_parts(block)
