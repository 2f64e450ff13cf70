"""Input validation shared by attacks, evaluation and constructors: errors name the argument."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_batch", "check_device", "check_labels", "check_logits", "check_positive_int", "check_positive_float",
           "describe_differences"]


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_seed(name: str, value: object) -> int:
    """An int seed in ``[0, 2**63)``, what ``torch.Generator.manual_seed`` takes."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not 0 <= value < 2**63:
        raise ValueError(f"{name} must be in [0, 2**63), got {value}")
    return value


def check_positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    v = float(value)
    if not v > 0 or v != v or v == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return v


def check_batch(
    x: object, y: object, lower: float | Tensor = 0.0, upper: float | Tensor = 1.0
) -> tuple[Tensor, Tensor]:
    """Check a batch: ``x`` a finite floating tensor (N, ...) inside ``[lower, upper]``, ``y`` integer (N,).

    Returns ``(x, y)`` with ``y`` as int64 (a new tensor only if the dtype changes). One host sync.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or not x.is_floating_point():
        raise TypeError(f"x must be a real floating-point tensor of pixels, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, ...) with a batch dimension first, got shape {tuple(x.shape)}")
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor of labels, got {type(y).__name__}")
    if y.dtype == torch.bool or y.is_complex() or y.is_floating_point():
        raise TypeError(f"y must be an integer tensor of class labels, got dtype {y.dtype}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape (N,) = ({x.shape[0]},) to match x, got shape {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}; put them on the same device")
    if x.shape[0] == 0:
        return x, y.long()
    lo = torch.as_tensor(lower, device=x.device, dtype=x.dtype)
    hi = torch.as_tensor(upper, device=x.device, dtype=x.dtype)
    flags = torch.stack([
        (~torch.isfinite(x)).any(),
        ((x < lo) | (x > hi)).any(),
        (y < 0).any(),
    ]).tolist()
    if flags[0]:
        raise ValueError("x contains NaN or inf")
    if flags[1]:
        raise ValueError(
            f"x must lie in the box [lower, upper] = [{_show(lower)}, {_show(upper)}], found values in "
            f"[{x.min().item():g}, {x.max().item():g}]; attacks work in pixel space: put normalisation "
            "inside the model (advfeat.Normalize) and pass unnormalised inputs"
        )
    if flags[2]:
        raise ValueError(f"y must hold labels in [0, C), found {y.min().item()}")
    return x, y.long()


def check_logits(logits: object, y: Tensor, what: str = "model") -> int:
    """Check that ``logits`` is (N, C) for the batch and that every label is below C; return C."""
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != y.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{what} must return logits of shape (N, C) = ({y.shape[0]}, C), got {shape}")
    c = logits.shape[1]
    check_labels(y, c)
    return c


def check_labels(y: Tensor, c: int, what: str = "y") -> None:
    """Every label in ``[0, c)`` (one host sync)."""
    if y.numel() and bool(((y < 0) | (y >= c)).any()):
        raise ValueError(f"{what} must hold labels in [0, C) = [0, {c}), found [{int(y.min())}, {int(y.max())}]")


def check_device(name: str, device: object) -> torch.device:
    """``device`` as a ``torch.device`` that exists here; else an error naming the argument and what exists."""
    try:
        dev: torch.device = torch.device(device)  # type: ignore[call-overload]
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be a device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            have = "cpu" + "".join(f", cuda:{i}" for i in range(n))
            raise ValueError(f"{name}={str(device)!r}: no such CUDA device here (devices: {have})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={str(device)!r}: MPS is not available here (devices: cpu)")
    elif dev.type == "meta":
        raise ValueError(f"{name}='meta' holds no values: train and construct on 'cpu' or 'cuda'")
    return dev


def _show(v: float | Tensor) -> str:
    return f"tensor of shape {tuple(v.shape)}" if isinstance(v, Tensor) else f"{v:g}"


def describe_differences(before: Mapping[str, Any], now: Mapping[str, Any], where: str = "there",
                         here: str = "here") -> str:
    """Every key whose value differs between two records, as ``"key: <before> <where>, <now> <here>"`` joined by
    ``"; "`` in key order; ``""`` when they agree. The one wording of "what differs" in a refusal (a checkpoint,
    a construction folder, a replication folder).

    >>> describe_differences({"seed": 1, "n": 5}, {"seed": 0, "n": 5, "eps": 0.5})
    'eps: None there, 0.5 here; seed: 1 there, 0 here'
    """
    keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    return "; ".join(f"{k}: {before.get(k)!r} {where}, {now.get(k)!r} {here}" for k in keys)
