"""Contrastive (InfoNCE) loss where several images of a batch may share a caption."""

from __future__ import annotations

import torch

__all__ = ["multi_positive_clip_loss"]


def multi_positive_clip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, groups: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE whose targets spread evenly over every pair with the same caption.

    CLIP's loss takes the diagonal as the only positive, so two images captioned "a red circle" in one batch push each
    other's captions away. When captions repeat (single-object scenes of a few dozen classes) that noise dominates;
    here the target of row ``i`` is uniform over ``{j : groups[j] == groups[i]}`` (SupCon-style, as in UniCL). With
    all groups distinct it equals open_clip's ``ClipLoss``.

    Args:
        image: ``[N, D]`` L2-normalised image features.
        text: ``[N, D]`` L2-normalised text features of the captions.
        logit_scale: scalar, the (already exponentiated) temperature inverse.
        groups: ``[N]`` integer caption ids (equal ids = equal captions).
    """
    if image.shape != text.shape or groups.shape != image.shape[:1]:
        raise ValueError(f"image {tuple(image.shape)}, text {tuple(text.shape)}, groups {tuple(groups.shape)} differ")
    logits = logit_scale * image @ text.T  # [N, N]
    same = (groups[:, None] == groups[None, :]).to(logits.dtype)
    target = same / same.sum(1, keepdim=True)  # symmetric, so the same for both directions
    i2t = -(target * logits.log_softmax(1)).sum(1).mean()
    t2i = -(target * logits.T.log_softmax(1)).sum(1).mean()
    return (i2t + t2i) / 2
