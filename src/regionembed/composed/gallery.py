"""The retrieval gallery of composed image retrieval: rows gathered from every rank, deduplicated by image key."""

from __future__ import annotations

import torch

from ..distributed import world

__all__ = ["build_gallery", "gather_rows"]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` ``[n_r, ...]`` of every rank in rank order (uneven ``n_r`` allowed, no gradient).

    A collective: every rank must call it, with the same dtype and trailing shape.
    """
    world_size, _ = world()
    if world_size == 1:
        return x
    dist = torch.distributed
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size)]
    dist.all_gather(sizes, n)
    largest = int(max(s.item() for s in sizes))
    padded = x.new_zeros((largest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def build_gallery(
    keys: torch.Tensor, embeddings: torch.Tensor, target_keys: torch.Tensor, reference_keys: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deduplicate gallery images by key and locate each query's target and reference in it.

    Args:
        keys: ``[M]`` int64 image keys of the gallery candidates (the same image may come several times).
        embeddings: ``[M, D]`` their embeddings.
        target_keys: ``[Q]`` key of each query's target (must be among ``keys``).
        reference_keys: ``[Q]`` key of each query's reference image.

    Returns:
        ``(gallery [G, D], target [Q], exclude [Q])``: indices into the gallery; ``exclude`` is ``-1`` where the
        reference is not in the gallery.
    """
    uniq, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((len(uniq),), len(keys), dtype=torch.long, device=keys.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(keys), device=keys.device), reduce="amin")
    gallery = embeddings[first]

    def locate(k: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(uniq, k).clamp_max(len(uniq) - 1)
        return torch.where(uniq[pos] == k, pos, torch.full_like(pos, -1))

    target = locate(target_keys)
    if bool((target < 0).any()):
        raise ValueError("some targets are not in the gallery")
    exclude = locate(reference_keys)
    exclude = torch.where(exclude == target, torch.full_like(exclude, -1), exclude)
    return gallery, target, exclude
