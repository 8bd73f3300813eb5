"""open_clip CLIP models behind the :class:`~regionembed.backbones.base.Backbone` interface.

:class:`OpenCLIPBackbone` is the one name users build (``OpenCLIPBackbone("ViT-B-16", pretrained=...)``); it returns
the adapter for the image tower open_clip builds (ViT, CoCa's attention-pooled ViT, ModifiedResNet, timm tower).
"""

from __future__ import annotations

import abc
import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import LayerScale, ResidualAttentionBlock, VisionTransformer
from timm.layers import resample_abs_pos_embed
from torch import nn

from .alpha import load_alpha_clip_visual
from .attention import AttentionRecorder, UnsupportedModelError, check_library_versions
from .base import AttentionPoolHead, Backbone, BlockParts, PreprocessSpec, TokenGridBackbone
from .vocab import RemappedTokenizer, read_words, vocabulary_file
from .weights import (
    PretrainedWeightsUnavailable,
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
#: ModifiedResNet, ``re-tiny-coca`` a CoCa with an attentional pooler, the others are plain ViTs)
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


#: the keys of open_clip's preprocessing config that ``preprocess_cfg`` may set
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")
#: the interpolations and resize modes open_clip's own transforms accept (``image_transform`` asserts the
#: interpolation; its "random" is for training only)
INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "longest", "squash")


def tag_preprocess_cfg(model_name: str) -> tuple[dict[str, object], dict[str, dict[object, list[str]]]]:
    """The preprocessing (``mean``, ``std``, ``interpolation``, ``resize_mode``) that every open_clip pretrained tag of
    ``model_name`` declares alike, and the keys on which its tags disagree (``{key: {value: [tags]}}``).

    open_clip applies a tag's preprocessing only when the weights come from that tag, so random weights or a local
    file would otherwise get OpenAI's mean and std and shortest-side resizing, whatever the model (SigLIP and PE-Core
    were trained with 0.5 mean and std and squash resizing).
    """
    cfgs = {t: open_clip.get_pretrained_cfg(model_name, t) for t in open_clip.list_pretrained_tags_by_model(model_name)}
    agreed: dict[str, object] = {}
    disagreed: dict[str, dict[object, list[str]]] = {}
    for key in PREPROCESS_KEYS:
        by_value: dict[object, list[str]] = {}
        for tag, cfg in cfgs.items():
            if key in cfg:
                value = tuple(cfg[key]) if isinstance(cfg[key], (list, tuple)) else cfg[key]
                by_value.setdefault(value, []).append(tag)
        if len(by_value) == 1:
            agreed[key] = next(iter(by_value))
        elif by_value:
            disagreed[key] = by_value
    return agreed, disagreed


def resolve_preprocess_cfg(model_name: str, pretrained: str | None, preprocess_cfg: dict | str | None) -> dict:
    """The preprocessing overrides handed to open_clip (``force_preprocess_cfg``) for ``pretrained``.

    A hub tag brings its own preprocessing (open_clip applies it); anything else (random weights, a local file, a
    checkpoint) gets the model's tags' common preprocessing (:func:`tag_preprocess_cfg`; a key on which they
    disagree keeps open_clip's default, with a warning naming ``preprocess_cfg``). ``preprocess_cfg`` wins over
    both: a dict of some of :data:`PREPROCESS_KEYS`, or the name of a pretrained tag whose preprocessing to use.

    Raises:
        ValueError: naming ``preprocess_cfg``: an unknown key or tag, or a mean/std that is not three numbers.
    """
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if isinstance(preprocess_cfg, str):
        if preprocess_cfg not in tags:
            raise ValueError(
                f"preprocess_cfg={preprocess_cfg!r} is not a pretrained tag of {model_name} (tags: {tags or 'none'}); "
                f"give a tag or a dict with keys {', '.join(PREPROCESS_KEYS)}"
            )
        tag_cfg = open_clip.get_pretrained_cfg(model_name, preprocess_cfg)
        preprocess_cfg = {k: tag_cfg[k] for k in PREPROCESS_KEYS if k in tag_cfg}
    preprocess_cfg = dict(preprocess_cfg or {})
    unknown = sorted(set(preprocess_cfg) - set(PREPROCESS_KEYS))
    if unknown:
        raise ValueError(f"preprocess_cfg: unknown keys {unknown}; expected some of {', '.join(PREPROCESS_KEYS)}")
    for key in ("mean", "std"):
        value = preprocess_cfg.get(key)
        numbers = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
        if value is not None and not (numbers and len(value) == 3):
            raise ValueError(f"preprocess_cfg: {key} must be three numbers (one per RGB channel), got {value!r}")
    for key, allowed in (("interpolation", INTERPOLATIONS), ("resize_mode", RESIZE_MODES)):
        if key in preprocess_cfg and preprocess_cfg[key] not in allowed:
            raise ValueError(f"preprocess_cfg: {key} must be one of {', '.join(allowed)}, got {preprocess_cfg[key]!r}")
    if pretrained in tags:
        return preprocess_cfg
    agreed, disagreed = tag_preprocess_cfg(model_name)
    for key, by_value in disagreed.items():
        # resize_mode is recorded for reference only (the data module's `mode` resizes); a bad tag is named later
        if key not in preprocess_cfg and key != "resize_mode" and (pretrained is None or looks_like_path(pretrained)):
            log.warning(
                "%s: its pretrained tags disagree on %s (%s); open_clip's default is used: set preprocess_cfg "
                "(a tag name or {%r: ...}) to the weights' own",
                model_name,
                key,
                "; ".join(f"{value} for {', '.join(t)}" for value, t in by_value.items()),
                key,
            )
    return {**agreed, **preprocess_cfg}


def _create_open_clip(
    model_name: str, pretrained: str | None, cache_dir: str | None, preprocess_cfg: dict | str | None = None
) -> nn.Module:
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
    force = resolve_preprocess_cfg(model_name, pretrained or None, preprocess_cfg)
    if pretrained is None or pretrained == "":
        # open_clip moves the model to its `device` argument ('cpu' by default), which fails on meta tensors: keep it
        # on the default device, so `with torch.device("meta"):` builds any size without allocating
        return open_clip.create_model(
            model_name, pretrained=None, device=torch.get_default_device(), force_preprocess_cfg=force
        )
    if pretrained.startswith("regionembed:"):  # a model this project trains itself (weights shipped in the package)
        from ..zoo import resolve

        pretrained = resolve(pretrained.split(":", 1)[1], model_name=model_name)
    if looks_like_path(pretrained):
        path = resolve_local_file(pretrained)
        if path.endswith(".ckpt"):  # a regionembed Lightning checkpoint (e.g. from train.py fit)
            model = open_clip.create_model(model_name, pretrained=None, force_preprocess_cfg=force)
            state = load_lightning_backbone_state(path)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise weights_error(path, err, model_name) from err
            return model
        try:
            return open_clip.create_model(model_name, pretrained=path, cache_dir=cache_dir, force_preprocess_cfg=force)
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
            return open_clip.create_model(
                model_name, pretrained=pretrained, cache_dir=cache_dir, force_preprocess_cfg=force
            )
    except Exception as err:  # hub errors come in many types; re-raise with the way out
        if offline:
            raise offline_error(f"open_clip weights {model_name}/{pretrained}", example) from err
        raise


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
    """The tokenizer ``tokenizer=`` asks for: a Hugging Face one from a local folder, the hub one of a config that
    names one (``text_cfg.hf_tokenizer_name``), a :class:`_NoTokenizer`, or ``None`` for open_clip's built-in one.

    Raises:
        ImportError: the config needs ``transformers`` (``regionembed[hf]``) and it is not installed.
        PretrainedWeightsUnavailable: the hub tokenizer cannot be downloaded (offline), naming ``tokenizer=``.
        ValueError: ``tokenizer`` is given for a model whose tokenizer is not a Hugging Face one, or is no folder.
    """
    if tokenizer is False:
        return _NoTokenizer(model_name)
    if tokenizer is True:
        tokenizer = None
    if model_name not in open_clip.list_models():
        return None  # _create_open_clip names the unknown model
    text_cfg = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})
    hub_name = text_cfg.get("hf_tokenizer_name")
    if hub_name and importlib.util.find_spec("transformers") is None:
        raise ImportError(
            f"{model_name}'s tokenizer is a Hugging Face tokenizer: pip install 'regionembed[hf]' (transformers), "
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
            tokenizer, context_length=text_cfg.get("context_length", 77), **text_cfg.get("tokenizer_kwargs", {})
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


def _check_hf_text_tower(model_name: str) -> None:
    """open_clip builds a Hugging Face text tower (``text_cfg.hf_model_name``: NLLB-CLIP, CoCa-RoBERTa) from its hub
    config, random weights included; offline and not cached, fail now naming the way out (instead of the hub error).

    Raises:
        ImportError: ``transformers`` (``regionembed[hf]``) is not installed.
        PretrainedWeightsUnavailable: the config is neither reachable nor cached.
    """
    if model_name not in open_clip.list_models():
        return  # _create_open_clip names the unknown model
    hub_name = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {}).get("hf_model_name")
    if not hub_name:
        return
    if importlib.util.find_spec("transformers") is None:
        raise ImportError(
            f"{model_name}'s text tower is the Hugging Face model {hub_name}: pip install 'regionembed[hf]'"
        )
    if not hub_offline():
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(hub_name, local_files_only=True)
    except OSError as err:
        raise offline_error(
            f"the config of {model_name}'s Hugging Face text tower {hub_name}",
            way_out=f"open_clip builds that tower from it even with random weights. Cache it once on this machine with "
            f"network access (`AutoConfig.from_pretrained({hub_name!r})`, or copy the Hugging Face cache, HF_HOME); "
            "offline runs then read the cache",
        ) from err


def _tokenizer_offline_error(model_name: str, hub_name: str) -> PretrainedWeightsUnavailable:
    return offline_error(
        f"the Hugging Face tokenizer {hub_name} of {model_name}",
        way_out=f"Save it on a machine with network access, e.g. `AutoTokenizer.from_pretrained({hub_name!r})"
        ".save_pretrained('tokenizer_folder')`, and pass the folder: "
        f"OpenCLIPBackbone({model_name!r}, tokenizer='/path/to/tokenizer_folder') (YAML: backbone.init_args.tokenizer)",
    )


def tower_type(model_name: str) -> str:
    """The kind of image tower open_clip builds for ``model_name``: ``"resnet"`` (ModifiedResNet), ``"timm"`` (a timm
    model: SigLIP, EVA02, PE, ...) or ``"vit"`` (open_clip's VisionTransformer, CoCa's included), read from the config
    as open_clip's own ``_build_vision_tower`` decides."""
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
    vision = (open_clip.get_model_config(model_name) or {}).get("vision_cfg", {})
    if vision.get("timm_model_name"):
        return "timm"
    if isinstance(vision.get("layers"), list | tuple):
        return "resnet"
    return "vit"


def _adapter_class(model_name: str) -> type:
    """The adapter class for ``model_name``'s tower (imported lazily: the adapters import this module)."""
    kind = tower_type(model_name)
    if kind == "resnet":
        from .resnet import OpenCLIPResNetBackbone

        return OpenCLIPResNetBackbone
    if kind == "timm":
        from .open_clip_timm import OpenCLIPTimmBackbone

        return OpenCLIPTimmBackbone
    if (open_clip.get_model_config(model_name) or {}).get("vision_cfg", {}).get("attentional_pool"):
        return OpenCLIPAttentionPoolBackbone
    return OpenCLIPViTBackbone


class OpenCLIPBackbone(Backbone):
    """An open_clip CLIP model as a regionembed backbone; the adapter for its image tower is chosen for you.

    ``OpenCLIPBackbone(model_name, ...)`` returns an instance of the adapter subclass that fits the tower open_clip
    builds for ``model_name``: :class:`OpenCLIPViTBackbone` (VisionTransformer),
    :class:`OpenCLIPAttentionPoolBackbone` (VisionTransformer with CoCa's attentional pooler),
    :class:`~regionembed.backbones.resnet.OpenCLIPResNetBackbone` (ModifiedResNet) or ``OpenCLIPTimmBackbone`` (a
    timm tower). The subclasses share this constructor; what they have in common (weights, preprocessing from the
    model, the text tower, training parts, the alpha channel) lives here.

    Args:
        model_name: any open_clip config name (``open_clip.list_models()``), or a tiny regionembed config
            (``re-tiny-vit``, ``re-tiny-vit-ls``, ``re-small-vit``, ``re-tiny-rn``, ``re-tiny-coca``; timm towers:
            ``re-tiny-siglip``, ``re-tiny-eva02``, ``re-tiny-pe``).
        pretrained: ``None`` for random init, an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``,
            needs the hub), a local weights file (``.pt/.pth/.bin/.safetensors``, loaded weights-only, or a
            regionembed ``.ckpt``), or ``regionembed:<name>``.
        image_size: square input side; positional embeddings are resampled on the fly (the model's own
            parameters are never modified). Defaults to the model's native size.
        cache_dir: open_clip download cache.
        alpha_channel: add Alpha-CLIP's zero-initialised alpha conv beside the stem conv
            (:mod:`regionembed.backbones.alpha`); ``encode_image(image, alpha=...)`` then takes an alpha map.
        alpha_checkpoint: an Alpha-CLIP visual checkpoint (the official ``clip_b16_grit20m_fultune_2xe.pth`` etc.,
            our export, or a regionembed ``.ckpt`` of an alpha model) that replaces the visual tower and the alpha
            conv after ``pretrained`` is loaded (so ``pretrained`` provides the text tower); implies
            ``alpha_channel``.
        tokenizer: for configs whose tokenizer is a Hugging Face one that open_clip loads from the hub (SigLIP,
            SigLIP2; needs ``regionembed[hf]``): a local folder holding it (``save_pretrained`` output or a hub
            snapshot); ``None`` loads it from the hub (or fails at once offline, naming this argument). ``False``
            builds no tokenizer, for any model (image-side use only: explainers and MaskInversion with given
            targets, benchmarks; ``tokenize`` then raises).
        preprocess_cfg: the image preprocessing, over open_clip's (``mean``, ``std``, ``interpolation``,
            ``resize_mode``; a dict of some of them, or the name of a pretrained tag whose preprocessing to use).
            By default a hub tag brings its own, and anything else (random weights, a local file, a checkpoint)
            gets what the model's pretrained tags declare alike (:func:`tag_preprocess_cfg`; SigLIP: mean and std
            0.5), not open_clip's OpenAI default. ``mean``, ``std`` and ``interpolation`` reach regionembed's image
            pipeline; ``resize_mode`` is kept in :attr:`preprocess` for reference (data modules resize by their
            own ``mode``).
    """

    #: whether ``alpha_checkpoint=`` can load into this adapter's tower
    takes_alpha_checkpoints = True

    def __new__(
        cls,
        model_name: str = "ViT-B-16",
        pretrained: str | None = None,
        image_size: int | None = None,
        cache_dir: str | None = None,
        alpha_channel: bool = False,
        alpha_checkpoint: str | None = None,
        tokenizer: str | bool | None = None,
        preprocess_cfg: dict[str, Any] | str | None = None,
    ) -> OpenCLIPBackbone:
        # the full signature, as __init__'s: jsonargparse reads a class's parameters from __new__ when it has one
        if cls is OpenCLIPBackbone:  # dispatch on the tower; a subclass named explicitly is built as asked
            cls = _adapter_class(model_name)
        return super().__new__(cls)

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: str | None = None,
        image_size: int | None = None,
        cache_dir: str | None = None,
        alpha_channel: bool = False,
        alpha_checkpoint: str | None = None,
        tokenizer: str | bool | None = None,
        preprocess_cfg: dict[str, Any] | str | None = None,
    ) -> None:
        super().__init__()
        check_library_versions("open_clip")
        if alpha_checkpoint and not self.takes_alpha_checkpoints:  # before any weights are loaded
            raise UnsupportedModelError(
                f"{model_name}: Alpha-CLIP checkpoints exist for OpenAI CLIP ViTs only (OpenCLIPBackbone('ViT-B-16', "
                "alpha_checkpoint=...)); use alpha_channel=True to train an alpha channel on this model"
            )
        self.model_name = model_name
        self.pretrained = pretrained = normalize_pretrained(pretrained)
        self.tokenizer_path = tokenizer
        hf_tokenizer = _hf_tokenizer(model_name, tokenizer)  # before the weights: fail fast on the cheap part
        _check_hf_text_tower(model_name)
        self.preprocess_cfg = preprocess_cfg
        self.model = _create_open_clip(model_name, pretrained, cache_dir, preprocess_cfg)
        size = self._init_tower(image_size)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        self._preprocess = PreprocessSpec(
            size=size,
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
            interpolation=str(cfg.get("interpolation", "bicubic")),
            resize_mode=str(cfg.get("resize_mode", "shortest")),
        )
        self._tokenizer = hf_tokenizer if hf_tokenizer is not None else get_tokenizer(self.model_name, self.model)
        self._check_tokenizer_ids()
        self.alpha_checkpoint = alpha_checkpoint
        if alpha_checkpoint:
            load_alpha_clip_visual(self, alpha_checkpoint)
        elif alpha_channel:
            self.enable_alpha()
        self.model.eval()

    def _check_tokenizer_ids(self) -> None:
        """A tokenizer folder given as ``tokenizer=`` must not produce ids beyond the text tower's token embedding."""
        inner = getattr(self._tokenizer, "tokenizer", None)
        if self.tokenizer_path in (None, True, False) or inner is None:
            return
        text = getattr(self.model, "text", self.model)
        rows = getattr(getattr(text, "token_embedding", None), "num_embeddings", None)
        if rows is not None and len(inner) > rows:
            raise ValueError(
                f"tokenizer={self.tokenizer_path!r} has {len(inner)} ids but {self.model_name}'s text tower has {rows} "
                "token embeddings"
            )

    @abc.abstractmethod
    def _init_tower(self, image_size: int | None) -> int:
        """Check ``self.model.visual`` is the tower this adapter handles and set up its geometry; returns the input
        size (``image_size`` or the native one), validated."""

    @property
    def preprocess(self) -> PreprocessSpec:
        return self._preprocess

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> torch.Tensor | None:
        return getattr(self.model, "logit_bias", None)  # SigLIP models have one, CLIPs do not

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
        tok = f", tokenizer={self.tokenizer_path!r}" if self.tokenizer_path is not None else ""
        return (
            f"model_name={self.model_name!r}, pretrained={self.pretrained!r}, image_size={self.preprocess.size}"
            f"{alpha}{tok}"
        )


# ``OpenCLIPBackbone(...)`` never builds an OpenCLIPBackbone itself (``__new__`` returns the adapter subclass), so it
# is not abstract to its callers; it must not look abstract either, or jsonargparse refuses
# ``class_path: regionembed.backbones.OpenCLIPBackbone``. The adapters are still checked for completeness by ABCMeta
# through their capability classes.
OpenCLIPBackbone.__abstractmethods__ = frozenset()


class OpenCLIPViTBackbone(OpenCLIPBackbone, TokenGridBackbone):
    """An open_clip CLIP with a ``VisionTransformer`` image tower ([CLS] or mean pooling).

    Built by ``OpenCLIPBackbone(model_name, ...)`` for ViT configs; takes the same arguments.
    """

    def _init_tower(self, image_size: int | None) -> int:
        visual = self.model.visual
        if not isinstance(visual, VisionTransformer):
            raise UnsupportedModelError(
                f"{self.model_name}: {type(self).__name__} needs an open_clip VisionTransformer image tower, got "
                f"{type(visual).__name__}; build it with OpenCLIPBackbone({self.model_name!r}), which picks the adapter"
            )
        if (visual.attn_pool is not None) != isinstance(self, AttentionPoolHead):
            raise UnsupportedModelError(
                f"{self.model_name}: build it with OpenCLIPBackbone({self.model_name!r}), which picks the adapter for "
                "its pooling (attentional pooler or not)"
            )
        if not visual.transformer.batch_first:
            raise UnsupportedModelError(f"{self.model_name}: sequence-first transformers are not supported")
        self._patch = int(visual.patch_size[0])
        self._native_grid = tuple(int(g) for g in visual.grid_size)
        size = int(image_size or visual.image_size[0])
        if size % self._patch:
            raise ValueError(f"image_size {size} is not a multiple of the patch size {self._patch}")
        return size

    # ----------------------------------------------------------------------------------------- properties
    @property
    def patch_size(self) -> int:
        return self._patch

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

    def input_tokens(self, image: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        x = visual.conv1(image)  # [B, C, h, w]
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(grid).to(x.dtype)
        x = visual.patch_dropout(x)
        return visual.ln_pre(x)

    def pool_tokens(self, tokens: torch.Tensor, explicit_attention: bool = False) -> torch.Tensor:
        # [CLS] or mean pooling: no attention in the head, ``explicit_attention`` changes nothing
        visual = self.model.visual
        pooled, _ = visual._pool(tokens)
        return pooled @ visual.proj if visual.proj is not None else pooled

    def legrad_head(self, pooled: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        out = visual.ln_post(pooled)
        return out @ visual.proj if visual.proj is not None else out

    def block_parts(self, block: nn.Module) -> BlockParts | None:
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.ln_2, nn.LayerNorm):
            return None
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


class OpenCLIPAttentionPoolBackbone(OpenCLIPViTBackbone, AttentionPoolHead):
    """An open_clip ``VisionTransformer`` whose embedding comes from CoCa's attentional pooler.

    open_clip's CoCa setup (``attentional_pool: true``): the last block's tokens (all of them, [CLS] included) go
    through ``AttentionalPooler`` (``Q`` learned queries, ``ln_q``/``ln_k``, cross-attention), then ``ln_post``; the
    contrastive embedding is the first query's output (``pool_type: "tok"``; ``"avg"``: the mean of the others)
    times ``proj``. The pooler's attention over the tokens is recorded by
    :class:`~regionembed.backbones.attention.AttentionRecorder`, which :meth:`attention_pool_embed` uses; LeGrad
    explains through it. The paper-style ``"parallel"``/``"cascade"`` poolers (open_clip: untested WIP) are refused.

    Built by ``OpenCLIPBackbone("coca_ViT-B-32", ...)``; takes the same arguments.
    """

    def _init_tower(self, image_size: int | None) -> int:
        size = super()._init_tower(image_size)
        visual = self.model.visual
        if visual.attn_pool_contrastive is not None or visual.pool_type not in ("tok", "avg"):
            raise UnsupportedModelError(
                f"{self.model_name}: only open_clip's original CoCa attentional pooling is supported (attentional_pool "
                f"true, pool_type 'tok' or 'avg'), not {visual.attn_pool_type or visual.pool_type!r}"
            )
        return size

    def legrad_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head applied to one token ``[..., C] -> [..., D]``: the pool with all its attention on that token (its
        value path ``out_proj(v_proj(ln_k(x)))``, the same for every query), then ``ln_post`` and ``proj``."""
        visual = self.model.visual
        pool = visual.attn_pool
        mha = pool.attn
        w_v = mha.v_proj_weight if not mha._qkv_same_embed_dim else mha.in_proj_weight.chunk(3)[2]
        b_v = mha.in_proj_bias.chunk(3)[2] if mha.in_proj_bias is not None else None
        out = mha.out_proj(F.linear(pool.ln_k(pooled), w_v, b_v))
        out = visual.ln_post(out)
        return out @ visual.proj if visual.proj is not None else out

    legrad_recipe = "coca"
    #: the official CoCa recipe scores the first query's output only (:meth:`legrad_pool_embed`), whatever the
    #: model's ``pool_type``
    legrad_pool_queries = (0,)

    def pool_tokens(self, tokens: torch.Tensor, explicit_attention: bool = False) -> torch.Tensor:
        """open_clip's pooling (the attentional pooler, ``ln_post``, ``proj``); with ``explicit_attention`` the
        pooler's attention runs the recorder's explicit softmax (open_clip's call goes to a fused kernel, which has
        no double backward)."""
        if not explicit_attention:
            return super().pool_tokens(tokens)
        return self._recorded_pool(tokens, super().pool_tokens, leaf_probs=False)[0]

    def attention_pool_embed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._recorded_pool(tokens, self.pool_tokens)

    def legrad_pool_embed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The official LeGrad's CoCa embedding (``legrad.LeWrapper.compute_legrad_coca``): the pool's first query
        times ``proj``, without ``ln_post`` (unlike :meth:`attention_pool_embed`, the model's own route)."""
        visual = self.model.visual

        def first_query(x: torch.Tensor) -> torch.Tensor:
            out = visual.attn_pool(x)[:, 0]  # the one query LeGrad reads: legrad_pool_queries
            return out @ visual.proj if visual.proj is not None else out

        return self._recorded_pool(tokens, first_query)

    def _recorded_pool(self, tokens: torch.Tensor, head, leaf_probs: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.model.visual.attn_pool
        with AttentionRecorder([pool], [0], leaf_probs=leaf_probs) as rec:
            embedding = head(tokens)
        probs = rec.records[0].probs
        if probs is None:  # the pooler no longer calls its attention module: an open_clip this was not written for
            raise UnsupportedModelError(f"{self.model_name}: the attentional pooler's attention could not be recorded")
        return embedding, probs
