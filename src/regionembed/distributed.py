"""The default process group as the library sees it (plain torch; Lightning sets the group up, nothing here does)."""

from __future__ import annotations

import torch

__all__ = ["world"]


def world() -> tuple[int, int]:
    """``(world_size, rank)`` of the default process group, ``(1, 0)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0
