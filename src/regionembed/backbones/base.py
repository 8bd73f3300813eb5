"""The backbone adapter contract shared by every method in regionembed.

A backbone wraps a CLIP-like vision transformer (open_clip, timm) behind one small interface: encode images and
texts, expose the token grid and the transformer blocks, and describe the model's own preprocessing. Explainers and
the MaskInversion solver only talk to this interface, never to a library's internals.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn


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
    """A CLIP-like ViT behind the interface the explainers and solvers use.

    Subclasses implement :meth:`embed_tokens`, :meth:`run_blocks`-compatible ``blocks``, :meth:`pool_tokens` and
    :meth:`legrad_head`. Images are ``[B, 3, S, S]`` tensors already normalised with :attr:`preprocess`.
    """

    #: number of prefix tokens ([CLS], registers) before the patch tokens
    num_prefix_tokens: int = 1

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
    def rgb_stem_conv(self) -> nn.Conv2d:
        """The first convolution applied to the RGB image (the patch embedding of a ViT, conv1 of a ResNet stem).

        The alpha-channel conv copies its kernel, stride and padding and adds its output to this conv's output.
        """
        raise NotImplementedError(f"{type(self).__name__} does not support an alpha channel")

    def enable_alpha(self) -> Backbone:
        """Add a zero-initialised alpha-channel conv beside :attr:`rgb_stem_conv` (Alpha-CLIP); returns ``self``.

        A freshly enabled backbone gives the same outputs as before for any alpha. Calling it twice is a no-op.
        """
        from .alpha import AlphaPatchEmbed

        if self.alpha_embed is None:
            conv = self.rgb_stem_conv
            self.alpha_embed = AlphaPatchEmbed.like(conv).to(device=conv.weight.device, dtype=conv.weight.dtype)
        return self

    def add_alpha(self, features: torch.Tensor, alpha: torch.Tensor | None, image: torch.Tensor) -> torch.Tensor:
        """``features + alpha_embed(alpha)`` (the alpha branch of the stem); ``features`` when ``alpha`` is None.

        Args:
            features: output of :attr:`rgb_stem_conv` on ``image``, ``[B, C, h, w]``.
            alpha: normalised alpha map ``[B, 1, H, W]`` (see :func:`regionembed.backbones.alpha.alpha_from_masks`).
            image: the image ``[B, 3, H, W]`` (for validating ``alpha``).
        """
        if alpha is None:
            return features
        if self.alpha_embed is None:
            raise ValueError(
                f"{type(self).__name__} has no alpha channel: build it with alpha_channel=True (or call "
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
        return features + self.alpha_embed(alpha.to(features.dtype))

    @property
    @abc.abstractmethod
    def patch_size(self) -> int:
        """Side of a square patch in pixels."""

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
    def blocks(self) -> Sequence[nn.Module]:
        """The vision transformer blocks, in order."""

    @abc.abstractmethod
    def embed_tokens(self, image: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """Patch-embed an image and add prefix tokens and (resampled) positional embeddings.

        Args:
            image: ``[B, 3, H, W]`` normalised image, ``H`` and ``W`` multiples of the patch size.
            alpha: optional normalised alpha map ``[B, 1, H, W]`` for a backbone with an alpha channel.

        Returns:
            ``[B, T, C]`` tokens entering the first block, ``T = prefix + (H/p) * (W/p)``.
        """

    @abc.abstractmethod
    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's own pooling and projection of the last block's output: ``[B, T, C] -> [B, D]``."""

    @abc.abstractmethod
    def legrad_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """LeGrad's per-layer head: final norm and projection of a mean-pooled token ``[..., C] -> [..., D]``."""

    @abc.abstractmethod
    def block_parts(self, block: nn.Module) -> BlockParts:
        """Describe ``block`` for the gradient decomposition (raise ``NotImplementedError`` if it cannot be)."""

    def grid_size(self, image_size: tuple[int, int] | int) -> tuple[int, int]:
        """Token grid ``(h, w)`` for an input of ``image_size`` pixels."""
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        h, w = image_size
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        return h // p, w // p

    def layer_indices(self, layers: Sequence[int]) -> list[int]:
        """Resolve possibly negative block indices to sorted unique non-negative ones."""
        n = len(self.blocks)
        out = []
        for layer in layers:
            if not -n <= layer < n:
                raise ValueError(f"layer index {layer} is out of range for a model with {n} blocks")
            out.append(layer % n)
        return sorted(set(out))

    def forward_blocks(self, tokens: torch.Tensor, stop: int | None = None) -> torch.Tensor:
        """Run ``tokens`` ``[B, T, C]`` through blocks ``[0, stop)`` (all blocks when ``stop`` is None)."""
        blocks = self.blocks if stop is None else self.blocks[:stop]
        for blk in blocks:
            tokens = blk(tokens)
        return tokens

    def encode_image(
        self, image: torch.Tensor, normalize: bool = False, alpha: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embed images ``[B, 3, H, W] -> [B, D]`` at any size that is a multiple of the patch size.

        ``alpha`` ``[B, 1, H, W]`` (normalised, see :mod:`regionembed.backbones.alpha`) needs an alpha channel.
        """
        self.check_image(image)
        feats = self.pool_tokens(self.forward_blocks(self.embed_tokens(image, alpha=alpha)))
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
        (``logit_scale``, and a SigLIP bias), the alpha conv (when the backbone has one). Returns ``self``."""
        raise NotImplementedError(f"{type(self).__name__} does not support choosing trainable towers")

    def eval_text_tower(self) -> None:
        """Put the text tower in eval mode (no dropout), e.g. when it is frozen and its embeddings are cached."""
        raise NotImplementedError(f"{type(self).__name__} has no text tower")

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights in its library's own key format: what ``pretrained=<file>`` loads back."""
        raise NotImplementedError(f"{type(self).__name__} does not export its weights")

    def check_image(self, image: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``image`` is a finite ``[B, 3, H, W]`` batch with sides multiple of the patch."""
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"expected an image batch of shape [B, 3, H, W], got {shape}")
        if not torch.isfinite(image).all():
            raise ValueError("image contains NaN or infinite values")
        self.grid_size(tuple(image.shape[-2:]))


# ------------------------------------------------------------------------ attention-pool heads (issue 14)
class AttentionPoolHead(abc.ABC):
    """Capability of a backbone whose image embedding comes from an attention pool over the tokens (SigLIP's and
    PE's ``map`` head, CoCa's attentional pooler): learned latent queries attend over the last block's tokens.

    LeGrad on such a model follows the official recipe for SigLIP/CoCa: the gradient of the score flows into the
    *pool's* attention probabilities (see :class:`~regionembed.explainers.LeGrad`).
    """

    @property
    def has_attention_pool(self) -> bool:
        """Whether this model pools with its attention pool (an adapter class may also carry towers that pool with a
        [CLS] token, e.g. EVA02 next to SigLIP in the open_clip timm adapter)."""
        return True

    @abc.abstractmethod
    def attention_pool_embed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention pool (and the projection after it) applied to one block's output tokens.

        As the official LeGrad, the tower's final norm before the pool is *not* applied (LeGrad feeds every layer's
        raw block output to the pool); the pool's own norms, MLP and the projections after it are.

        Args:
            tokens: ``[B, T, C]`` output of a transformer block.

        Returns:
            ``(embedding [B, D], probs [B, H, Q, T'])``: the pooled embedding and the pool's post-softmax attention
            probabilities, on the autograd graph, over the tokens the pool reads: all ``T`` (prefix tokens first) or
            only the patch tokens (a pool that skips the prefix). The patch tokens are always the last ``h*w``.
        """


def uses_attention_pool(backbone: Backbone) -> bool:
    """Whether ``backbone`` pools through an attention pool (:class:`AttentionPoolHead` with a pool)."""
    return isinstance(backbone, AttentionPoolHead) and backbone.has_attention_pool
