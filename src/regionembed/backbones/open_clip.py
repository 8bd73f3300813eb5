"""open_clip vision transformers behind the :class:`~regionembed.backbones.base.Backbone` interface."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import LayerScale, ResidualAttentionBlock, VisionTransformer
from timm.layers import resample_abs_pos_embed
from torch import nn

from .alpha import load_alpha_clip_visual
from .attention import UnsupportedModelError, check_library_versions
from .base import Backbone, BlockParts, PreprocessSpec
from .vocab import RemappedTokenizer, read_words, vocabulary_file
from .weights import (
    hub_offline,
    load_lightning_backbone_state,
    looks_like_path,
    normalize_pretrained,
    offline_error,
    resolve_local_file,
    weights_error,
)

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

#: tiny architectures shipped with regionembed for tests and smoke runs (random init only; ``re-tiny-rn`` is a
#: ModifiedResNet for :class:`~regionembed.backbones.resnet.OpenCLIPResNetBackbone`, the others are ViTs)
TINY_MODELS = tuple(sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json")))

#: the CLIP's own scalars, trained with neither tower (``logit_bias``: SigLIP)
_SCALE_PARAMETERS = ("logit_scale", "logit_bias")


class _DropOpenCLIPErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}open_clip{os.sep}" in record.pathname)


@contextlib.contextmanager
def _quiet_open_clip_errors(active: bool) -> Iterator[None]:
    """Offline, open_clip logs its failed download on the root logger before raising; the error re-raised here says
    the same with the way out, so that log line is dropped (only while ``active``)."""
    if not active:
        yield
        return
    drop, root = _DropOpenCLIPErrors(), logging.getLogger()  # open_clip calls logging.error(): the root logger
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def get_tokenizer(model_name: str, model: nn.Module | None = None):
    """open_clip's tokenizer for ``model_name``, remapped into the architecture's small vocabulary if it has one.

    Args:
        model_name: an open_clip or regionembed architecture name.
        model: when given, its token embedding must have as many rows as the (remapped) vocabulary.

    Raises:
        ValueError: the vocabulary file and the model's ``vocab_size`` disagree.
    """
    tokenizer = open_clip.get_tokenizer(model_name)
    vocab = vocabulary_file(model_name, MODEL_CONFIG_DIR)
    if vocab is None:
        return tokenizer
    tokenizer = RemappedTokenizer(tokenizer, read_words(vocab))
    rows = getattr(getattr(model, "token_embedding", None), "num_embeddings", None)
    if rows is not None and rows != tokenizer.vocab_size:
        raise ValueError(
            f"{vocab} gives a vocabulary of {tokenizer.vocab_size} ids but {model_name}'s token embedding has {rows} "
            "rows: set text_cfg.vocab_size in its model config to match"
        )
    return tokenizer


def _create_open_clip(model_name: str, pretrained: str | None, cache_dir: str | None) -> nn.Module:
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
    if pretrained is None or pretrained == "":
        return open_clip.create_model(model_name, pretrained=None)
    if pretrained.startswith("regionembed:"):  # a model this project trains itself (weights shipped in the package)
        from ..zoo import resolve

        pretrained = resolve(pretrained.split(":", 1)[1], model_name=model_name)
    if looks_like_path(pretrained):
        path = resolve_local_file(pretrained)
        if path.endswith(".ckpt"):  # a regionembed Lightning checkpoint (e.g. from train.py fit)
            model = open_clip.create_model(model_name, pretrained=None)
            state = load_lightning_backbone_state(path)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise weights_error(path, err, model_name) from err
            return model
        try:
            return open_clip.create_model(model_name, pretrained=path, cache_dir=cache_dir)
        except Exception as err:  # torch, safetensors and open_clip raise many types; name the file either way
            raise weights_error(path, err, model_name) from err
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        raise ValueError(
            f"unknown pretrained tag {pretrained!r} for {model_name}; known tags: {tags or 'none'}; "
            "or pass a local .pt/.bin/.safetensors file"
        )
    example = f"OpenCLIPBackbone({model_name!r}, pretrained='/path/to/open_clip_model.safetensors')"
    offline = hub_offline()
    if offline and not os.environ.get("HF_HUB_OFFLINE"):  # unreachable: fail now instead of after long retries
        raise offline_error(f"open_clip weights {model_name}/{pretrained}", example)
    try:
        with _quiet_open_clip_errors(offline):
            return open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir)
    except Exception as err:  # hub errors come in many types; re-raise with the way out
        if offline:
            raise offline_error(f"open_clip weights {model_name}/{pretrained}", example) from err
        raise


class OpenCLIPModelMixin:
    """What every open_clip-based backbone shares: preprocessing from the model, the text tower, the alpha channel.

    Expects ``self.model`` (an open_clip CLIP) and ``self.model_name``, ``self.pretrained``.
    """

    def _init_open_clip(self, size: int, alpha_channel: bool = False, alpha_checkpoint: str | None = None) -> None:
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        self._preprocess = PreprocessSpec(
            size=size,
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
            interpolation=str(cfg.get("interpolation", "bicubic")),
            resize_mode=str(cfg.get("resize_mode", "shortest")),
        )
        self._tokenizer = self._make_tokenizer()
        self.alpha_checkpoint = alpha_checkpoint
        if alpha_checkpoint:
            load_alpha_clip_visual(self, alpha_checkpoint)
        elif alpha_channel:
            self.enable_alpha()
        self.model.eval()

    def _make_tokenizer(self):
        """The text tokenizer (open_clip's for ``model_name``; overridden where it can come from a local folder)."""
        return get_tokenizer(self.model_name, self.model)

    @property
    def preprocess(self) -> PreprocessSpec:
        return self._preprocess

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def rgb_stem_conv(self) -> nn.Conv2d:
        return self.model.visual.conv1

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=normalize)

    # --------------------------------------------------------------------------------- towers for training
    @property
    def image_tower(self) -> nn.Module:
        return self.model.visual

    def text_tower_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        # every parameter of the CLIP outside the image tower, except the temperature (and SigLIP's bias)
        for name, p in self.model.named_parameters():
            if not name.startswith("visual.") and name not in _SCALE_PARAMETERS:
                yield name, p

    def set_trainable(
        self, image: bool = False, text: bool = False, logit_scale: bool = False, alpha: bool = False
    ) -> OpenCLIPModelMixin:
        self.requires_grad_(False)
        self.image_tower.requires_grad_(image)
        for _, p in self.text_tower_parameters():
            p.requires_grad_(text)
        for name in _SCALE_PARAMETERS:
            if getattr(self.model, name, None) is not None:
                getattr(self.model, name).requires_grad_(logit_scale)
        if self.alpha_embed is not None:
            self.alpha_embed.requires_grad_(alpha)
        return self

    def eval_text_tower(self) -> None:
        for name, child in self.model.named_children():
            if name != "visual":
                child.eval()

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return self._tokenizer(list(texts))

    def overlong_texts(self, texts: Sequence[str]) -> list[tuple[str, int, int]]:
        tok = self._tokenizer
        encode, context = getattr(tok, "encode", None), getattr(tok, "context_length", None)
        if encode is None or not context or getattr(tok, "reduction_fn", None) is not None:
            return []
        out = []
        for text in texts:
            n = len(encode(text)) + 2  # start and end tokens, as the tokenizer adds them
            if n > context:
                out.append((text, n, int(context)))
        return out

    def extra_repr(self) -> str:
        alpha = f", alpha_checkpoint={self.alpha_checkpoint!r}" if self.alpha_checkpoint else ""
        return (
            f"model_name={self.model_name!r}, pretrained={self.pretrained!r}, image_size={self.preprocess.size}{alpha}"
        )


class OpenCLIPBackbone(OpenCLIPModelMixin, Backbone):
    """An open_clip CLIP model (ViT image tower) as a regionembed backbone.

    Args:
        model_name: any open_clip ViT config name (``open_clip.list_models()``), or a tiny regionembed config
            (``re-tiny-vit``, ``re-tiny-vit-ls``, ``re-small-vit``).
        pretrained: ``None`` for random init, an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``,
            needs the hub), or a local weights file (``.pt/.pth/.bin/.safetensors``, loaded weights-only).
        image_size: square input side; positional embeddings are resampled on the fly (the model's own
            parameters are never modified). Defaults to the model's native size.
        cache_dir: open_clip download cache.
        alpha_channel: add Alpha-CLIP's zero-initialised alpha conv beside the patch embedding
            (:mod:`regionembed.backbones.alpha`); ``encode_image(image, alpha=...)`` then takes an alpha map.
        alpha_checkpoint: an Alpha-CLIP visual checkpoint (the official ``clip_b16_grit20m_fultune_2xe.pth`` etc.,
            our export, or a regionembed ``.ckpt`` of an alpha model) that replaces the visual tower and the alpha
            conv after ``pretrained`` is loaded (so ``pretrained`` provides the text tower); implies
            ``alpha_channel``.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: str | None = None,
        image_size: int | None = None,
        cache_dir: str | None = None,
        alpha_channel: bool = False,
        alpha_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        check_library_versions("open_clip")
        from .open_clip_timm import is_timm_tower

        if is_timm_tower(model_name):  # issue 14: the seam's dispatch picks OpenCLIPTimmBackbone for these
            raise UnsupportedModelError(
                f"{model_name} has a timm image tower: use OpenCLIPTimmBackbone({model_name!r}, ...) (same arguments)"
            )
        self.model_name = model_name
        self.pretrained = pretrained = normalize_pretrained(pretrained)
        self.model = _create_open_clip(model_name, pretrained, cache_dir)
        visual = self.model.visual
        if not isinstance(visual, VisionTransformer):
            raise UnsupportedModelError(f"{model_name}: only open_clip VisionTransformer image towers are supported")
        if visual.attn_pool is not None:
            raise UnsupportedModelError(f"{model_name}: attentional pooling (CoCa) is not supported")
        if not visual.transformer.batch_first:
            raise UnsupportedModelError(f"{model_name}: sequence-first transformers are not supported")
        self._patch = int(visual.patch_size[0])
        self._native_grid = tuple(int(g) for g in visual.grid_size)
        size = int(image_size or visual.image_size[0])
        if size % self._patch:
            raise ValueError(f"image_size {size} is not a multiple of the patch size {self._patch}")
        self._init_open_clip(size, alpha_channel, alpha_checkpoint)

    # ----------------------------------------------------------------------------------------- properties
    @property
    def patch_size(self) -> int:
        return self._patch

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.model.visual.transformer.resblocks

    # ------------------------------------------------------------------------------------------- forward
    def positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """``[1 + h*w, C]`` positional embedding for a token grid, resampled (bicubic) when it differs."""
        pos = self.model.visual.positional_embedding
        if tuple(grid) == self._native_grid:
            return pos
        return resample_abs_pos_embed(
            pos.unsqueeze(0), new_size=list(grid), old_size=list(self._native_grid), num_prefix_tokens=1
        )[0]

    def embed_tokens(self, image: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        visual = self.model.visual
        x = self.add_alpha(visual.conv1(image), alpha, image)  # [B, C, h, w]
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(grid).to(x.dtype)
        x = visual.patch_dropout(x)
        return visual.ln_pre(x)

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        pooled, _ = visual._pool(tokens)
        return pooled @ visual.proj if visual.proj is not None else pooled

    def legrad_head(self, pooled: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        out = visual.ln_post(pooled)
        return out @ visual.proj if visual.proj is not None else out

    def block_parts(self, block: nn.Module) -> BlockParts:
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.ln_2, nn.LayerNorm):
            raise NotImplementedError(f"no gradient decomposition for {type(block).__name__}")
        attn = block.attn
        return BlockParts(
            num_heads=attn.num_heads,
            head_dim=attn.head_dim,
            out_proj_weight=attn.out_proj.weight,
            norm2=block.ln_2,
            fc1=block.mlp.c_fc,
            act=block.mlp.gelu,
            fc2=block.mlp.c_proj,
            ls1=block.ls_1.gamma if isinstance(block.ls_1, LayerScale) else None,
            ls2=block.ls_2.gamma if isinstance(block.ls_2, LayerScale) else None,
        )
