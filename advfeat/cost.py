"""What an evaluation costs, in the one measure that carries from a CPU to a GPU: the model's forward and backward
passes, counted per image.

Every attack called through ``Attack.__call__`` runs on a model that counts, while a ``counting()`` block is open,
the images it forwards and the images a gradient flows back through (a hook on the output: EOT's draws, FAB's
per-class gradients and APGD-T's targets are each counted as they happen, on the host, without a device sync).
A cascade counts its parts apart (``part``); ``advfeat.evaluate`` opens one block per attack and reports
``EvalResult.passes_per_image``.

Examples:
    >>> import torch, advfeat as af
    >>> from advfeat.cost import counting
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> x, y = torch.rand(5, 4), torch.zeros(5, dtype=torch.long)
    >>> with counting() as passes:
    ...     _ = af.L2PGD(0.5, steps=3)(model, x, y)
    >>> passes.backward  # 3 steps x 5 images
    15
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

__all__ = ["Passes", "counting", "part", "Counted"]


@dataclass
class Passes:
    """Images forwarded and images backpropagated through the model, and the same for each named part."""

    forward: int = 0
    backward: int = 0
    parts: dict[str, Passes] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def add(self, other: Passes) -> None:
        self.forward += other.forward
        self.backward += other.backward
        for name, p in other.parts.items():
            self.parts.setdefault(name, Passes()).add(p)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"forward": self.forward, "backward": self.backward}
        if self.parts:
            out["parts"] = {k: p.as_dict() for k, p in self.parts.items()}
        return out

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], where: str = "passes") -> Passes:
        """Read what ``as_dict`` wrote, checked (whole numbers >= 0)."""
        if not isinstance(record, Mapping):
            raise ValueError(f"{where} must be an object with forward and backward counts, got {record!r}")
        counts = []
        for key in ("forward", "backward"):
            v = record.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{where}.{key} must be a whole number >= 0, got {v!r}")
            counts.append(v)
        parts = record.get("parts", {})
        if not isinstance(parts, Mapping):
            raise ValueError(f"{where}.parts must be an object, got {parts!r}")
        return cls(counts[0], counts[1], {str(k): cls.from_dict(v, f"{where}.parts[{k!r}]") for k, v in parts.items()})


_OPEN: contextvars.ContextVar[tuple[Passes, ...]] = contextvars.ContextVar("advfeat_passes", default=())


@contextmanager
def counting() -> Iterator[Passes]:
    """Count the passes of every attack called inside the block (nested blocks count too)."""
    passes = Passes()
    token = _OPEN.set((*_OPEN.get(), passes))
    try:
        yield passes
    finally:
        _OPEN.reset(token)


@contextmanager
def part(name: str) -> Iterator[None]:
    """Inside an attack's run: count what the block costs as the part ``name`` of every enclosing count."""
    enclosing = _OPEN.get()
    if not enclosing:
        yield
        return
    with counting() as passes:
        yield
    for p in enclosing:
        p.parts.setdefault(name, Passes()).add(passes)


def active() -> bool:
    return bool(_OPEN.get())


class Counted(nn.Module):
    """``model``, counting into the open blocks the images it forwards and, through a hook on its output, the
    images a gradient flows back through."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.model(x)
        counts = _OPEN.get()
        n = int(x.shape[0])
        for p in counts:
            p.forward += n
        if counts and out.requires_grad:
            def backward(grad: Tensor) -> None:
                for p in counts:
                    p.backward += n
            out.register_hook(backward)  # type: ignore[no-untyped-call]
        return out
