"""torch.distributed helpers that also work when no process group is running (one process)."""

from __future__ import annotations

import torch

__all__ = ["rank_world", "barrier"]


def rank_world() -> tuple[int, int]:
    """``(rank, world size)``: ``(0, 1)`` without an initialised process group."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank; a no-op in one process."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        d.barrier()
