"""Step rules: how the one engine turns a gradient into the next iterate.

The engine (``advfeat.engine.optimize``) computes, at every step ``t``, the objective and its gradient at
the current iterate ``z``; a step rule proposes the next iterate; the engine projects it onto the threat
model's set (and freezes samples that early stopping has finished). Threat models say *where* an iterate may
go; step rules say *how far and in which direction* it goes (rai-toolbox keeps the same two apart).

A rule is a small immutable configuration (a frozen dataclass) with one method to write,
``StepRule.step``. It sees the problem as **ascent**: ``grad`` is the gradient of ``score``, and a higher
score is always better (the engine negates both for a minimisation). Whatever a rule must remember between
steps lives in ``state``: a dict of **per-sample tensors** (first dimension = the batch), which the engine
compacts together with the batch when early stopping drops finished samples, so a rule never needs to know
about early stopping. A rule that wraps another shares its state dict: use keys of your own, and detect the first
step by the absence of your own key, not by an empty dict. A step should be a few whole-batch tensor ops with no
host synchronisation.

Built in:

* ``Constant`` -- ``z + a * direction(grad)``: the 2017 recipe of the paper's code (default of attacks).
* ``Momentum`` -- a running sum of unit directions, stepped along with the constant's length.
* ``Adam`` -- per-coordinate Adam on the raw gradient, ``a`` its learning rate; meant for box-only
  problems such as representation matching.
* ``APGDStep`` -- the adaptive rule of APGD (Croce & Hein, ICML 2020): momentum 0.75, the step halved at
  checkpoints where the objective stalled, and a restart from the best point.
* ``Cosine``, ``Linear`` -- step-size schedules around any rule: ``Cosine(Adam())`` (a schedule
  of your own: subclass ``Schedule`` and write ``factor(t, steps)``).
* ``RelativeToStart`` -- step sizes as fractions of each sample's distance from its start to ``x``
  (robustify's default: ``RelativeToStart(Cosine())``).

A rule of your own (here, Nesterov-style momentum):

Examples:
    >>> import torch, advfeat as af
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True, eq=False)
    ... class Nesterov(af.steps.StepRule):
    ...     momentum: float = 0.9
    ...     def step(self, z, grad, score, state, ctx):
    ...         d = ctx.direction(grad)
    ...         v = state["v"] = state["v"].mul_(self.momentum).add_(d) if "v" in state else d.clone()
    ...         return z.add_(ctx.direction(d.add(v, alpha=self.momentum)).mul_(ctx.step_size))
    >>> attack = af.L2PGD(0.5, steps=10, rule=Nesterov())
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> attack(model, torch.rand(2, 1, 2, 2), torch.tensor([0, 1])).shape
    torch.Size([2, 1, 2, 2])
"""

from __future__ import annotations

import dataclasses
import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._checks import check_positive_float
from ._config import Config
from .threat import Bounds, ThreatModel, column

__all__ = ["StepRule", "StepContext", "State", "Constant", "Momentum", "Adam", "APGDStep", "RelativeToStart",
           "Schedule", "Cosine", "Linear", "apgd_checkpoints"]

State = dict[str, Tensor]
"""A rule's memory between steps: per-sample tensors, first dimension = the (current) batch size."""


@dataclass(frozen=True)
class StepContext:
    """What a rule may know about the step it takes.

    ``t``: the step index (0 to ``steps - 1``); ``step_size``: the positive base step length, a float or a
    per-sample column ``(n, 1, ..., 1)``; ``x``: the centres of the threat model's sets (the current batch);
    ``direction`` and ``project_`` are the threat model's.
    """

    t: int
    steps: int
    step_size: float | Tensor
    x: Tensor
    threat: ThreatModel
    bounds: Bounds

    def direction(self, grad: Tensor) -> Tensor:
        """The threat model's steepest-ascent direction of unit size (L2: ``g / ||g||``; Linf: ``sign(g)``).
        May reuse ``grad``'s storage: pass a copy if you need ``grad`` afterwards."""
        return self.threat.direction(grad)

    def project_(self, z: Tensor) -> Tensor:
        """Move ``z`` into the threat model's set and the box, in place."""
        return self.threat.project_(z, self.x, self.bounds)

    def scaled(self, factor: float | Tensor) -> StepContext:
        """This context with the step size multiplied by ``factor`` (a float, or a per-sample column): how
        schedules and ``RelativeToStart`` act."""
        return dataclasses.replace(self, step_size=self.step_size * factor)


@dataclass(frozen=True, eq=False)
class StepRule(Config, ABC):
    """Base class of step rules: a frozen dataclass with one method, ``step``. See the module docs."""

    @abstractmethod
    def step(self, z: Tensor, grad: Tensor, score: Tensor, state: State, ctx: StepContext) -> Tensor:
        """Return the next iterate (the engine projects it).

        Args:
            z: the current iterates (n, ...), in the working dtype; yours to modify in place.
            grad: the gradient of ``score`` at ``z`` (ascent); yours to modify in place.
            score: the objective per sample (n,), higher is better; do not modify it.
            state: per-sample tensors kept between steps (empty at the first step).
            ctx: the step index, the base step size, the threat model's direction and projection.
        """


@dataclass(frozen=True, eq=False)
class Constant(StepRule):
    """``z + step_size * direction(grad)``: a fixed step along the normalised gradient (L2) or its sign (Linf).

    Examples:
        >>> Constant()
        Constant()
    """

    def step(self, z: Tensor, grad: Tensor, score: Tensor, state: State, ctx: StepContext) -> Tensor:
        return z.add_(ctx.direction(grad).mul_(ctx.step_size))


@dataclass(frozen=True, eq=False)
class Momentum(StepRule):
    """A running sum of unit directions ``v = momentum * v + direction(grad)``, stepped along
    ``direction(v)`` with the constant rule's length (the momentum of MI-FGSM, Dong et al. 2018)."""

    momentum: float = 0.9

    def __post_init__(self) -> None:
        _check_fraction("momentum", self.momentum)

    def step(self, z: Tensor, grad: Tensor, score: Tensor, state: State, ctx: StepContext) -> Tensor:
        d = ctx.direction(grad)
        v = state["velocity"] = state["velocity"].mul_(self.momentum).add_(d) if "velocity" in state else d.clone()
        return z.add_(ctx.direction(v.clone()).mul_(ctx.step_size))


@dataclass(frozen=True, eq=False)
class Adam(StepRule):
    """Per-coordinate Adam (Kingma & Ba 2015) on the raw gradient; the step size is its learning rate.

    Each coordinate moves by about ``step_size`` whatever the gradient's scale, so the step is not a length
    in the threat model's norm: this rule is meant for box-only problems (representation matching).
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _check_fraction("beta1", self.beta1)
        _check_fraction("beta2", self.beta2)
        check_positive_float("eps", self.eps)

    def step(self, z: Tensor, grad: Tensor, score: Tensor, state: State, ctx: StepContext) -> Tensor:
        if "m" not in state:
            state["m"], state["v"] = torch.zeros_like(grad), torch.zeros_like(grad)
        m, v = state["m"], state["v"]
        m.mul_(self.beta1).add_(grad, alpha=1 - self.beta1)
        v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        k = ctx.t + 1
        denom = v.div(1 - self.beta2**k).sqrt_().add_(self.eps)
        return z.add_(m.div(denom).mul_(ctx.step_size / (1 - self.beta1**k)))


@functools.lru_cache(maxsize=64)
def apgd_checkpoints(steps: int) -> tuple[int, ...]:
    """The steps after which APGD may halve its step: the first after 22% of the budget, then ever shorter
    intervals (3% less each time, at least 6%), as in the reference implementation.

    Examples:
        >>> apgd_checkpoints(100)
        (22, 41, 57, 70, 80, 87, 93, 99)
    """
    first, decrease, shortest = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, t, gap = [], first, first
    while t < steps:
        out.append(t)
        gap = max(gap - decrease, shortest)
        t += gap
    return tuple(out)


@dataclass(frozen=True, eq=False)
class APGDStep(StepRule):
    """APGD's adaptive step (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks", ICML 2020).

    The step starts at ``step_size`` (APGD: 2 eps). Each step goes to ``z1 = P(z + eta * direction(grad))``
    and then to ``P(z + momentum * (z1 - z) + (1 - momentum) * (z - z_prev))`` (no momentum at the first step).
    At each checkpoint (``apgd_checkpoints``) a sample whose score rose in at most ``rho`` of the steps
    since the last checkpoint, or whose step was not halved last time and whose best score has not improved
    since, halves its step and restarts from its best point so far. Everything is per sample.
    """

    momentum: float = 0.75
    rho: float = 0.75

    def __post_init__(self) -> None:
        _check_fraction("momentum", self.momentum)
        _check_fraction("rho", self.rho)

    def step(self, z: Tensor, grad: Tensor, score: Tensor, state: State, ctx: StepContext) -> Tensor:
        col = functools.partial(column, ndim=z.ndim)
        if "eta" not in state:  # the first step (a wrapper may share the state dict: test for our own key)
            eta = torch.ones((z.shape[0],), device=z.device, dtype=z.dtype)
            state.update(eta=col(eta).mul(ctx.step_size).reshape(-1), best_z=z.clone(), best_grad=grad.clone(),
                         best=score.clone(), last=score.clone(), rises=torch.zeros_like(score),
                         best_at_check=score.clone(), halved=torch.ones_like(score, dtype=torch.bool))
        else:
            state["rises"] += score > state["last"]
            state["last"] = score.clone()
            better = score > state["best"]
            state["best"] = torch.where(better, score, state["best"])
            state["best_z"] = torch.where(col(better), z, state["best_z"])
            state["best_grad"] = torch.where(col(better), grad, state["best_grad"])
        checks = apgd_checkpoints(ctx.steps)
        if ctx.t in checks:
            i = checks.index(ctx.t)
            window = ctx.t - (checks[i - 1] if i else 0)
            stalled = state["rises"] <= self.rho * window
            stalled |= ~state["halved"] & (state["best_at_check"] >= state["best"])
            state.update(halved=stalled, best_at_check=state["best"].clone(), rises=torch.zeros_like(score),
                         eta=torch.where(stalled, state["eta"] / 2, state["eta"]))
            z = torch.where(col(stalled), state["best_z"], z)
            grad = torch.where(col(stalled), state["best_grad"], grad)
        eta = col(state["eta"])
        z1 = ctx.project_(z + ctx.direction(grad).mul_(eta))
        if "prev" in state:
            a = self.momentum
            z1 = ctx.project_(z1.sub_(z).mul_(a).add_(z - state["prev"], alpha=1 - a).add_(z))
        state["prev"] = z
        return z1


@dataclass(frozen=True, eq=False)
class RelativeToStart(StepRule):
    """``rule`` with step sizes that are fractions of each sample's distance from its start to ``x``: the step
    size ``a`` becomes ``a * ||x - z_0||_2`` per sample (``z_0`` the first iterate).

    For problems that start far from ``x`` and must travel, like representation inversion from another image
    (robustify): the same fraction then suits data whose images lie 5 or 12 pixel-space units apart. A sample
    that starts at ``x`` takes no step at all.

    Examples:
        >>> RelativeToStart(Cosine())
        RelativeToStart(rule=Cosine(rule=Constant(), final=0.0))
    """

    rule: StepRule = field(default_factory=lambda: Cosine())

    def __post_init__(self) -> None:
        _check_rule(self.rule)

    def step(self, z: Tensor, grad: Tensor, score: Tensor, state: State, ctx: StepContext) -> Tensor:
        if "start_distance" not in state:
            state["start_distance"] = torch.linalg.vector_norm((ctx.x - z).flatten(1), dim=1)
        return self.rule.step(z, grad, score, state, ctx.scaled(column(state["start_distance"], z.ndim)))


@dataclass(frozen=True, eq=False)
class Schedule(StepRule):
    """Base class of step-size schedules: ``rule`` with its step size multiplied by ``factor`` at each step.
    A schedule of your own is a subclass with that one method."""

    rule: StepRule = field(default_factory=Constant)
    final: float = 0.0

    def __post_init__(self) -> None:
        _check_rule(self.rule)
        _check_fraction("final", self.final, closed=True)

    @abstractmethod
    def factor(self, t: int, steps: int) -> float:
        """The multiple of the step size at step ``t`` of ``steps`` (1 at the first step, ``final`` at the end)."""

    def step(self, z: Tensor, grad: Tensor, score: Tensor, state: State, ctx: StepContext) -> Tensor:
        return self.rule.step(z, grad, score, state, ctx.scaled(self.factor(ctx.t, ctx.steps)))


@dataclass(frozen=True, eq=False)
class Cosine(Schedule):
    """``rule`` with its step size decayed along half a cosine, from 1x at the first step to ``final``x at
    the end: ``final + (1 - final) (1 + cos(pi t / steps)) / 2``.

    Examples:
        >>> Cosine(Adam(), final=0.1)
        Cosine(rule=Adam(beta1=0.9, beta2=0.999, eps=1e-08), final=0.1)
    """

    def factor(self, t: int, steps: int) -> float:
        return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * t / steps))


@dataclass(frozen=True, eq=False)
class Linear(Schedule):
    """``rule`` with its step size decayed linearly from 1x at the first step to ``final``x at the end."""

    def factor(self, t: int, steps: int) -> float:
        return 1 - (1 - self.final) * t / steps


def _check_fraction(name: str, value: object, closed: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (0 <= value <= 1 if closed else 0 <= value < 1):
        raise ValueError(f"{name} must be in [0, 1{']' if closed else ')'}, got {value}")


def _check_rule(rule: object) -> None:
    if not isinstance(rule, StepRule):
        raise TypeError(f"rule must be an advfeat StepRule (e.g. af.steps.Constant()), got {rule!r}")
