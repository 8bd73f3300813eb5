"""Hugging Face ``transformers`` CLIP and SigLIP models behind the :class:`~regionembed.backbones.base.Backbone`
interface.

:class:`HFBackbone` loads a folder written by ``model.save_pretrained(folder)`` and
``processor.save_pretrained(folder)`` (config, ``model.safetensors``, image processor and tokenizer), or a hub name
when the hub is reachable. Supported: ``CLIPModel`` (``model_type`` ``"clip"``) and ``SiglipModel`` (``"siglip"``).
``transformers`` is an optional dependency (``pip install 'regionembed[hf]'``); this module imports it only when a
backbone is built.

The vision tower is a :class:`~regionembed.backbones.base.TokenGridBackbone`: the patch embedding conv
(``rgb_stem_conv``, which the alpha-channel add-on hooks), the position embedding (resampled with ``transformers``'
own ``interpolate_pos_encoding`` for other sizes), the encoder layers as ``blocks`` and the model's own pooling:
CLIP's post-layernorm of [CLS] and ``visual_projection``; SigLIP's post-layernorm of all tokens and its
attention-pool head (``SiglipMultiheadAttentionPoolingHead``: the :class:`~regionembed.backbones.base.AttentionPoolHead`
capability, :meth:`HFBackbone.attention_pool_embed`, which LeGrad's attention-pool recipe uses; ``has_attention_pool``
is false for CLIP).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from .attention import MHAPoolRecorder, UnsupportedModelError, check_library_versions
from .base import AttentionPoolHead, BlockParts, PreprocessSpec, TokenGridBackbone
from .weights import PretrainedWeightsUnavailable, hub_offline, offline_error

log = logging.getLogger(__name__)

__all__ = ["HF_INSTALL_HINT", "HFBackbone", "HFEncoderBlock", "import_transformers"]

HF_INSTALL_HINT = "pip install 'regionembed[hf]'"

#: ``config.model_type`` -> the ``transformers`` model class regionembed wraps
_MODEL_CLASSES = {"clip": "CLIPModel", "siglip": "SiglipModel"}

#: PIL resampling codes (what image processor configs store) -> interpolation names
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

#: the model's own scalars, trained with neither tower
_SCALE_PARAMETERS = ("logit_scale", "logit_bias")


def import_transformers():
    """``transformers``, or an ``ImportError`` naming the extra that installs it."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            f"HFBackbone needs the Hugging Face transformers library, which is not installed: {HF_INSTALL_HINT}"
        ) from err
    return transformers


class HFEncoderBlock(nn.Module):
    """One ``transformers`` encoder layer called as ``block(x)`` (the layers take an attention mask argument).

    Not registered in the backbone: the layer's parameters keep their ``transformers`` names in ``state_dict``.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    @property
    def attn(self) -> nn.Module:
        """The layer's self-attention (``CLIPAttention`` / ``SiglipAttention``), what the attention recorder patches."""
        return self.layer.self_attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, None)  # vision layers attend to every token: no mask


def _is_path(name: str) -> bool:
    """A local folder (existing, absolute, relative ``./``, ``~``, or more than one ``/``) rather than a hub name."""
    return (
        Path(name).expanduser().exists()
        or name.startswith((os.sep, ".", "~"))
        or name.count("/") > 1
        or (os.altsep is not None and os.altsep in name)
    )


def _offline_error(name: str) -> PretrainedWeightsUnavailable:
    return offline_error(
        f"the Hugging Face model {name!r}",
        way_out="On a machine with network access save it to a folder, e.g. "
        f"`CLIPModel.from_pretrained({name!r}).save_pretrained('folder')` and "
        f"`AutoProcessor.from_pretrained({name!r}).save_pretrained('folder')` (SiglipModel for SigLIP), copy the "
        "folder here and pass it instead: HFBackbone('/path/to/folder')",
    )


def _resample_name(resample) -> str:
    """An interpolation name from an image processor's ``resample`` (PIL code, enum or torchvision mode)."""
    value = getattr(resample, "value", resample)
    if isinstance(value, str):
        return value.lower()
    try:
        return _RESAMPLE_NAMES[int(value)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"unknown resample setting {resample!r} in the image processor config") from None


def _size_from_processor(processor) -> tuple[int | None, str]:
    """``(square side, resize mode)`` the image processor produces: a centre crop after resizing the shortest edge
    (CLIP) or a resize to a fixed height and width (SigLIP)."""

    def side(size) -> int | None:
        if size is None:
            return None
        get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        height, width = get("height"), get("width")
        if height is not None:
            if width is not None and width != height:
                raise UnsupportedModelError(f"non-square image processor size {height}x{width} is not supported")
            return int(height)
        edge = get("shortest_edge")
        return int(edge) if edge is not None else None

    crop = side(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
    if crop is not None:
        return crop, "shortest"
    size = getattr(processor, "size", None)
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    if size is not None and get("height") is not None:
        return side(size), "squash"
    return side(size), "shortest"


class HFBackbone(TokenGridBackbone, AttentionPoolHead):
    """A ``transformers`` ``CLIPModel`` or ``SiglipModel`` as a regionembed backbone.

    Both are token grids; SigLIP's embedding comes from its attention-pool head (:attr:`has_attention_pool`), CLIP's
    from the [CLS] token (one adapter serves both, as the base class allows for such adapters).

    Args:
        path_or_name: a folder written by ``save_pretrained`` (the model, its image processor and tokenizer), or a
            hub name such as ``"openai/clip-vit-base-patch16"`` (needs the hub; fails at once offline, naming the
            way out). Weights load from safetensors only (``use_safetensors=True``): untrusted pickles are never
            unpickled.
        image_size: square input side; position embeddings are resampled as ``transformers``'
            ``interpolate_pos_encoding`` does (the model's parameters are never modified). Defaults to the image
            processor's output size.
        alpha_channel: add Alpha-CLIP's zero-initialised alpha conv beside the patch embedding
            (:mod:`regionembed.backbones.alpha`).
        attn_implementation: ``transformers``' attention kernel (``"sdpa"``, ``"eager"``); ``None`` keeps its default.
            The attention recorder runs its own explicit attention either way.
        cache_dir: the hub download cache.
        revision: the hub revision (branch, tag or commit) of a hub name.
    """

    def __init__(
        self,
        path_or_name: str,
        image_size: int | None = None,
        alpha_channel: bool = False,
        attn_implementation: str | None = None,
        cache_dir: str | None = None,
        revision: str | None = None,
    ) -> None:
        super().__init__()
        transformers = import_transformers()
        check_library_versions("transformers")
        self.model_name = self.pretrained = str(path_or_name)
        model, image_processor, tokenizer = _load(
            transformers, str(path_or_name), attn_implementation, cache_dir, revision
        )
        self.model = model
        self.family = model.config.model_type  # "clip" or "siglip"
        vision = model.vision_model
        if self.family == "siglip" and not getattr(vision, "use_head", False):
            raise UnsupportedModelError(
                f"{path_or_name}: a SiglipModel without its attention-pool head (vision_use_head=False) has no image "
                "embedding to explain"
            )
        self.num_prefix_tokens = 1 if self.family == "clip" else 0
        vcfg = model.config.vision_config
        self._patch = int(vcfg.patch_size)
        self._native_size = int(vcfg.image_size)
        processed, resize_mode = _size_from_processor(image_processor)
        size = int(image_size or processed or self._native_size)
        if size % self._patch:
            raise ValueError(f"image_size {size} is not a multiple of the patch size {self._patch}")
        normalize = getattr(image_processor, "do_normalize", True)
        mean = image_processor.image_mean if normalize else (0.0, 0.0, 0.0)
        std = image_processor.image_std if normalize else (1.0, 1.0, 1.0)
        self._preprocess = PreprocessSpec(
            size=size,
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
            interpolation=_resample_name(getattr(image_processor, "resample", 3)),
            resize_mode=resize_mode,
        )
        self._tokenizer = tokenizer
        tcfg = model.config.text_config
        limit = getattr(tokenizer, "model_max_length", None)
        context = int(tcfg.max_position_embeddings)
        #: tokens per text: the text tower's positions (SigLIP was trained padded to this length, CLIP to 77)
        self.context_length = min(context, int(limit)) if isinstance(limit, int) and limit > 0 else context
        # a plain list: the wrappers are not submodules, so state_dict keys stay those of transformers
        self._blocks = [HFEncoderBlock(layer) for layer in vision.encoder.layers]
        if alpha_channel:
            self.enable_alpha()
        self.model.eval()

    # ----------------------------------------------------------------------------------------- properties
    @property
    def patch_size(self) -> int:
        return self._patch

    @property
    def embed_dim(self) -> int:
        cfg = self.model.config
        return int(cfg.projection_dim) if self.family == "clip" else int(cfg.vision_config.hidden_size)

    @property
    def preprocess(self) -> PreprocessSpec:
        return self._preprocess

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self._blocks

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> torch.Tensor | None:
        """SigLIP's learned logit bias (``None`` for CLIP)."""
        return getattr(self.model, "logit_bias", None)

    @property
    def rgb_stem_conv(self) -> nn.Conv2d:
        return self.model.vision_model.embeddings.patch_embedding

    # ------------------------------------------------------------------------------------------- forward
    def input_tokens(self, image: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision_model
        emb = vision.embeddings
        conv = emb.patch_embedding
        x = conv(image.to(conv.weight.dtype))  # [B, C, h, w]; a module call, so the alpha channel's hook runs
        height, width = x.shape[-2] * self._patch, x.shape[-1] * self._patch
        x = x.flatten(2).transpose(1, 2)
        if self.family == "clip":
            x = torch.cat([emb.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        # transformers' own resampling (bicubic, as its interpolate_pos_encoding=True); native grid: unchanged
        x = x + emb.interpolate_pos_encoding(x, height, width).to(x.dtype)
        return vision.pre_layrnorm(x) if self.family == "clip" else x

    def pool_tokens(self, tokens: torch.Tensor, explicit_attention: bool = False) -> torch.Tensor:
        """CLIP: ``post_layernorm`` of [CLS] and ``visual_projection`` (``explicit_attention`` changes nothing).
        SigLIP: ``post_layernorm`` and the attention-pool head; with ``explicit_attention`` the head's
        ``nn.MultiheadAttention`` runs :class:`~regionembed.backbones.attention.MHAPoolRecorder`'s explicit softmax
        (twice differentiable whatever kernel ``torch`` would pick)."""
        vision = self.model.vision_model
        if self.family == "clip":
            return self.model.visual_projection(vision.post_layernorm(tokens[:, 0]))
        if explicit_attention:
            with MHAPoolRecorder(vision.head.attention, leaf_probs=False):
                return vision.head(vision.post_layernorm(tokens))
        return vision.head(vision.post_layernorm(tokens))

    def legrad_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """CLIP: post-layernorm and visual projection. SigLIP: the attention-pool head applied to the single token
        (its attention over one key is 1, so this is the head's value path, out-projection and MLP)."""
        vision = self.model.vision_model
        if self.family == "clip":
            return self.model.visual_projection(vision.post_layernorm(pooled))
        lead, c = pooled.shape[:-1], pooled.shape[-1]
        out = vision.head(vision.post_layernorm(pooled.reshape(-1, 1, c)))
        return out.reshape(*lead, out.shape[-1])

    @property
    def has_attention_pool(self) -> bool:
        """Whether the image embedding comes from an attention pool (SigLIP's head) rather than a [CLS] token."""
        return self.family == "siglip"

    def attention_pool_embed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own route (``post_layernorm``, then the attention-pool head), as :meth:`pool_tokens`, with the
        pool's attention kept (SigLIP only)."""
        return self.legrad_pool_embed(self.model.vision_model.post_layernorm(tokens))

    def legrad_pool_embed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SigLIP's attention-pool head applied to one block's output, with the pool's attention kept.

        As the official LeGrad for SigLIP, the tower's final norm before the pool (``post_layernorm``) is *not*
        applied: every layer's raw block output goes to the head (its own layer norm and MLP are applied).

        Args:
            tokens: ``[B, T, C]`` output of any block.

        Returns:
            ``(embedding [B, D], probs [B, H, Q, T])``: the head's output and its post-softmax attention of the
            ``Q = 1`` probe over all ``T`` tokens (SigLIP has no prefix tokens; on the autograd graph, an autograd
            leaf when nothing upstream requires grad).

        Raises:
            UnsupportedModelError: on CLIP, which pools its [CLS] token.
        """
        if not self.has_attention_pool:
            raise UnsupportedModelError(f"{self.family} pools its [CLS] token: it has no attention-pool head")
        head = self.model.vision_model.head
        with MHAPoolRecorder(head.attention) as rec:
            embedding = head(tokens)
        return embedding, rec.record.probs

    def block_parts(self, block: nn.Module) -> BlockParts | None:
        if self.family == "siglip":
            # the decomposed MaskInversion strategies are formulas for LeGrad's mean-token head through the blocks;
            # LeGrad on an attention-pool head differentiates the pool's attention (MaskInversion: attention_pool)
            return None
        layer = block.layer if isinstance(block, HFEncoderBlock) else None
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if (
            layer is None
            or not isinstance(layer.layer_norm2, nn.LayerNorm)
            or not isinstance(getattr(mlp, "fc1", None), nn.Linear)
            or not isinstance(getattr(attn, "out_proj", None), nn.Linear)
        ):
            return None
        return BlockParts(
            num_heads=int(attn.num_heads),
            head_dim=int(attn.head_dim),
            out_proj_weight=attn.out_proj.weight,
            norm2=layer.layer_norm2,
            fc1=mlp.fc1,
            act=mlp.activation_fn,
            fc2=mlp.fc2,
            ls1=None,
            ls2=None,
        )

    # ---------------------------------------------------------------------------------------------- text
    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        # no attention mask: CLIP's causal text tower pools the end token, which never sees the padding after it;
        # SigLIP was trained on max-length padded texts without a mask (as its model card says to tokenize)
        feats = self.model.get_text_features(input_ids=tokens).pooler_output
        return nn.functional.normalize(feats, dim=-1) if normalize else feats

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = self._tokenizer(
            list(texts), padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        )
        return out["input_ids"].long()

    def overlong_texts(self, texts: Sequence[str]) -> list[tuple[str, int, int]]:
        out = []
        for text in texts:
            n = len(self._tokenizer(text)["input_ids"])  # with the special tokens the tokenizer adds
            if n > self.context_length:
                out.append((text, n, self.context_length))
        return out

    # --------------------------------------------------------------------------------- towers for training
    @property
    def image_tower(self) -> nn.Module:
        """The vision model (and CLIP's ``visual_projection``, which ``transformers`` keeps beside it)."""
        if self.family == "clip":
            return nn.ModuleList([self.model.vision_model, self.model.visual_projection])
        return self.model.vision_model

    def text_tower_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.model.named_parameters():
            if not name.startswith(("vision_model.", "visual_projection.")) and name not in _SCALE_PARAMETERS:
                yield name, p

    def eval_text_tower(self) -> None:
        self.model.text_model.eval()
        if hasattr(self.model, "text_projection"):
            self.model.text_projection.eval()

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights with ``transformers``' names (``model.safetensors`` of a ``save_pretrained`` folder)."""
        return dict(self.model.state_dict())

    def extra_repr(self) -> str:
        return f"path_or_name={self.model_name!r}, family={self.family!r}, image_size={self.preprocess.size}"


def _load(transformers, name: str, attn_implementation: str | None, cache_dir: str | None, revision: str | None):
    """``(model, image processor, tokenizer)`` from a ``save_pretrained`` folder or a hub name."""
    kwargs: dict = {"cache_dir": cache_dir, "revision": revision}
    if _is_path(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise PretrainedWeightsUnavailable(f"Hugging Face model folder not found: {folder}")
        if not (folder / "config.json").is_file():
            raise PretrainedWeightsUnavailable(
                f"{folder} has no config.json: pass a folder written by model.save_pretrained(folder)"
            )
        return _from_pretrained(transformers, str(folder), {"local_files_only": True}, attn_implementation, str(folder))
    if hub_offline():
        if not os.environ.get("HF_HUB_OFFLINE"):  # unreachable: fail now instead of after long retries
            raise _offline_error(name)
        try:  # HF_HUB_OFFLINE: a cached copy may exist
            return _from_pretrained(transformers, name, {**kwargs, "local_files_only": True}, attn_implementation, name)
        except PretrainedWeightsUnavailable as err:
            raise _offline_error(name) from err
    return _from_pretrained(transformers, name, kwargs, attn_implementation, name)


def _from_pretrained(transformers, source: str, kwargs: dict, attn_implementation: str | None, shown: str):
    try:
        config = transformers.AutoConfig.from_pretrained(source, **kwargs)
    except Exception as err:  # hub, JSON and file errors come in many types: name the source either way
        raise PretrainedWeightsUnavailable(f"cannot read the model config of {shown}: {_one_line(err)}") from err
    class_name = _MODEL_CLASSES.get(config.model_type)
    if class_name is None:
        raise UnsupportedModelError(
            f"{shown} holds a {config.model_type!r} model; HFBackbone supports CLIPModel ('clip') and SiglipModel "
            "('siglip') (SigLIP2's NaFlex patch embedding is a Linear over variable-length patch sequences and is "
            "not supported)"
        )
    model_kwargs = dict(kwargs, use_safetensors=True, dtype=torch.float32)
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
    try:
        model = getattr(transformers, class_name).from_pretrained(source, **model_kwargs)
    except Exception as err:
        raise PretrainedWeightsUnavailable(
            f"cannot load {class_name} weights from {shown}: {_one_line(err)} (only model.safetensors is loaded; "
            "pickled .bin weights are refused: re-save with save_pretrained, which writes safetensors)"
        ) from err
    try:
        image_processor = transformers.AutoImageProcessor.from_pretrained(source, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as err:
        raise PretrainedWeightsUnavailable(
            f"cannot load the image processor and tokenizer of {shown}: {_one_line(err)}; save them beside the "
            "model with AutoProcessor.from_pretrained(name).save_pretrained(folder)"
        ) from err
    return model, image_processor, tokenizer


def _one_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    line = lines[0] if lines else type(err).__name__
    return line if len(line) <= 200 else line[:197] + "..."
