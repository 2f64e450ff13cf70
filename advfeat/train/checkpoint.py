"""Training checkpoints: one file per run, written atomically with a checksum, the previous one kept as
``<path>.prev``; the RNG states a bitwise resume needs; reading that never runs code.

A checkpoint is ``{"advfeat_checkpoint": 1, "sha256": <content digest of state>, "state": state}`` saved by
``torch.save``; ``state`` is ``AdversarialTrainer.state_dict()``. ``read_checkpoint`` verifies the digest and also
reads the unsigned checkpoints (``state`` alone) that earlier versions wrote.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._digest import content_digest
from .._io import TMP_SUFFIX, atomic_write

__all__ = ["read_checkpoint", "save_checkpoint", "recover", "rng_state", "set_rng_state", "previous", "what_was_kept"]


def previous(path: Path) -> Path:
    """Where the checkpoint that ``path`` replaced is kept."""
    return path.with_name(path.name + ".prev")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename) with a checksum of its content; the
    checkpoint it replaces is kept as ``<path>.prev`` (a damaged latest one costs one epoch). Non-finite weights
    (``state["model"]``) are refused, and on a full disk the last good checkpoint stays where a resume looks."""
    bad = [k for k, v in state["model"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(f"refusing to save a checkpoint with non-finite weights ({', '.join(bad[:3])}); "
                                 f"the last good one ({path}) is kept")
    p = Path(path)
    signed = {"advfeat_checkpoint": 1, "sha256": content_digest(state), "state": state}
    buffer = io.BytesIO()  # serialised first: its size is known before the disk is touched
    torch.save(signed, buffer)
    data = buffer.getbuffer()
    rotated = p.is_file() and not p.is_symlink()
    if rotated:
        os.replace(p, previous(p))
    try:
        atomic_write(p, lambda f: f.write(data), size=len(data))
    except OSError:
        if rotated:
            os.replace(previous(p), p)
        raise


def what_was_kept(path: Path) -> str:
    """The line a Ctrl-C prints: what the checkpoint at ``path`` holds, and how to continue."""
    if not path.exists():
        return (f"training interrupted before its first epoch finished: nothing was kept (the checkpoint {path} is "
                "written at the end of each epoch)")
    return f"training interrupted; the checkpoint {path} holds every finished epoch: call again with resume=True " \
           "to continue"


def recover(path: Path, resume: bool, temporaries: bool = True) -> None:
    """Before a run on ``path``: remove our own temporaries left by a write killed half-way (``temporaries``: the
    writing rank only), and (``resume``) put back the previous checkpoint when a kill fell between keeping it and
    writing the new one."""
    if temporaries:
        for tmp in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
    if resume and not path.exists() and previous(path).is_file():
        os.replace(previous(path), path)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state in a checkpoint the trainer wrote, its checksum verified. Loading never runs code
    (``weights_only=True``); a damaged, truncated or foreign file gets an error naming it and what to do."""
    p = Path(path)
    prev = previous(p)
    keep = (f"; the previous epoch's checkpoint is kept as {prev}: rename it to {p.name} to resume from it"
            if prev.is_file() else "")
    what = f"checkpoint {p} is damaged (truncated or changed) or is not a checkpoint advfeat wrote"
    try:
        signed = torch.load(p, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint: no file at {p}") from None
    except Exception as e:  # truncated, empty, random bytes, a pickle with code: all are "not ours"
        raise ValueError(f"{what} ({type(e).__name__}); delete it to start afresh{keep}") from None
    if isinstance(signed, dict) and {"fingerprint", "epoch", "model", "rng"} <= set(signed):
        unsigned: dict[str, Any] = signed  # a checkpoint without a checksum field: read as it is
        return unsigned
    if not isinstance(signed, dict) or "state" not in signed or "sha256" not in signed:
        raise ValueError(f"{what} (no advfeat checksum: written by another program); delete it to start "
                         f"afresh{keep}")
    if content_digest(signed["state"]) != signed["sha256"]:
        raise ValueError(f"{what}: its content does not match its checksum; delete it to start afresh{keep}")
    state: dict[str, Any] = signed["state"]
    return state


def rng_state(loader: Any) -> dict[str, Any]:
    """Every random state a resumed epoch draws from: torch (CPU and CUDA), Python, NumPy and the loader's own
    generators (its sampler's, its batch sampler's)."""
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": [str(np_state[0]), torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    for name, g in _loader_generators(loader):
        state[f"generator:{name}"] = g.get_state()
    return state


def set_rng_state(state: Mapping[str, Any], loader: Any) -> None:
    """Restore what ``rng_state`` recorded."""
    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in _loader_generators(loader):
        if f"generator:{name}" in state:
            g.set_state(state[f"generator:{name}"])


def _loader_generators(loader: Any) -> list[tuple[str, torch.Generator]]:
    found: list[tuple[str, torch.Generator]] = []
    for name, owner in (("loader", loader), ("sampler", getattr(loader, "sampler", None)),
                        ("batch_sampler", getattr(getattr(loader, "batch_sampler", None), "sampler", None))):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for _, h in found):
            found.append((name, g))
    return found
