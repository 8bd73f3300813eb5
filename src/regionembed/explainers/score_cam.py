"""Score-CAM (Wang et al., 2020) and VL-Score, its vision-language variant with a "not present" decision.

Both are gradient-free: every channel ``k`` of a layer's activations ``A`` (ResNet stage channels, or the channels of
a ViT block's patch tokens) is upsampled to the image and min-max normalised to a soft mask ``M_k`` in [0, 1]; the
image is masked in pixel space, ``x_k = b + M_k * (x - b)`` with the baseline ``b`` (0 in the backbone's normalised
space, i.e. the dataset's mean colour), and scored by the cosine of its embedding with the target. Channel weights are
a softmax of these scores and the map is ``ReLU(sum_k w_k A_k)``, bilinearly upsampled and min-max normalised.

Cost and memory: one forward per kept channel and item (``max_channels`` of them), ``batch_size`` masked images per
forward; peak memory is about ``batch_size`` times one image's forward activations plus ``batch_size`` images of
``[3, H, W]``. When one image is broadcast over several targets (``image [1, 3, H, W]``, ``targets [N, D]``), the
masked images are embedded once and scored against all targets.

Targets: any ``[B, D]`` embeddings. VL-Score's targets are typically a class's prompt embeddings averaged over
synonyms and templates (:func:`prompt_targets`, built on :func:`regionembed.text.encode_prompts`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..text import encode_prompts
from .base import Explainer, min_max
from .gradcam import layer_activations, upsample

__all__ = ["ScoreCAM", "VLScore", "VLScoreAuthors", "prompt_targets"]

BASELINES = ("mean", "blur")


@torch.no_grad()
def prompt_targets(
    backbone: Backbone, classes: Sequence[str | Sequence[str]], templates: Sequence[str] = ("{}",)
) -> torch.Tensor:
    """Target embeddings ``[N, D]``: per class, the normalised mean over its synonyms of the template-averaged prompt
    embeddings (:func:`~regionembed.text.encode_prompts`), re-normalised.

    Args:
        backbone: a backbone with a text tower.
        classes: one entry per class, a name or a list of synonyms (``["tv", "television", "monitor"]``).
        templates: prompt templates with a ``{}`` placeholder.
    """
    if not classes:
        raise ValueError("no classes to encode")
    rows = []
    for entry in classes:
        synonyms = [entry] if isinstance(entry, str) else list(entry)
        if not synonyms:
            raise ValueError("a class needs at least one name")
        device = next(backbone.parameters()).device
        rows.append(F.normalize(encode_prompts(backbone, synonyms, templates, device=device).mean(0), dim=-1))
    return torch.stack(rows)


class ScoreCAM(Explainer):
    """Score-CAM with an embedding target (cosine score), as the Score-CAM paper and pytorch-grad-cam weight channels.

    The channel weights are a softmax over *all* channel scores, ``w = softmax(s / temperature)``; every map is
    "present" (see :class:`VLScore` for the variant that decides presence).

    Our choices (the paper scores class probabilities of a classifier): the score is the cosine between the masked
    image's embedding and the target; the softmax temperature defaults to 0.01, CLIP's ``1 / logit_scale``, so that
    the weights are those of CLIP logits (with temperature 1 cosines in [-1, 1] give almost uniform weights); the
    channel cap keeps the channels with the largest spatial mean activation per image.

    Args:
        layer: ViT block index (channels of its output patch tokens) or ResNet stage (name or index); ``None``
            (default) = the penultimate ViT block / ``layer4`` (as :class:`~regionembed.explainers.GradCAM`).
        temperature: softmax temperature over channel scores.
        batch_size: masked images per forward pass (memory vs. speed; results do not depend on it).
        max_channels: keep at most this many channels per image, those with the largest spatial mean activation;
            ``None`` keeps all (RN50 ``layer4`` has 2048 channels, ViT-B/16 768). Default 256.
        eps: floor of the min-max ranges.
    """

    differentiable = False
    #: whether :meth:`channel_weights` needs the baseline image's scores
    needs_baseline = False

    def __init__(
        self,
        layer: int | str | None = None,
        temperature: float = 0.01,
        batch_size: int = 32,
        max_channels: int | None = 256,
        eps: float = 1e-12,
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_channels is not None and int(max_channels) < 1:
            raise ValueError(f"max_channels must be >= 1 or None, got {max_channels}")
        self.layer = layer
        self.temperature = float(temperature)
        self.batch_size = int(batch_size)
        self.max_channels = None if max_channels is None else int(max_channels)
        self.eps = float(eps)

    # ------------------------------------------------------------------------------------------- hooks
    def baseline_image(self, image: torch.Tensor) -> torch.Tensor | None:
        """The fill of masked-out pixels ``[B, 3, H, W]``; ``None`` means 0 (the mean colour)."""
        return None

    def channel_weights(
        self, scores: torch.Tensor, baseline_scores: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Channel weights ``[B, K]`` and presence ``[B]`` from channel scores ``[B, K]`` (the hook subclasses
        override). Plain Score-CAM: softmax over all channels, always present."""
        weights = (scores / self.temperature).softmax(dim=-1)
        return weights, torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)

    # ------------------------------------------------------------------------------------------- compute
    def explain(self, backbone: Backbone, image: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.explain_presence(backbone, image, targets)[0]

    @torch.no_grad()
    def explain_presence(
        self, backbone: Backbone, image: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        size = tuple(image.shape[-2:])
        targets = F.normalize(targets, dim=-1)
        # One image broadcast over several targets: embed its masked copies once, score them against every target.
        shared = image.shape[0] > 1 and image.stride(0) == 0
        images = image[:1] if shared else image
        acts = layer_activations(backbone, images, self.layer, with_embedding=False, leaf=False).maps  # [G,C,h,w]
        k = acts.shape[1] if self.max_channels is None else min(self.max_channels, acts.shape[1])
        channels = acts.mean(dim=(2, 3)).topk(k, dim=1).indices  # [G, K]
        acts = acts.gather(1, channels[:, :, None, None].expand(-1, -1, *acts.shape[-2:]))  # [G, K, h, w]
        fills = self.baseline_image(images)
        scores, baseline_scores = [], []
        for g in range(images.shape[0]):
            tgt = targets if shared else targets[g : g + 1]
            fill = None if fills is None else fills[g : g + 1]
            emb = self._masked_embeddings(backbone, images[g : g + 1], acts[g], fill, size)  # [K, D]
            scores.append(tgt @ emb.T)  # [M, K]
            if self.needs_baseline:
                base = fill if fill is not None else torch.zeros_like(images[g : g + 1])
                baseline_scores.append(tgt @ backbone.encode_image(base, normalize=True).T)  # [M, 1]
        scores = torch.cat(scores)  # [B, K]
        baseline_scores = torch.cat(baseline_scores) if self.needs_baseline else None
        weights, present = self.channel_weights(scores, baseline_scores)
        if shared:
            acts = acts.expand(targets.shape[0], -1, -1, -1)
        cam = (weights[:, :, None, None] * acts).sum(dim=1).clamp_min(0)  # [B, h, w]
        maps = min_max(upsample(cam, size), self.eps) * present[:, None, None]
        return maps, present

    def _masked_embeddings(
        self,
        backbone: Backbone,
        image: torch.Tensor,
        acts: torch.Tensor,
        fill: torch.Tensor | None,
        size: tuple[int, int],
    ) -> torch.Tensor:
        """Normalised embeddings ``[K, D]`` of ``image`` ``[1, 3, H, W]`` masked by each channel of ``acts``
        ``[K, h, w]``.

        Masks are upsampled chunk by chunk, so memory does not grow with the number of channels.
        """
        out = []
        for start in range(0, acts.shape[0], self.batch_size):
            masks = min_max(upsample(acts[start : start + self.batch_size], size), self.eps)[:, None]  # [k,1,H,W]
            masked = masks * image if fill is None else fill + masks * (image - fill)
            out.append(backbone.encode_image(masked, normalize=True))
        return torch.cat(out)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layer={self.layer!r}, temperature={self.temperature}, "
            f"batch_size={self.batch_size}, max_channels={self.max_channels})"
        )


class VLScore(ScoreCAM):
    """VL-Score: Score-CAM for vision-language models that can answer "not present".

    A channel is kept only when its masked image scores higher (cosine with the target) than the baseline image (the
    fully masked image, i.e. the mean colour; or a blurred copy with ``baseline="blur"``): the channel shows
    something of the target the empty image does not. The weights are a softmax with temperature over the kept
    channels' scores (0 elsewhere). When no channel is kept the map is all zeros and that item is "not present":
    :meth:`~regionembed.explainers.Explainer.explain_with_presence` returns the maps and presence ``[B]`` bool.

    What is ours (details of the VL-Score paper we could not verify): the cosine score, the baseline as the
    all-mean image (the masking fill), the strict ``>`` comparison, the softmax over kept channels' raw scores
    (equal to a softmax of their gains over the baseline), temperature 0.01 (CLIP's ``1 / logit_scale``) and the
    channel cap by mean activation (default 256 channels per image).

    Args:
        baseline: ``"mean"`` (0 in normalised space, also the masking fill) or ``"blur"`` (a Gaussian blur of the
            image with sigma = side / 8, used both as the fill and as the baseline image).
        layer, temperature, batch_size, max_channels, eps: as :class:`ScoreCAM`.
    """

    needs_baseline = True

    def __init__(
        self,
        layer: int | str | None = None,
        temperature: float = 0.01,
        batch_size: int = 32,
        max_channels: int | None = 256,
        baseline: str = "mean",
        eps: float = 1e-12,
    ) -> None:
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        super().__init__(
            layer=layer, temperature=temperature, batch_size=batch_size, max_channels=max_channels, eps=eps
        )
        self.baseline = baseline

    def baseline_image(self, image: torch.Tensor) -> torch.Tensor | None:
        if self.baseline == "mean":
            return None
        from torchvision.transforms.functional import gaussian_blur

        sigma = max(image.shape[-2:]) / 8
        kernel = 2 * int(3 * sigma) + 1
        return gaussian_blur(image, [kernel, kernel], [sigma, sigma])

    def channel_weights(
        self, scores: torch.Tensor, baseline_scores: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keep = scores > baseline_scores  # [B, K] vs [B, 1]
        present = keep.any(dim=1)
        logits = (scores / self.temperature).masked_fill(~keep, float("-inf"))
        weights = logits.softmax(dim=-1).nan_to_num(0.0)  # rows with nothing kept: all -inf -> NaN -> 0
        return weights, present

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", baseline={self.baseline!r})"


class VLScoreAuthors(VLScore):
    """VL-Score with the choices of the VL-Score authors' code instead of ours, for a side-by-side comparison.

    The channel softmax at temperature 1 (ours: 0.01), and for boxes 4-connected components with every component a
    candidate box (ours: the largest 8-connected component). :class:`~regionembed.modules.LocalizationModule`
    reads ``box_connectivity`` and ``every_component`` from the explainer; with ``every_component`` a query is
    scored with the component box that best matches its ground truth, which is what "every component is a box"
    means for a GT-known metric (optimistic next to one box per map). Logged as ``vlscore_authors``.

    Args: as :class:`VLScore`, with ``temperature`` defaulting to 1.
    """

    name = "vlscore_authors"
    box_connectivity = 4
    every_component = True

    def __init__(
        self,
        layer: int | str | None = None,
        temperature: float = 1.0,
        batch_size: int = 32,
        max_channels: int | None = 256,
        baseline: str = "mean",
        eps: float = 1e-12,
    ) -> None:
        super().__init__(layer, temperature, batch_size, max_channels, baseline, eps)
