"""A training sampler that resumes mid-epoch exactly where a checkpointed run stopped."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..distributed import world  # noqa: F401  (re-exported: the old home of `world`)

__all__ = ["ResumableLoader", "ResumableSampler"]


class ResumableSampler(DistributedSampler):
    """Shuffled (or sequential) order that is a pure function of ``(seed, epoch)``, with a one-shot skip.

    ``skip(n)`` drops the first ``n`` samples of the next iteration only, so that a run restored from a mid-epoch
    checkpoint sees exactly the batches the interrupted run had not consumed yet (:class:`ResumableLoader` calls it
    from the checkpoint's loader state). Being a
    ``DistributedSampler``, Lightning keeps it under DDP (each rank iterates its own, disjoint share) instead of
    replacing it.

    Args:
        dataset: the dataset (only its length is used).
        num_replicas: world size (1 without DDP).
        rank: this process's rank.
        shuffle: shuffle with ``torch.Generator().manual_seed(seed + epoch)``.
        seed: base seed.
        block: keep runs of ``block`` consecutive indices together (shuffled and shared between ranks as units),
            e.g. 2 for datasets of (image, hard negative) pairs; ``len(dataset)`` must be a multiple.
    """

    def __init__(
        self,
        dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        block: int = 1,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        if block < 1 or len(dataset) % block:
            raise ValueError(f"dataset length {len(dataset)} is not a multiple of block={block}")
        self.block = block
        blocks = len(dataset) // block
        self.num_samples = math.ceil(blocks / num_replicas) * block
        self.total_size = self.num_samples * num_replicas
        self._skip = 0

    def skip(self, samples: int) -> None:
        """Skip the first ``samples`` indices of this rank's next iteration."""
        if samples < 0:
            raise ValueError(f"cannot skip {samples} samples")
        self._skip = int(samples)

    def __iter__(self) -> Iterator[int]:
        blocks = len(self.dataset) // self.block
        if self.shuffle:
            order = torch.randperm(blocks, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(blocks))
        per_rank = self.num_samples // self.block
        pad = per_rank * self.num_replicas - blocks
        order += (order * math.ceil(pad / max(1, blocks)))[:pad]  # pad with repeats, as DistributedSampler does
        mine = order[self.rank :: self.num_replicas]
        indices = [b * self.block + j for b in mine for j in range(self.block)]
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])

    def __len__(self) -> int:
        # The epoch's length, skip or not: Lightning counts a resumed epoch's batches from the restored position.
        return self.num_samples


class ResumableLoader(DataLoader):
    """A training DataLoader whose position Lightning saves in checkpoints and restores before iterating.

    ``state_dict()`` records ``(epoch, batches processed in it)`` as the trainer reports them at checkpoint time
    (``progress_fn``); ``load_state_dict()`` sets the sampler's epoch and skips those batches. Lightning calls it
    before creating the iterator, also when worker processes prefetch, so the resumed run sees exactly the batches
    the interrupted run had not trained on. Requires a :class:`ResumableSampler`.
    """

    def __init__(self, *args, progress_fn: Callable[[], tuple[int, int]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError("ResumableLoader needs a ResumableSampler")
        self.progress_fn = progress_fn

    def state_dict(self) -> dict[str, int]:
        epoch, processed = self.progress_fn()
        return {"epoch": int(epoch), "batches": int(processed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: ResumableSampler = self.sampler
        sampler.set_epoch(state["epoch"])
        skip = state["batches"] * self.batch_size
        if skip < sampler.num_samples:  # a checkpoint at the end of an epoch resumes with the next one, whole
            sampler.skip(skip)
