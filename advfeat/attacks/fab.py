"""FAB, the Fast Adaptive Boundary attack (Croce and Hein, ICML 2020): a minimum-norm attack that walks to the
decision boundary along its linear approximation, and AutoAttack's third member in its targeted form (FAB-T).

Each step linearises the margin ``f = z_t - z_y`` (target ``t``, true class ``y``) at the current point ``x1`` and
projects both ``x1`` and the clean point ``x0`` onto the hyperplane ``f(x1) + g . (z - x1) = 0`` inside the box,
each by the smallest step in the attack's norm (``_to_plane``). The next point mixes the two projections, biased
towards the one from ``x0`` by ``alpha = min(|d1| / (|d1| + |d2|), alpha_max)`` and overshooting by ``eta``; a
point that is adversarial is recorded when it is the closest to ``x0`` so far and pulled back towards ``x0`` by
``beta``. Untargeted FAB (``n_target_classes=0``) takes, at every step, the class whose linearised boundary is
nearest, which needs every class's gradient (C backward passes a step); FAB-T runs one target class at a time,
the most likely wrong classes first, with one backward pass a step.

An ``Attack`` like the others: it returns, per sample, the closest adversarial point it found when that point is
inside the ``eps`` ball, and the clean point otherwise (a sample already misclassified is returned as it is).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_logits, check_positive_float, check_positive_int
from ..engine import working_dtype
from ..threat import ThreatModel, clamp, column
from .base import BallAttack, Criterion

__all__ = ["FAB"]


@dataclass(frozen=True, eq=False, repr=False)
class FAB(BallAttack):
    """FAB in the Linf (default) or L2 norm, inside the box ``[lower, upper]``, or in ``threat=af.LinfBall(...)``
    / ``af.L2Ball(...)`` (eps a float or a per-sample (N,) tensor); ``FAB(eps, n_target_classes=9)`` is AutoAttack's
    FAB-T. A point counts as adversarial by ``criterion`` (default: misclassified).

    ``steps``: iterations per run (the reference's 100; each costs a forward-backward pass and a forward pass);
    ``n_target_classes``: FAB-T, one run per class among that many most likely wrong ones (by the clean logits),
    a sample broken by one target is not attacked with the next (0: untargeted FAB); ``restarts``: runs per target,
    the first from the clean point and each further one from a random point at half ``eps``; ``alpha_max``,
    ``eta``, ``beta``: the reference's step parameters (0.1, 1.05, 0.9).

    Examples:
        >>> import torch, advfeat as af
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4)).eval()
        >>> x, y = torch.rand(6, 3, 2, 2), torch.randint(0, 4, (6,))
        >>> x_adv = af.FAB(0.1, n_target_classes=3, steps=20)(model, x, y)
        >>> bool(((x_adv - x).abs() <= 0.1 + 1e-6).all())
        True
    """

    eps: float | Tensor | None = None
    norm: str = field(default="linf", kw_only=True)
    steps: int = field(default=100, kw_only=True)
    n_target_classes: int = field(default=0, kw_only=True)
    restarts: int = field(default=1, kw_only=True)
    alpha_max: float = field(default=0.1, kw_only=True)
    eta: float = field(default=1.05, kw_only=True)
    beta: float = field(default=0.9, kw_only=True)
    seed: int | None = field(default=None, kw_only=True)
    lower: float | Tensor = field(default=0.0, kw_only=True)
    upper: float | Tensor = field(default=1.0, kw_only=True)
    threat: ThreatModel | None = field(default=None, kw_only=True)
    criterion: Criterion | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        BallAttack.__post_init__(self)
        check_positive_int("steps", self.steps)
        check_positive_int("n_target_classes", self.n_target_classes, minimum=0)
        check_positive_int("restarts", self.restarts)
        if not 0 <= self.alpha_max <= 1:
            raise ValueError(f"alpha_max must be in [0, 1], got {self.alpha_max}")
        check_positive_float("eta", self.eta)
        if not 0 < self.beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {self.beta}")

    def distance(self, delta: Tensor) -> Tensor:
        """The attack's norm of each sample of ``delta`` (N, ...), shape (N,)."""
        flat = delta.flatten(1)
        return flat.abs().amax(1) if self.norm == "linf" else flat.norm(dim=1)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        xw = x.detach().to(working_dtype(x.dtype))  # the walk's arithmetic; the model sees x's dtype

        def forward(z: Tensor) -> Tensor:
            out: Tensor = model(z.to(x.dtype))
            return out.float()

        t = self.threat_model()
        bounds = t.bounds(xw)
        e = t.eps
        assert e is not None
        eps = e if isinstance(e, float) else e.to(xw)  # (N,) for a per-sample eps
        lo, hi = (b if isinstance(b, float) else b.flatten(1)[:1] for b in (bounds.lower, bounds.upper))
        box = (lo, hi)
        criterion = self.success_criterion()
        with torch.no_grad():
            logits = forward(xw)
        c = check_logits(logits, y)
        if self.n_target_classes > c - 1:
            raise ValueError(f"n_target_classes must be at most C - 1 = {c - 1} for this model, got "
                             f"{self.n_target_classes}")
        ranked = logits.float().scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)
        out = xw.clone()
        alive = (~criterion(logits, y)).nonzero().squeeze(1)  # samples broken already are returned as they are
        for j in range(max(self.n_target_classes, 1)):
            for r in range(self.restarts):
                if alive.numel() == 0:
                    return out  # the working dtype: Attack.__call__ rounds it towards x
                target = ranked[alive, j] if self.n_target_classes else None
                x0 = xw.index_select(0, alive)
                radius = eps if isinstance(eps, float) else eps.index_select(0, alive)
                start = x0 if r == 0 else self._random_start(x0, radius, box, generator)
                found, dist = self._walk(forward, x0, y.index_select(0, alive), target, start, box, criterion)
                broken = dist <= radius  # one host sync per target and restart, none per step
                out.index_copy_(0, alive[broken], found[broken])
                alive = alive[~broken]
        return out

    def _random_start(self, x0: Tensor, eps: float | Tensor, box: tuple[float | Tensor, float | Tensor],
                      generator: torch.Generator | None) -> Tensor:
        """A random point at distance ``eps / 2`` from ``x0`` in the attack's norm, clipped to the box."""
        if self.norm == "linf":
            t = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * 2 - 1
        else:
            t = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        scale = 0.5 * eps / self.distance(t).clamp_min(1e-12)
        return clamp(x0.flatten(1) + t.flatten(1) * scale[:, None], *box).view_as(x0)

    def _walk(self, forward: Callable[[Tensor], Tensor], x0: Tensor, y: Tensor, target: Tensor | None,
              x1: Tensor, box: tuple[float | Tensor, float | Tensor], criterion: Criterion) -> tuple[Tensor, Tensor]:
        """One run from ``x1``: the closest adversarial point found per sample and its distance (inf if none)."""
        n = x0.shape[0]
        flat0 = x0.flatten(1)
        best, best_dist = x0.clone(), torch.full((n,), float("inf"), device=x0.device, dtype=x0.dtype)
        for _ in range(self.steps):
            f, g = self._plane(forward, x1, y, target)
            flat1 = x1.flatten(1)
            b = (g * flat1).sum(1) - f  # the linearised boundary: g . z = b
            d = _to_plane(torch.cat([flat1, flat0]), torch.cat([g, g]), torch.cat([b, b]), self.norm, *box)
            size = self.distance(d).clamp_min(1e-8)
            alpha = (size[:n] / (size[:n] + size[n:])).clamp(0.0, self.alpha_max)[:, None]
            step = (flat1 + self.eta * d[:n]) * (1 - alpha) + (flat0 + self.eta * d[n:]) * alpha
            x1 = clamp(step, *box).view_as(x0)
            with torch.no_grad():
                adversarial = criterion(forward(x1), y)
            dist = self.distance(x1 - x0)
            closer = adversarial & (dist < best_dist)
            best = torch.where(column(closer, x0.ndim), x1, best)
            best_dist = torch.where(closer, dist, best_dist)
            back = column(adversarial, x0.ndim)
            x1 = torch.where(back, x0 + self.beta * (x1 - x0), x1)
        return best, best_dist

    def _plane(self, forward: Callable[[Tensor], Tensor], x1: Tensor, y: Tensor,
               target: Tensor | None) -> tuple[Tensor, Tensor]:
        """The margin ``f = z_k - z_y`` at ``x1`` and its gradient (flat), for the target ``k``, or untargeted for
        the class whose linearised boundary is nearest in the attack's norm."""
        with torch.enable_grad():
            z = x1.detach().requires_grad_(True)
            logits = forward(z)
            rows = torch.arange(x1.shape[0], device=x1.device)
            if target is not None:
                margin = logits[rows, target] - logits[rows, y]
                (grad,) = torch.autograd.grad(margin.sum(), z)
                return margin.detach().to(x1.dtype), grad.flatten(1)
            grads = [torch.autograd.grad(logits[:, k].sum(), z, retain_graph=k < logits.shape[1] - 1)[0].flatten(1)
                     for k in range(logits.shape[1])]
        jac = torch.stack(grads, 1)  # (n, C, D)
        margins = (logits - logits[rows, y][:, None]).detach().to(x1.dtype)
        slopes = jac - jac[rows, y][:, None]
        dual = slopes.abs().sum(2) if self.norm == "linf" else slopes.norm(dim=2)
        reach = margins.abs() / (dual + 1e-12)
        reach[rows, y] = float("inf")
        k = reach.argmin(1)
        return margins[rows, k], slopes[rows, k]


def _to_plane(t: Tensor, w: Tensor, b: Tensor, norm: str, lower: float | Tensor, upper: float | Tensor) -> Tensor:
    """Per row of ``t`` (n, D): the smallest step ``d`` in the norm with ``w . (t + d) = b`` and ``t + d`` inside
    ``[lower, upper]``; where the box does not reach the plane, the step to the box's corner nearest to it.

    With ``c = w . t - b`` made positive (flipping ``w``), coordinate ``i`` moves against ``w_i``'s sign by
    ``min(lam * s_i, cap_i) / |w_i|`` and lowers ``w . z`` by ``min(lam * s_i, cap_i)``, where ``cap_i`` is
    ``|w_i|`` times its room to the box and the slope ``s_i`` is ``|w_i|`` (Linf: every free coordinate moves by
    ``lam``) or ``w_i^2`` (L2: the free coordinates move along ``w``). The total fall is piecewise linear and
    increasing in ``lam``, so ``lam`` is found by sorting the knees ``cap_i / s_i`` and one search."""
    c = (w * t).sum(1) - b
    w = torch.where((c < 0)[:, None], -w, w)
    c = c.abs()
    size = w.abs()
    room = torch.where(w > 0, t - lower, upper - t).clamp_min(0)
    slope = size if norm == "linf" else size.square()
    cap = size * room
    knee = torch.where(slope > 0, cap / slope.clamp_min(1e-30), float("inf"))
    knee, order = knee.sort(1)
    slope_s, cap_s = slope.gather(1, order), cap.gather(1, order)
    free = slope_s.flip(1).cumsum(1).flip(1)  # the slope of the coordinates from the k-th knee on
    after = F.pad(free[:, 1:], (0, 1))
    spent = cap_s.cumsum(1)  # the fall of the coordinates saturated up to the k-th knee
    fall = spent + torch.where(after > 0, knee, torch.zeros_like(knee)) * after  # the fall at the k-th knee
    k = torch.searchsorted(fall.contiguous(), c[:, None].contiguous()).squeeze(1)
    reached = k < t.shape[1]
    k = k.clamp(max=t.shape[1] - 1)[:, None]
    before = torch.where(k > 0, spent.gather(1, (k - 1).clamp_min(0)), torch.zeros_like(c[:, None]))
    lam = (c[:, None] - before) / free.gather(1, k).clamp_min(1e-30)
    move = torch.where(reached[:, None], torch.minimum(lam * slope, cap), cap)
    return -torch.sign(w) * torch.where(size > 0, move / size.clamp_min(1e-30), torch.zeros_like(move))
