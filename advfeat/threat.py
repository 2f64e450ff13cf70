"""Threat models: where an attack may move an input.

A threat model is a set around each input ``x`` (an L2 ball, an Linf ball, or nothing) intersected with
a box of valid pixel values (``[0, 1]`` by default). It supplies the three pieces the projected-gradient
engine needs, kept apart as in rai-toolbox:

* ``ThreatModel.init`` -- a random starting point,
* ``ThreatModel.direction`` -- the steepest-ascent direction of unit size for the gradient
  (L2: ``g / ||g||_2`` per sample; Linf: ``sign(g)``; ``Box``: ``g / ||g||_2``),
* ``ThreatModel.project_`` -- projection, in place, onto the ball and then clamping into the box.

Clamping into the box after the ball projection never leaves the ball: because ``x`` is inside the box,
clamping ``x + delta`` only shrinks each ``|delta_i|``. (The result is a feasible point of ball ∩ box,
not the Euclidean projection onto the intersection; this is what the robustness library does too.)

``eps`` is a float or a per-sample tensor of shape ``(N,)``; the box bounds are floats or tensors that
broadcast against the batch (for instance one value per channel, shape ``(C, 1, 1)``).

Examples:
    >>> import torch, advfeat as af
    >>> ball = af.L2Ball(0.5)
    >>> x = torch.rand(4, 3, 8, 8)
    >>> b = ball.bounds(x)
    >>> z = x + torch.randn_like(x)
    >>> _ = ball.project_(z, x, b)
    >>> bool(((z - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()), bool(z.min() >= 0), bool(z.max() <= 1)
    (True, True, True)
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._config import Config, as_bound

__all__ = ["ThreatModel", "L2Ball", "LinfBall", "Box", "Bounds", "ball", "per_sample_norm", "column", "clamp"]

_TINY = 1e-20


def column(values: Tensor, ndim: int) -> Tensor:
    """Reshape per-sample values (N,) to (N, 1, ..., 1) so they broadcast against a batch."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def clamp(z: Tensor, lower: float | Tensor, upper: float | Tensor, out: Tensor | None = None) -> Tensor:
    """``z`` clamped into the box ``[lower, upper]`` (floats, or tensors that broadcast against ``z``); in place
    when ``out`` is ``z``."""
    if isinstance(lower, Tensor) or isinstance(upper, Tensor):
        lo = torch.as_tensor(lower, dtype=z.dtype, device=z.device)
        hi = torch.as_tensor(upper, dtype=z.dtype, device=z.device)
        return z.clamp_(lo, hi) if out is z else z.clamp(lo, hi)
    return z.clamp_(lower, upper) if out is z else z.clamp(lower, upper)


def per_sample_norm(t: Tensor) -> Tensor:
    """L2 norm of each sample, shaped (N, 1, ..., 1)."""
    return column(torch.linalg.vector_norm(t.flatten(1), dim=1), t.ndim)


@dataclass(frozen=True)
class Bounds:
    """A threat model's parameters materialised for one batch: ``eps`` as an (N, 1, ..., 1) column (or
    None where there is no ball) and the box bounds as floats or tensors broadcast to the batch shape."""

    eps: Tensor | None
    lower: float | Tensor
    upper: float | Tensor

    def take(self, index: Tensor) -> Bounds:
        """The bounds of the samples ``index`` (a 1-D long tensor), for a compacted batch."""

        def pick(v: float | Tensor) -> float | Tensor:
            return v.index_select(0, index) if isinstance(v, Tensor) else v

        eps = self.eps.index_select(0, index) if self.eps is not None else None
        return Bounds(eps, pick(self.lower), pick(self.upper))


@dataclass(frozen=True, eq=False, repr=False)
class ThreatModel(Config, ABC):
    """Base class for threat models: a set around ``x`` intersected with the box ``[lower, upper]``.

    Subclass it for a custom threat model: implement ``init`` and ``direction``, and override
    ``shrink_`` to project a perturbation onto your set (the box clamp is done for you).
    """

    lower: float | Tensor = field(default=0.0, kw_only=True)
    upper: float | Tensor = field(default=1.0, kw_only=True)

    def __post_init__(self) -> None:
        lo = as_bound("lower", self.lower)
        hi = as_bound("upper", self.upper)
        object.__setattr__(self, "lower", lo)
        object.__setattr__(self, "upper", hi)
        ok = lo < hi if isinstance(lo, float) and isinstance(hi, float) else bool(torch.as_tensor(lo < hi).all())
        if not ok:  # floats (the usual case) are checked without building a tensor
            raise ValueError(f"lower must be below upper, got lower={lo} and upper={hi}")

    # -- what a subclass provides ----------------------------------------------------------------------
    @property
    def eps(self) -> float | Tensor | None:
        """The set's radius: a float or a per-sample tensor (N,) for a ball, None where there is no ball (a
        subclass that is a ball declares an ``eps`` field)."""
        return None

    @abstractmethod
    def init(self, x: Tensor, bounds: Bounds, generator: torch.Generator | None = None) -> Tensor:
        """A random starting point for each sample of ``x`` (the engine then projects it)."""

    @abstractmethod
    def direction(self, grad: Tensor) -> Tensor:
        """The steepest-ascent direction of unit size for ``grad`` (may reuse ``grad``'s storage)."""

    def shrink_(self, delta: Tensor, bounds: Bounds) -> Tensor:
        """Project the perturbation ``delta`` onto the set around 0, in place. Default: no ball."""
        return delta

    # -- shared machinery -----------------------------------------------------------------------------
    def bounds(self, x: Tensor) -> Bounds:
        """Materialise eps and the box for the batch ``x`` on its device and dtype."""
        n = x.shape[0]
        eps: Tensor | None = None
        e = self.eps
        if e is not None:
            if isinstance(e, Tensor):
                if e.ndim != 1 or e.shape[0] != n:
                    raise ValueError(
                        f"eps must be a float or a tensor of shape (N,) = ({n},), got shape {tuple(e.shape)}"
                    )
                eps = e.to(device=x.device, dtype=x.dtype)
            else:
                eps = torch.full((n,), e, device=x.device, dtype=x.dtype)
            eps = column(eps, x.ndim)

        def box(name: str, v: float | Tensor) -> float | Tensor:
            if not isinstance(v, Tensor):
                return v
            try:
                return torch.broadcast_to(v.to(device=x.device, dtype=x.dtype), x.shape)
            except RuntimeError:
                raise ValueError(
                    f"{name} of shape {tuple(v.shape)} does not broadcast to the batch shape {tuple(x.shape)}"
                ) from None

        return Bounds(eps, box("lower", self.lower), box("upper", self.upper))

    def clamp_(self, z: Tensor, bounds: Bounds) -> Tensor:
        """Clamp ``z`` into the box, in place."""
        return clamp(z, bounds.lower, bounds.upper, out=z)

    def __repr__(self) -> str:
        return _repr(type(self).__name__, self.eps, self.lower, self.upper)

    def select(self, index: Tensor) -> ThreatModel:
        """This threat model for the samples ``index`` (a 1-D long tensor) of its batch: a per-sample ``eps``
        follows them (a ball overrides this); everything else is shared by the whole batch."""
        return self

    def project_(self, z: Tensor, x: Tensor, bounds: Bounds) -> Tensor:
        """Move the point ``z`` into the set around ``x`` and the box, in place; returns ``z``."""
        if bounds.eps is not None:
            z.sub_(x)
            self.shrink_(z, bounds)
            z.add_(x)
        return self.clamp_(z, bounds)



def _check_eps(eps: float | Tensor) -> float | Tensor:
    e = as_bound("eps", eps)
    if isinstance(e, float):  # the usual case: no tensor, no host sync
        if not e >= 0:  # inf is allowed: the box alone
            raise ValueError(f"eps must be >= 0, got {e}")
        return e
    if not bool(torch.as_tensor(e >= 0).all()):
        raise ValueError(f"eps must be >= 0, got {e}")
    if isinstance(e, Tensor) and e.ndim != 1:
        raise ValueError(f"eps must be a float or a tensor of shape (N,), got shape {tuple(e.shape)}")
    return e


def _l2_normalize_(grad: Tensor) -> Tensor:
    return grad.div_(per_sample_norm(grad).clamp_min_(_TINY))


@dataclass(frozen=True, eq=False, repr=False)
class _Ball(ThreatModel):
    """A ball of radius ``eps`` (a float >= 0, or a per-sample tensor of shape (N,)) around ``x``."""

    eps: float | Tensor = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "eps", _check_eps(self.eps))

    def select(self, index: Tensor) -> ThreatModel:
        if not isinstance(self.eps, Tensor):
            return self
        return dataclasses.replace(self, eps=self.eps.index_select(0, index.to(self.eps.device)))


@dataclass(frozen=True, eq=False, repr=False)
class L2Ball(_Ball):
    """The L2 ball ``||delta||_2 <= eps`` (per sample) intersected with the box.

    Random init is uniform in the ball by volume: a Gaussian direction scaled to radius
    ``eps * u**(1/d)``, ``u ~ U(0, 1)``, ``d`` the number of elements of one sample. For image-sized
    ``d`` almost all of that volume is next to the sphere, as in the robustness library's surface init.
    """

    def init(self, x: Tensor, bounds: Bounds, generator: torch.Generator | None = None) -> Tensor:
        assert bounds.eps is not None
        n = x.shape[0]
        d = x[0].numel() if n else 1
        g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        u = torch.rand((n,), generator=generator, device=x.device, dtype=x.dtype)
        r = column(u.pow_(1.0 / d), x.ndim).mul_(bounds.eps)
        return g.mul_(r / per_sample_norm(g).clamp_min_(_TINY)).add_(x)

    def direction(self, grad: Tensor) -> Tensor:
        return _l2_normalize_(grad)

    def shrink_(self, delta: Tensor, bounds: Bounds) -> Tensor:
        assert bounds.eps is not None
        scale = (bounds.eps / per_sample_norm(delta).clamp_min_(_TINY)).clamp_(max=1.0)
        return delta.mul_(scale)


@dataclass(frozen=True, eq=False, repr=False)
class LinfBall(_Ball):
    """The Linf ball ``max_i |delta_i| <= eps`` intersected with the box. Random init: uniform in the ball."""

    def init(self, x: Tensor, bounds: Bounds, generator: torch.Generator | None = None) -> Tensor:
        assert bounds.eps is not None
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return u.mul_(2).sub_(1).mul_(bounds.eps).add_(x)

    def direction(self, grad: Tensor) -> Tensor:
        return grad.sign_()

    def shrink_(self, delta: Tensor, bounds: Bounds) -> Tensor:
        """Clamp every element to ``[-eps, eps]`` in place (eps broadcast per sample)."""
        assert bounds.eps is not None
        return torch.maximum(torch.minimum(delta, bounds.eps, out=delta), -bounds.eps, out=delta)


@dataclass(frozen=True, eq=False, repr=False)
class Box(ThreatModel):
    """No ball: only the box ``[lower, upper]``. Steps are L2-normalised gradients (as in the paper's
    representation inversion); random init is uniform noise in the box."""

    def init(self, x: Tensor, bounds: Bounds, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return u.mul_(bounds.upper - bounds.lower).add_(bounds.lower)

    def direction(self, grad: Tensor) -> Tensor:
        return _l2_normalize_(grad)


def _repr(name: str, eps: float | Tensor | None, lower: float | Tensor, upper: float | Tensor) -> str:
    def show(v: float | Tensor) -> str:
        return f"tensor(shape={tuple(v.shape)})" if isinstance(v, Tensor) else f"{v:g}"

    parts = [] if eps is None else [show(eps)]
    if not (lower == 0.0 and upper == 1.0) or isinstance(lower, Tensor) or isinstance(upper, Tensor):
        parts += [f"lower={show(lower)}", f"upper={show(upper)}"]
    return f"{name}({', '.join(parts)})"


_NORMS: dict[str, type[L2Ball] | type[LinfBall]] = {"l2": L2Ball, "2": L2Ball, "linf": LinfBall, "inf": LinfBall}


def ball(norm: str, eps: float | Tensor, *, lower: float | Tensor = 0.0,
         upper: float | Tensor = 1.0) -> ThreatModel:
    """The ball of the named norm: ``"l2"`` or ``"linf"`` (also ``"2"``, ``"inf"``).

    Examples:
        >>> ball("linf", 8 / 255)
        LinfBall(0.0313725)
    """
    key = str(norm).lower().replace("_", "")
    if key not in _NORMS:
        raise ValueError(f"norm must be one of 'l2' or 'linf', got {norm!r}")
    return _NORMS[key](eps, lower=lower, upper=upper)
