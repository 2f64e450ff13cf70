"""torch.distributed helpers that also work when no process group is running (one process)."""

from __future__ import annotations

import torch

__all__ = ["rank_world", "barrier", "broadcast_object", "all_gather_object"]


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


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank (``obj`` is ignored elsewhere); ``obj`` itself in one process."""
    d = torch.distributed
    if not (d.is_available() and d.is_initialized()):
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order, on every rank; ``[obj]`` in one process."""
    d = torch.distributed
    if not (d.is_available() and d.is_initialized()):
        return [obj]
    out: list[object] = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out
