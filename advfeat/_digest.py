"""Checksums and fingerprints: every hash advfeat writes or checks is built here from one encoding of a tensor.

* ``tensor_bytes``: a tensor's raw bytes (CPU, contiguous, native byte order);
* ``sha256_file``: a file's sha256 (constructed datasets' shards);
* ``fingerprint``: a short sha256 of a model's class name and state dict (ties a constructed set to its model);
* ``content_digest``: the sha256 of nested containers of tensors and values (a checkpoint's content).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["tensor_bytes", "sha256_file", "fingerprint", "content_digest"]


def tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of ``t``'s values (detached, on the CPU, contiguous)."""
    c = t.detach().cpu().contiguous()
    return c.reshape(-1).view(torch.uint8).numpy().tobytes() if c.numel() else b""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(model: nn.Module) -> str:
    """16 hex digits of the sha256 of ``model``'s class name, state-dict keys and values."""
    h = hashlib.sha256(type(model).__name__.encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(tensor_bytes(v))
    return h.hexdigest()[:16]


def content_digest(obj: Any) -> str:
    """sha256 of ``obj``'s content: every tensor's dtype, shape and bytes and every other value, mappings in key
    order (so a flipped bit anywhere changes it)."""
    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if isinstance(o, Tensor):
            h.update(f"T{o.dtype}{tuple(o.shape)}".encode())
            h.update(tensor_bytes(o))
        elif isinstance(o, Mapping):
            h.update(b"{")
            for k in sorted(o, key=str):
                h.update(repr(k).encode())
                walk(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()
