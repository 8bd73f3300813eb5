"""open_clip models whose image tower is a timm model (``open_clip.timm_model.TimmModel``) as regionembed backbones.

Covers SigLIP and SigLIP2 (timm ``VisionTransformer`` without a class token, attention-pool ``map`` head), EVA02
(timm ``Eva``: rotary position embeddings, SwiGLU MLP, [CLS] pooling) and PE-Core (timm ``Eva`` in its
``vit_pe_core_*`` configuration: rotary embeddings with ``AttentionRope``, a [CLS] token, a pre-transformer norm and
an attention-pool ``map`` head). The open_clip CLIP around the tower provides the text side and the scales.

Tiny random-init architectures for tests (``re-tiny-siglip``, ``re-tiny-eva02``, ``re-tiny-pe``) are open_clip
configs in ``model_configs/`` whose ``timm_model_name`` is a tiny timm model registered here (open_clip passes no
size arguments to timm, so the size lives in the timm registry).

SigLIP's tokenizer is a Hugging Face tokenizer that open_clip loads from the hub (``hf_tokenizer_name``). Offline,
pass a local tokenizer folder (saved with ``save_pretrained``, or a snapshot of the hub repository) as
``tokenizer=``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import open_clip
import torch
from open_clip.timm_model import TimmModel
from timm.layers import LayerScale, PatchEmbed, resample_abs_pos_embed
from timm.models import eva, register_model
from timm.models import vision_transformer as timm_vit
from torch import nn

from .attention import UnsupportedModelError, attention_pool_forward, check_library_versions
from .base import AttentionPoolHead, Backbone, BlockParts
from .open_clip import OpenCLIPModelMixin, _create_open_clip, get_tokenizer
from .weights import PretrainedWeightsUnavailable, hub_offline, normalize_pretrained

__all__ = ["OpenCLIPTimmBackbone", "is_timm_tower"]


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


def is_timm_tower(model_name: str) -> bool:
    """Whether the open_clip config ``model_name`` has a timm image tower (``vision_cfg.timm_model_name``)."""
    cfg = open_clip.get_model_config(model_name) or {}
    return bool(cfg.get("vision_cfg", {}).get("timm_model_name"))


class _NoTokenizer:
    """Stands in for the tokenizer of a backbone built with ``tokenizer=False`` (image-side use only)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    def __call__(self, texts) -> torch.Tensor:
        raise ValueError(
            f"{self.model_name} was built with tokenizer=False (no text side); pass tokenizer='/path/to/folder' "
            "(or None to load it from the hub) to tokenize texts"
        )


def _hf_tokenizer(model_name: str, tokenizer: str | bool | None):
    """open_clip's tokenizer for ``model_name``; a Hugging Face one from the local folder ``tokenizer`` if given.

    Raises:
        PretrainedWeightsUnavailable: the hub tokenizer cannot be downloaded (offline), naming ``tokenizer=``.
        ValueError: ``tokenizer`` is given for a model whose tokenizer is not a Hugging Face one, or is no folder.
    """
    if tokenizer is False:
        return _NoTokenizer(model_name)
    if tokenizer is True:
        tokenizer = None
    text_cfg = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})
    hub_name = text_cfg.get("hf_tokenizer_name")
    if hub_name and importlib.util.find_spec("transformers") is None:
        raise ImportError(
            f"{model_name}'s tokenizer is a Hugging Face tokenizer: pip install 'regionembed[siglip]' (transformers), "
            "or pass tokenizer=False for image-side use only"
        )
    if tokenizer is not None:
        if not hub_name:
            raise ValueError(
                f"tokenizer={tokenizer!r}: {model_name} uses open_clip's built-in tokenizer (no Hugging Face "
                "tokenizer to replace); leave tokenizer unset"
            )
        if not os.path.isdir(tokenizer):
            raise ValueError(f"tokenizer={tokenizer!r} is not a folder (a tokenizer saved with save_pretrained)")
        from open_clip.tokenizer import HFTokenizer

        return HFTokenizer(
            tokenizer,
            context_length=text_cfg.get("context_length", 77),
            **text_cfg.get("tokenizer_kwargs", {}),
        )
    if not hub_name:
        return None
    offline = hub_offline()
    if offline and not os.environ.get("HF_HUB_OFFLINE"):  # unreachable: fail now instead of after long retries
        raise _tokenizer_offline_error(model_name, hub_name)
    try:
        return open_clip.get_tokenizer(model_name)
    except Exception as err:  # hub and transformers raise many types; re-raise with the way out
        if offline:
            raise _tokenizer_offline_error(model_name, hub_name) from err
        raise


def _tokenizer_offline_error(model_name: str, hub_name: str) -> PretrainedWeightsUnavailable:
    reason = (
        f"the Hugging Face tokenizer {hub_name} of {model_name} must be downloaded from the Hugging Face hub, which "
        "is not reachable from this machine (or HF_HUB_OFFLINE is set and no cached copy exists)"
    )
    return PretrainedWeightsUnavailable(
        f"{reason}. Save it on a machine with network access, e.g. `AutoTokenizer.from_pretrained({hub_name!r})"
        ".save_pretrained('tokenizer_folder')`, and pass the folder: "
        f"OpenCLIPTimmBackbone({model_name!r}, tokenizer='/path/to/tokenizer_folder') "
        "(YAML: backbone.init_args.tokenizer)",
        reason=reason,
    )


class OpenCLIPTimmBackbone(OpenCLIPModelMixin, AttentionPoolHead, Backbone):
    """An open_clip CLIP whose image tower is a timm ViT (SigLIP, SigLIP2, EVA02, PE-Core) as a regionembed backbone.

    Args:
        model_name: an open_clip config with a timm image tower (``ViT-B-16-SigLIP``, ``ViT-B-16-SigLIP2``,
            ``EVA02-B-16``, ``PE-Core-B-16``, ...) or a tiny regionembed config (``re-tiny-siglip``,
            ``re-tiny-eva02``, ``re-tiny-pe``).
        pretrained: ``None`` for random init, an open_clip pretrained tag (needs the hub), or a local weights file.
        image_size: square input side; absolute positional embeddings are resampled and rotary embeddings rebuilt
            for the grid on the fly (the model's own parameters are never modified). Defaults to the native size.
        cache_dir: open_clip download cache.
        alpha_channel: add Alpha-CLIP's zero-initialised alpha conv beside the patch embedding.
        alpha_checkpoint: not available for timm towers (the released Alpha-CLIP checkpoints are OpenAI CLIP ViTs).
        tokenizer: a local folder holding the model's Hugging Face tokenizer (``save_pretrained`` output or a hub
            snapshot) for configs whose tokenizer comes from the hub (SigLIP, SigLIP2); ``None`` loads it from the
            hub (or fails at once offline, naming this argument); ``False`` builds no tokenizer (image-side use
            only: explainers and MaskInversion with given targets, benchmarks; ``tokenize`` then raises).

    On an attention-pool model (SigLIP, PE) the capability :meth:`attention_pool_embed` drives LeGrad.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-16-SigLIP",
        pretrained: str | None = None,
        image_size: int | None = None,
        cache_dir: str | None = None,
        alpha_channel: bool = False,
        alpha_checkpoint: str | None = None,
        tokenizer: str | bool | None = None,
    ) -> None:
        super().__init__()
        check_library_versions("open_clip")
        check_library_versions("timm")
        if alpha_checkpoint:
            raise UnsupportedModelError(
                f"{model_name}: Alpha-CLIP checkpoints exist for OpenAI CLIP ViTs only (OpenCLIPBackbone('ViT-B-16', "
                "alpha_checkpoint=...)); use alpha_channel=True to train an alpha channel on this model"
            )
        if model_name in open_clip.list_models() and not is_timm_tower(model_name):
            raise UnsupportedModelError(
                f"{model_name} has no timm image tower; use OpenCLIPBackbone({model_name!r}) instead"
            )
        self.model_name = model_name
        self.pretrained = pretrained = normalize_pretrained(pretrained)
        self.tokenizer_path = tokenizer
        hf_tokenizer = _hf_tokenizer(model_name, tokenizer)  # before the weights: fail fast on the cheap part
        self.model = _create_open_clip(model_name, pretrained, cache_dir)
        visual = self.model.visual
        if not isinstance(visual, TimmModel):
            raise UnsupportedModelError(f"{model_name}: the image tower is {type(visual).__name__}, not a timm tower")
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
        size = int(image_size or visual.image_size[0])
        if size % self._patch:
            raise ValueError(f"image_size {size} is not a multiple of the patch size {self._patch}")
        # rotary embeddings: EvaBlock.forward(x, rope=...) needs the grid's embedding; a pre-hook gives it to blocks
        # called as blk(x) (how the explainers run a tower block by block). Keyed by patch count, set by embed_tokens.
        self._ropes: dict[int, torch.Tensor] = {}
        if getattr(trunk, "rope", None) is not None:
            for blk in trunk.blocks:
                blk.register_forward_pre_hook(self._give_rope, with_kwargs=True)
        self._hf_tokenizer = hf_tokenizer
        self._init_open_clip(size, alpha_channel, None)

    def _make_tokenizer(self):
        if self._hf_tokenizer is None:
            return get_tokenizer(self.model_name, self.model)
        if isinstance(self._hf_tokenizer, _NoTokenizer):
            return self._hf_tokenizer
        text = getattr(self.model, "text", self.model)
        rows = getattr(getattr(text, "token_embedding", None), "num_embeddings", None)
        ids = len(self._hf_tokenizer.tokenizer)
        if rows is not None and ids > rows:
            raise ValueError(
                f"tokenizer={self.tokenizer_path!r} has {ids} ids but {self.model_name}'s text tower has {rows} "
                "token embeddings"
            )
        return self._hf_tokenizer

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

    @property
    def logit_bias(self) -> torch.Tensor | None:
        """SigLIP's learned bias of the sigmoid loss (``None`` for softmax-trained models)."""
        return getattr(self.model, "logit_bias", None)

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
                f"{self.model_name}: no rotary embedding for {n} patch tokens; run embed_tokens() on the image first"
            )
        return args, {**kwargs, "rope": self._ropes[n]}

    def embed_tokens(self, image: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        trunk = self.trunk
        pe = trunk.patch_embed
        x = self.add_alpha(pe.proj(image), alpha, image)  # [B, C, h, w]: the alpha branch joins right after proj
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

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        trunk = self.trunk
        x = trunk.norm(tokens)
        if trunk.attn_pool is None:
            return self._after_pool(trunk.pool(x))
        # the explicit pool (same parameters, same outputs): SDPA has no double backward, which Grad-CAM inside
        # MaskInversion needs
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
        pool = getattr(self.trunk, "attn_pool", None)
        if pool is None:
            raise UnsupportedModelError(
                f"{self.model_name} pools with its {self.trunk.global_pool!r} token, not an attention pool; LeGrad "
                "runs the mean-token recipe on it"
            )
        pooled, probs = attention_pool_forward(pool, self._pool_input(tokens))
        return self._after_pool(pooled), probs

    def block_parts(self, block: nn.Module) -> BlockParts:
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        plain = (
            type(block) is timm_vit.Block
            and isinstance(block.norm2, nn.LayerNorm)
            and isinstance(attn.norm, nn.Identity)
            and getattr(attn, "gate", None) is None
            and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)
            and hasattr(mlp, "fc1")
            and hasattr(mlp, "fc2")
        )
        if not plain:
            # EVA02's SwiGLU (fc2(norm(silu(w1 x) * w2 x))) and its attention's inner norm do not fit the
            # fc2(act(fc1(x))) formulas of the decomposed strategies; only timm's plain ViT block is described
            raise NotImplementedError(
                f"no gradient decomposition for {type(block).__name__} with {type(mlp).__name__} (the decomposed "
                "strategies are written for timm's plain ViT Block, x + fc2(act(fc1(norm2(x))))); use "
                "strategy='naive'"
            )
        return BlockParts(
            num_heads=attn.num_heads,
            head_dim=attn.head_dim,
            out_proj_weight=attn.proj.weight,
            norm2=block.norm2,
            fc1=mlp.fc1,
            act=mlp.act,
            fc2=mlp.fc2,
            ls1=block.ls1.gamma if isinstance(block.ls1, LayerScale) else None,
            ls2=block.ls2.gamma if isinstance(block.ls2, LayerScale) else None,
        )

    def extra_repr(self) -> str:
        tok = f", tokenizer={self.tokenizer_path!r}" if self.tokenizer_path is not None else ""
        return super().extra_repr() + tok
