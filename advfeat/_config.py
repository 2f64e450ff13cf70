"""Immutable, comparable configurations whose fields may hold tensors.

A frozen dataclass compares its fields as a tuple, which fails for a tensor of more than one element
("Boolean value of Tensor ... is ambiguous"). Threat models and attacks may carry per-sample tensors
(``eps`` of shape (N,), a box per channel), so they compare and hash through ``Config`` instead,
which treats a tensor as its dtype, shape and values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

__all__ = ["Config", "as_bound", "config_repr", "short"]


def _frozen(value: Any) -> Any:
    if isinstance(value, Tensor):
        v = value.detach().cpu()
        return ("tensor", str(v.dtype), tuple(v.shape), tuple(v.flatten().tolist()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


class Config:
    """Mixin for frozen dataclasses (declare them with ``eq=False``): equality and hash by field values."""

    def _key(self) -> tuple[Any, ...]:
        return tuple(_frozen(getattr(self, f.name)) for f in dataclasses.fields(self))  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((type(self).__qualname__, self._key()))


def as_bound(name: str, value: float | Tensor) -> float | Tensor:
    """Validate a box bound or eps given as a number or a tensor; return a float or a detached copy."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        if bool(torch.isnan(value).any()):
            raise ValueError(f"{name} must not contain NaN")
        return value.detach().clone()
    value = float(value)
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    return value


def short(value: Any) -> str:
    """A field's value as a configuration's repr shows it: a tensor by its shape, a function by its name."""
    if isinstance(value, Tensor):
        return f"tensor(shape={tuple(value.shape)})"
    if callable(value) and hasattr(value, "__name__"):
        return str(value.__name__)
    return repr(value)


def config_repr(config: Any) -> str:
    """``Name(field=value, ...)`` of a dataclass configuration, positional fields first, leaving out every field
    at its default (a tensor is never taken for its default)."""
    shown = []
    for f in sorted(dataclasses.fields(config), key=lambda f: bool(f.kw_only)):
        value = getattr(config, f.name)
        default = _default(f)
        if default is not dataclasses.MISSING and _same(value, default):
            continue
        shown.append(f"{f.name}={short(value)}")
    return f"{type(config).__name__}({', '.join(shown)})"


def _same(a: Any, b: Any) -> bool:
    return not isinstance(a, Tensor) and not isinstance(b, Tensor) and type(a) is type(b) and a == b


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING
