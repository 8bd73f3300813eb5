"""Contrastive losses (plain torch; no Lightning): CLIP's, Alpha-CLIP's masked variant, composed retrieval's InfoNCE,
and a multi-positive InfoNCE for batches where several images share a caption.

The gathering across ranks is open_clip's (``open_clip.loss.gather_features``, ``ClipLoss``), reached only from here
so that the LightningModules never import open_clip.
"""

from __future__ import annotations

import torch
import torch.distributed.nn  # all_gather with gradients
import torch.nn.functional as F
from open_clip.loss import ClipLoss, gather_features

from ..distributed import world

__all__ = ["ClipLoss", "composed_info_nce", "gather_features", "masked_contrastive_loss", "multi_positive_clip_loss"]


def masked_contrastive_loss(
    logits: torch.Tensor, text_ids: torch.Tensor | None = None, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Symmetric InfoNCE over ``logits`` ``[N, N]`` (pair ``i`` is the positive of row/column ``i``).

    With ``text_ids`` ``[N]``, an off-diagonal pair whose texts are identical (two regions both called "a red
    circle") is a false negative and is left out of the softmax. Label smoothing spreads ``label_smoothing`` of
    the target mass uniformly over the entries kept; without duplicates this equals
    ``F.cross_entropy(..., label_smoothing=...)``.

    Args:
        logits: ``[N, N]`` scaled image-text similarities.
        text_ids: ``[N]`` integer ids of the texts (equal ids: identical texts), or ``None``.
        label_smoothing: in ``[0, 1)``.

    Returns:
        The mean of the image->text and text->image cross-entropies (a scalar).
    """
    n = logits.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=logits.device)
    valid = torch.ones_like(eye) if text_ids is None else (text_ids[:, None] != text_ids[None, :]) | eye

    def one_side(lg: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(lg.masked_fill(~valid, float("-inf")), dim=1)
        nll = -logp.diagonal()
        if not label_smoothing:
            return nll.mean()
        uniform = -(logp.masked_fill(~valid, 0.0)).sum(1) / valid.sum(1)
        return ((1 - label_smoothing) * nll + label_smoothing * uniform).mean()

    return (one_side(logits) + one_side(logits.T)) / 2


def composed_info_nce(query: torch.Tensor, target: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """InfoNCE of each query against the targets of the whole batch, gathered across ranks with gradients.

    As open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``, one direction (query -> target, as
    CLIP4Cir): rank ``r`` scores its ``B`` queries against all ``W * B`` targets; DDP's gradient averaging then
    gives exactly the gradient of the loss on the concatenated batch (equal ``B`` on every rank, as the training
    sampler guarantees).

    Args:
        query: ``[B, D]`` unit-norm queries of this rank.
        target: ``[B, D]`` unit-norm targets of this rank (row ``i`` is query ``i``'s positive).
        logit_scale: multiplier of the cosines (``exp`` of CLIP's learnt log-scale).

    Returns:
        The mean cross-entropy over this rank's queries.
    """
    if query.shape != target.shape or query.ndim != 2:
        raise ValueError(f"query {tuple(query.shape)} and target {tuple(target.shape)} must both be [B, D]")
    world_size, rank = world()
    all_targets = target
    offset = 0
    if world_size > 1:
        all_targets = torch.cat(torch.distributed.nn.all_gather(target), dim=0)
        offset = rank * query.shape[0]
    logits = logit_scale * query @ all_targets.T
    labels = torch.arange(query.shape[0], device=query.device) + offset
    return F.cross_entropy(logits, labels)


def multi_positive_clip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, groups: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE whose targets spread evenly over every pair with the same caption.

    The target of row ``i`` is uniform over ``{j : groups[j] == groups[i]}`` (SupCon-style, as in UniCL). With all
    groups distinct it equals open_clip's ``ClipLoss``. When equal captions also have equal embeddings (a
    deterministic text tower fed the same tokens), it equals ``ClipLoss`` in value and gradient too: every positive
    of a group has the same log-probability, so spreading the target over them changes nothing (tested). It differs
    where captions of one group embed differently (text dropout, per-image templates with a shared group id).

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
