"""The backbone contract shared by every method in regionembed: a small encoder protocol and two capabilities.

:class:`Backbone` is what *every* model implements: encode images and texts, tokenise, describe the model's own
preprocessing, and say which parts train. What an explainer or a solver needs beyond that is a *capability*, a
subclass of :class:`Backbone` it checks for explicitly with :func:`require`:

- :class:`TokenGridBackbone`: a vision transformer's token grid and blocks (LeGrad, attention rollout, the
  decomposed MaskInversion strategies, mask pooling, Grad-CAM/Score-CAM on block tokens).
- :class:`FeatureMapBackbone`: a convolutional network's stages and feature maps (Grad-CAM, Score-CAM, VL-Score).
- :class:`AttentionPoolHead`: on top of a token grid, a pooling head that attends over the tokens with learned
  queries (CoCa, SigLIP "map", PE); LeGrad then explains through the pool's attention.

The alpha channel (Alpha-CLIP) is an add-on (:mod:`regionembed.backbones.alpha`) that works on any backbone exposing
its first RGB convolution as :attr:`Backbone.rgb_stem_conv`; no backbone implements alpha logic itself.
Explainers and the MaskInversion solver only talk to these interfaces, never to a library's internals.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .alpha import alpha_input
from .attention import UnsupportedModelError

__all__ = [
    "AttentionPoolHead",
    "Backbone",
    "BlockParts",
    "FeatureMapBackbone",
    "PreprocessSpec",
    "TokenGridBackbone",
    "require",
    "uses_attention_pool",
]


@dataclass(frozen=True)
class PreprocessSpec:
    """The preprocessing a backbone was trained with (taken from the model, never hard-coded).

    Attributes:
        size: square input side in pixels.
        mean: per-channel RGB mean.
        std: per-channel RGB std.
        interpolation: resize interpolation name (``"bicubic"``, ``"bilinear"``, ...).
        resize_mode: the model's own resize mode (``"shortest"``, ``"squash"``, ...), for reference.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"


@dataclass
class BlockParts:
    """The linear-algebra view of one pre-norm transformer block, used by the gradient decomposition.

    The block computes ``x_mid = x + ls1(out_proj(concat_h(A_h V_h)))`` and
    ``x_out = x_mid + ls2(fc2(act(fc1(norm2(x_mid)))))``. Layer scales are ``None`` when absent.
    """

    num_heads: int
    head_dim: int
    out_proj_weight: torch.Tensor  # [C, H*dh]
    norm2: nn.LayerNorm
    fc1: nn.Linear
    act: nn.Module
    fc2: nn.Linear
    ls1: torch.Tensor | None  # [C]
    ls2: torch.Tensor | None  # [C]


class Backbone(nn.Module, abc.ABC):
    """The encoder protocol every regionembed backbone implements (any architecture, any library).

    Subclasses implement :attr:`embed_dim`, :attr:`preprocess`, :attr:`patch_size` and :meth:`forward_image`; a
    model with a text tower also implements :meth:`encode_text`, :meth:`tokenize` and the training parts. Images are
    ``[B, 3, H, W]`` tensors already normalised with :attr:`preprocess`.
    """

    #: how :func:`require` names a backbone of this class (the most specific capability it has)
    capability: str = "an image encoder"
    #: the model's name in its library (adapters set it; used in messages)
    model_name: str = ""

    def __init__(self) -> None:
        super().__init__()
        #: the zero-initialised alpha-channel conv (:mod:`regionembed.backbones.alpha`), ``None`` until enabled
        self.alpha_embed: nn.Module | None = None

    @property
    def weights(self) -> str:
        """Where the weights came from: the ``pretrained`` setting (hub tag, file, ``regionembed:<name>``, ``True``
        for timm's default), or ``"random"`` for a randomly initialised model, whose outputs mean nothing."""
        pretrained = getattr(self, "pretrained", None)
        return "random" if pretrained is None or pretrained is False or pretrained == "" else str(pretrained)

    @property
    @abc.abstractmethod
    def embed_dim(self) -> int:
        """Dimension D of the joint embedding space."""

    @property
    @abc.abstractmethod
    def preprocess(self) -> PreprocessSpec:
        """The preprocessing this backbone expects."""

    @property
    @abc.abstractmethod
    def patch_size(self) -> int:
        """Pixels per cell of the output grid: a ViT's patch side, a CNN's total stride. Image sides must be
        multiples of it."""

    @abc.abstractmethod
    def forward_image(self, image: torch.Tensor) -> torch.Tensor:
        """The image tower's forward, ``[B, 3, H, W] -> [B, D]`` (not normalised, input already validated).

        The alpha channel needs nothing here: :meth:`encode_image` feeds it through :attr:`rgb_stem_conv`.
        """

    # ------------------------------------------------------------------------------------------ encoders
    def encode_image(
        self, image: torch.Tensor, normalize: bool = False, alpha: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embed images ``[B, 3, H, W] -> [B, D]`` at any size that is a multiple of :attr:`patch_size`.

        ``alpha`` ``[B, 1, H, W]`` (normalised, see :mod:`regionembed.backbones.alpha`) needs an alpha channel.
        """
        self.check_image(image)
        with alpha_input(self, alpha, image):
            feats = self.forward_image(image)
        return nn.functional.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Embed tokenised texts ``[B, L] -> [B, D]``."""
        raise NotImplementedError(f"{type(self).__name__} has no text tower")

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Tokenise texts with the model's own tokenizer: ``[B, L]`` int64."""
        raise NotImplementedError(f"{type(self).__name__} has no text tower")

    def overlong_texts(self, texts: Sequence[str]) -> list[tuple[str, int, int]]:
        """``(text, tokens, context length)`` for each text the tokenizer would truncate (none without a text tower
        or when the tokenizer cannot count)."""
        return []

    @property
    def logit_scale(self) -> torch.Tensor | None:
        """The learned log temperature of an image-text model (``exp()`` scales cosines to logits), ``None`` for an
        image-only model."""
        return None

    @property
    def logit_bias(self) -> torch.Tensor | None:
        """The learned logit bias of a sigmoid-loss model (SigLIP), ``None`` for a softmax CLIP."""
        return None

    # ------------------------------------------------------------------------------------- alpha channel
    @property
    def rgb_stem_conv(self) -> nn.Conv2d | None:
        """The first convolution applied to the RGB image (a ViT's patch embedding, conv1 of a ResNet stem), or
        ``None`` when the model has none (then it has no alpha channel).

        The alpha-channel conv copies its kernel, stride and padding; while an alpha is supplied, its output is
        added to this conv's output (a forward hook, :func:`regionembed.backbones.alpha.alpha_input`).
        """
        return None

    def enable_alpha(self) -> Backbone:
        """Add a zero-initialised alpha-channel conv beside :attr:`rgb_stem_conv` (Alpha-CLIP); returns ``self``.

        A freshly enabled backbone gives the same outputs as before for any alpha. Calling it twice is a no-op.
        """
        from .alpha import enable_alpha

        return enable_alpha(self)

    # ------------------------------------------------------------------- training parts (image-text models)
    # What a training module may touch, so that modules never reach into a library's model (``model.visual``...).
    @property
    def image_tower(self) -> nn.Module:
        """The image encoder as one module (what "train the image tower" trains; the alpha conv is apart)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its image tower")

    def text_tower_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the text tower: the model's parameters outside the image tower and the scales."""
        raise NotImplementedError(f"{type(self).__name__} has no text tower")

    def set_trainable(
        self, image: bool = False, text: bool = False, logit_scale: bool = False, alpha: bool = False
    ) -> Backbone:
        """Freeze everything, then let the chosen parts train: the image tower, the text tower, the temperature
        (``logit_scale``, and a SigLIP bias), the alpha conv (when the backbone has one). Returns ``self``.

        Written against :attr:`image_tower`, :meth:`text_tower_parameters`, :attr:`logit_scale` and
        :attr:`logit_bias`, so an adapter that provides those needs nothing more.
        """
        self.requires_grad_(False)
        self.image_tower.requires_grad_(image)
        for _, p in self.text_tower_parameters():
            p.requires_grad_(text)
        for scale in (self.logit_scale, self.logit_bias):
            if scale is not None:
                scale.requires_grad_(logit_scale)
        if self.alpha_embed is not None:
            self.alpha_embed.requires_grad_(alpha)
        return self

    def eval_text_tower(self) -> None:
        """Put the text tower in eval mode (no dropout), e.g. when it is frozen and its embeddings are cached."""
        raise NotImplementedError(f"{type(self).__name__} has no text tower")

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights in its library's own key format: what ``pretrained=<file>`` loads back."""
        raise NotImplementedError(f"{type(self).__name__} does not export its weights")

    # ----------------------------------------------------------------------------------------- validation
    def grid_size(self, image_size: tuple[int, int] | int) -> tuple[int, int]:
        """Output grid ``(h, w)`` (ViT tokens, last CNN stage) for an input of ``image_size`` pixels."""
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        h, w = image_size
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        return h // p, w // p

    def check_image(self, image: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``image`` is a finite ``[B, 3, H, W]`` batch with sides multiple of the patch."""
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"expected an image batch of shape [B, 3, H, W], got {shape}")
        if not torch.isfinite(image).all():
            raise ValueError("image contains NaN or infinite values")
        self.grid_size(tuple(image.shape[-2:]))


class TokenGridBackbone(Backbone):
    """A vision transformer: patch tokens on a grid, run through a stack of attention blocks.

    Subclasses implement :meth:`input_tokens`, :attr:`blocks`, :meth:`pool_tokens` (with its ``explicit_attention``
    switch), :meth:`legrad_head` and :meth:`block_parts` (besides :class:`Backbone`'s ``embed_dim``, ``preprocess``,
    ``patch_size``).
    """

    capability = "a token-grid (vision transformer) backbone"

    #: number of prefix tokens ([CLS], registers) before the patch tokens
    num_prefix_tokens: int = 1

    @property
    @abc.abstractmethod
    def blocks(self) -> Sequence[nn.Module]:
        """The vision transformer blocks, in order."""

    @abc.abstractmethod
    def input_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """Patch-embed an image and add prefix tokens and (resampled) positional embeddings.

        The patch embedding must run :attr:`rgb_stem_conv` as a module call (the alpha channel hooks it).

        Args:
            image: ``[B, 3, H, W]`` normalised image, ``H`` and ``W`` multiples of the patch size.

        Returns:
            ``[B, T, C]`` tokens entering the first block, ``T = prefix + (H/p) * (W/p)``.
        """

    @abc.abstractmethod
    def pool_tokens(self, tokens: torch.Tensor, explicit_attention: bool = False) -> torch.Tensor:
        """The model's own pooling and projection of the last block's output: ``[B, T, C] -> [B, D]``.

        Args:
            tokens: ``[B, T, C]`` output of the last block (or of any block, for per-layer scores).
            explicit_attention: run an attention-pool head (:class:`AttentionPoolHead`) with an explicit softmax, so
                that the embedding is twice differentiable with respect to ``tokens`` (fused attention kernels have
                no double backward; Grad-CAM needs it when it drives MaskInversion). The same outputs to float
                tolerance; a pooling without attention ([CLS] token, mean) is twice differentiable either way and
                ignores it. As :meth:`FeatureMapBackbone.pool_features` has it for a ResNet's attention pool.
        """

    @abc.abstractmethod
    def legrad_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """LeGrad's per-layer head: final norm and projection of a mean-pooled token ``[..., C] -> [..., D]``."""

    @abc.abstractmethod
    def block_parts(self, block: nn.Module) -> BlockParts | None:
        """Describe ``block`` for the gradient decomposition, or ``None`` when its tail does not have the pre-norm
        form the decomposition's formulas need (the solver then runs the naive strategy)."""

    def embed_tokens(self, image: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`input_tokens` with an optional alpha map ``[B, 1, H, W]`` (needs an alpha channel): ``[B, T, C]``."""
        with alpha_input(self, alpha, image):
            return self.input_tokens(image)

    def forward_blocks(self, tokens: torch.Tensor, stop: int | None = None) -> torch.Tensor:
        """Run ``tokens`` ``[B, T, C]`` through blocks ``[0, stop)`` (all blocks when ``stop`` is None)."""
        blocks = self.blocks if stop is None else self.blocks[:stop]
        for blk in blocks:
            tokens = blk(tokens)
        return tokens

    def forward_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.pool_tokens(self.forward_blocks(self.input_tokens(image)))

    def layer_indices(self, layers: Sequence[int]) -> list[int]:
        """Resolve possibly negative block indices to sorted unique non-negative ones."""
        return _resolve_indices(layers, len(self.blocks), "blocks")


class AttentionPoolHead(abc.ABC):
    """Capability of a :class:`TokenGridBackbone` whose embedding comes from an attention-pooling head: learned
    queries attending over the last block's tokens (CoCa's attentional pooler, SigLIP's "map" head, PE).

    LeGrad explains such a model through the pool's attention instead of the blocks' (the official LeGrad recipe
    for SigLIP and CoCa, :mod:`regionembed.explainers.legrad`).
    """

    capability = "a backbone with an attention-pool head"

    #: which official LeGrad recipe explains this head (:mod:`regionembed.explainers.legrad`): ``"siglip"`` (the
    #: score on the normalised embedding; min-max on the token grid, then upsampling) or ``"coca"`` (official
    #: ``compute_legrad_coca``: the raw score on :meth:`legrad_pool_embed`; upsampling, then min-max)
    legrad_recipe: str = "siglip"

    #: the pool queries LeGrad's score reads (indices into the ``Q`` queries of :meth:`attention_pool_shape`), or
    #: ``None`` for all of them. The score's gradient with respect to the pool's attention is zero on every other
    #: query's row, so MaskInversion's ``attention_pool`` strategy tabulates these rows only and its memory estimate
    #: counts only them (the maps still average over heads and all ``Q`` queries, as the official recipe). A head
    #: whose :meth:`legrad_pool_embed` reads some queries only (CoCa: the first) names them here.
    legrad_pool_queries: tuple[int, ...] | None = None

    @property
    def has_attention_pool(self) -> bool:
        """Whether this model pools with its attention pool (an adapter class may also carry towers that pool with a
        [CLS] token, e.g. EVA02 next to SigLIP in the open_clip timm adapter)."""
        return True

    @abc.abstractmethod
    def attention_pool_embed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the head (pool, norm, projection) to a block's output tokens, keeping the pool's attention.

        Args:
            tokens: ``[B, T, C]`` output of any block (prefix tokens included).

        Returns:
            ``(embedding [B, D], probs [B, H, Q, T'])``: the embedding as :meth:`TokenGridBackbone.pool_tokens`
            computes it from ``tokens``, and the pool's post-softmax attention of its ``Q`` queries over the
            ``T'`` tokens it attends to, on the autograd graph (a leaf when nothing upstream requires grad).
            ``T'`` is all ``T`` tokens (prefix first) or only the patch tokens (a pool that skips the prefix); the
            patch tokens are always the last ``h * w``.
        """

    def attention_pool_shape(self, image_size: int) -> tuple[int, int, int]:
        """``(H, Q, T')`` of the pool's attention ``[B, H, Q, T']`` on a square ``image_size`` image: heads, queries
        and the tokens the pool reads.

        Read from one pool forward of a blank image's input tokens (no block runs), so it holds for any adapter, and
        kept per image size on the backbone (the shape is fixed by the architecture; the MaskInversion solver asks
        for it on every call). A subclass that swaps its pool or patch embedding after use must call
        :meth:`clear_attention_pool_shapes`.
        """
        shapes = self.__dict__.setdefault("_attention_pool_shapes", {})
        if image_size not in shapes:
            param = next(self.blocks[0].parameters())  # the image tower's dtype and device (not e.g. logit_scale's)
            blank = torch.zeros(1, 3, image_size, image_size, dtype=param.dtype, device=param.device)
            with torch.no_grad():
                _, probs = self.attention_pool_embed(self.embed_tokens(blank))
            shapes[image_size] = tuple(int(n) for n in probs.shape[1:])
        return shapes[image_size]

    def clear_attention_pool_shapes(self) -> None:
        """Forget the shapes :meth:`attention_pool_shape` keeps (after changing the pool or the patch embedding)."""
        self.__dict__.pop("_attention_pool_shapes", None)

    def legrad_pool_embed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding LeGrad scores and the pool's attention, ``[B, T, C] -> ([B, D], [B, H, Q, T'])``; by default
        :meth:`attention_pool_embed` (a head whose official LeGrad recipe leaves out part of the head overrides it).
        """
        return self.attention_pool_embed(tokens)


def uses_attention_pool(backbone: Backbone) -> bool:
    """Whether ``backbone`` pools through an attention pool (:class:`AttentionPoolHead` with a pool)."""
    return isinstance(backbone, AttentionPoolHead) and backbone.has_attention_pool


class FeatureMapBackbone(Backbone):
    """A convolutional network: residual stages producing feature maps ``[B, C, h, w]``, then a pooling head.

    Subclasses implement :attr:`stages`, :meth:`forward_stages` and :meth:`pool_features`.
    """

    capability = "a feature-map (convolutional) backbone"

    @property
    @abc.abstractmethod
    def stages(self) -> tuple[str, ...]:
        """Names of the stages whose outputs are feature maps, in order (e.g. ``layer1`` ... ``layer4``)."""

    @abc.abstractmethod
    def forward_stages(self, image: torch.Tensor, stage: str) -> torch.Tensor:
        """Run the stem and the stages up to and including ``stage``: ``[B, 3, H, W] -> [B, C, h, w]``.

        The stem must run :attr:`rgb_stem_conv` as a module call (the alpha channel hooks it).
        """

    @abc.abstractmethod
    def pool_features(
        self, feats: torch.Tensor, layer: int | str = -1, explicit_attention: bool = False
    ) -> torch.Tensor:
        """Run the stages after ``layer`` and the pooling head: ``[B, C, h, w] -> [B, D]`` (not normalised).

        Args:
            feats: activations after ``layer``.
            layer: the stage ``feats`` come from (name or index).
            explicit_attention: compute an attention pool with an explicit softmax (twice differentiable).
        """

    def stage_name(self, layer: int | str) -> str:
        """Normalise a stage given by name (``"layer4"``) or index (``3``, ``-1``) to its name."""
        if isinstance(layer, str):
            if layer not in self.stages:
                raise ValueError(f"unknown stage {layer!r}; expected one of {self.stages}")
            return layer
        return self.stages[self.layer_indices([int(layer)])[0]]

    def layer_indices(self, layers: Sequence[int]) -> list[int]:
        """Resolve stage indices (negative allowed) to sorted unique non-negative ones."""
        return _resolve_indices(layers, len(self.stages), "stages")

    def feature_maps(
        self, image: torch.Tensor, layer: int | str = -1, alpha: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Activations after a stage.

        Args:
            image: ``[B, 3, H, W]`` normalised image, sides multiples of :attr:`patch_size`.
            layer: stage name or index (``-1`` = the last stage).
            alpha: optional normalised alpha map ``[B, 1, H, W]`` (needs an alpha channel).

        Returns:
            ``[B, C, h, w]``; for the last stage ``(h, w) = grid_size(image)``.
        """
        self.check_image(image)
        with alpha_input(self, alpha, image):
            return self.forward_stages(image, self.stage_name(layer))

    def forward_image(self, image: torch.Tensor) -> torch.Tensor:
        last = self.stages[-1]
        return self.pool_features(self.forward_stages(image, last), last)


def _resolve_indices(layers: Sequence[int], n: int, what: str) -> list[int]:
    """Possibly negative indices into ``n`` blocks or stages -> sorted unique non-negative ones."""
    out = []
    for layer in layers:
        if not -n <= layer < n:
            raise ValueError(f"layer index {layer} is out of range for a model with {n} {what}")
        out.append(layer % n)
    return sorted(set(out))


def require(backbone: Backbone, capability: type, method: str, alternative: str | None = None) -> Backbone:
    """Check that ``backbone`` has ``capability`` (a capability class above) before ``method`` uses it.

    Example::

        require(backbone, TokenGridBackbone, "LeGrad", alternative="GradCAM")

    Args:
        backbone: the backbone a method was given.
        capability: :class:`TokenGridBackbone`, :class:`FeatureMapBackbone`, :class:`AttentionPoolHead`, ...
        method: what needs it, for the message (``"LeGrad"``).
        alternative: what to use instead on this backbone, for the message (``"GradCAM"``).

    Returns:
        ``backbone`` unchanged.

    Raises:
        UnsupportedModelError: ``backbone`` lacks the capability; the message names the method and the alternative.
    """
    if isinstance(backbone, capability):
        return backbone
    if isinstance(backbone, Backbone):
        name = f"{type(backbone).__name__}({backbone.model_name!r})" if backbone.model_name else type(backbone).__name__
        have = backbone.capability
    else:
        name, have = type(backbone).__name__, "not a regionembed backbone"
    instead = f"; use {alternative} instead" if alternative else ""
    raise UnsupportedModelError(f"{method} needs {capability.capability}, but {name} is {have}{instead}")
