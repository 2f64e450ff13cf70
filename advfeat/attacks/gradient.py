"""The gradient family on the one engine: ``GradientAttack`` (the fields every engine-backed attack shares), the
general ``PGD`` over any threat model, and its thin ball configurations ``L2PGD``, ``LinfPGD`` and ``FGSM``."""

from __future__ import annotations

import dataclasses
import math
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._checks import check_positive_float, check_positive_int
from .._config import config_repr
from ..engine import optimize
from ..steps import Constant, StepRule
from ..threat import L2Ball, LinfBall, ThreatModel
from .base import Attack, BallAttack, Criterion, check_fields
from .losses import LossFn, cross_entropy

__all__ = ["GradientAttack", "PGD", "L2PGD", "LinfPGD", "FGSM", "BallPGD", "Classification", "Expected", "expected"]


class Classification:
    """The attack objective: ``loss(model(x), y)`` per sample, and success by the attack's ``criterion``."""

    def __init__(self, model: nn.Module, y: Tensor, loss: LossFn, criterion: Criterion) -> None:
        self.model, self.y, self.loss, self.criterion = model, y, loss, criterion
        self.checked = False

    def __call__(self, x: Tensor, index: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = self.model(x)
        y = self.y if index is None else self.y.index_select(0, index)
        loss = self.loss(logits, y)
        if not self.checked:
            if not isinstance(loss, Tensor) or loss.shape != y.shape:
                got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(f"loss must return one value per sample, shape ({y.shape[0]},); got {got}")
            self.checked = True
        return loss, self.criterion(logits, y)


class Expected:
    """An objective averaged over ``draws`` calls (EOT, Athalye et al. 2018): for a randomised model each call draws
    its randomness anew, so the loss (and its gradient) is the mean over draws; a sample succeeds where most draws
    succeed (an objective without a notion of success, TRADES' KL, returns None). ``draws`` forward passes and one
    backward pass through all of them per step."""

    def __init__(self, objective: Callable[[Tensor, Tensor | None], tuple[Tensor, Any]], draws: int) -> None:
        self.objective, self.draws = objective, draws

    def __call__(self, x: Tensor, index: Tensor | None) -> tuple[Tensor, Tensor | None]:
        total, first = self.objective(x, index)
        votes = None if first is None else first.to(torch.int32)
        for _ in range(self.draws - 1):
            loss, success = self.objective(x, index)
            total = total + loss
            if votes is not None and success is not None:
                votes = votes + success
        return total / self.draws, None if votes is None else votes * 2 > self.draws


def expected(objective: Callable[[Tensor, Tensor | None], tuple[Tensor, Any]],
             draws: int) -> Callable[[Tensor, Tensor | None], tuple[Tensor, Any]]:
    """``objective`` itself for one draw, else averaged over ``draws`` (``Expected``)."""
    return objective if draws == 1 else Expected(objective, draws)


@dataclass(frozen=True, eq=False, kw_only=True, repr=False)
class GradientAttack(Attack):
    """Base class of the attacks that run the engine's projected-gradient loop on a classification loss: the fields
    they share, everything but the threat model (``threat_model()``, the one method a subclass writes).

    ``steps`` gradient steps of the step ``rule`` (default constant) of length ``step_size`` (absolute) or
    ``rel_step_size * eps`` (default ``2.5 / steps``, Madry et al.'s rule), from ``x`` or a ``random_start`` in the
    threat model; untargeted attacks raise ``loss`` (default cross-entropy), targeted ones lower it towards ``y``;
    ``keep_best`` returns each sample's best iterate (one more forward), ``early_stop`` stops a sample once it
    succeeds, both by ``criterion`` (default: misclassified, or the target reached when targeted); ``draws`` > 1
    averages the loss and its gradient over that many forward passes (EOT, for randomised models; ``advfeat.EOT``
    sets it on an attack and on those inside ``Restarts`` and ``WorstOf``).
    """

    steps: int = 10
    step_size: float | None = None
    rel_step_size: float | None = None
    random_start: bool = False
    targeted: bool = False
    loss: LossFn | None = None
    keep_best: bool = False
    early_stop: bool = False
    eval_mode: bool = True
    seed: int | None = None
    rule: StepRule = field(default_factory=Constant)
    draws: int = 1
    criterion: Criterion | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive_int("steps", self.steps)
        if self.criterion is not None and not isinstance(self.criterion, Criterion):
            raise TypeError(f"criterion must be an advfeat Criterion (Misclassified, ReachedTarget, or your own), "
                            f"got {self.criterion!r}")
        check_positive_int("draws", self.draws)
        if not isinstance(self.rule, StepRule):
            raise TypeError(f"rule must be an advfeat StepRule (see advfeat.steps), got {self.rule!r}")
        if self.step_size is not None and self.rel_step_size is not None:
            raise ValueError("give step_size (absolute) or rel_step_size (a multiple of eps), not both")
        if self.step_size is not None:
            check_positive_float("step_size", self.step_size)
        if self.rel_step_size is not None:
            check_positive_float("rel_step_size", self.rel_step_size)
        if self.loss is not None and not callable(self.loss):
            raise TypeError(f"loss must be a callable (logits, y) -> per-sample loss, got {self.loss!r}")
        eps = self.threat_model().eps
        if eps is not None and not (math.isfinite(eps) if isinstance(eps, float)
                                    else bool(torch.isfinite(torch.as_tensor(eps)).all())):
            raise ValueError(f"eps must be finite for an attack, got {eps}: its steps and random start are relative "
                             "to eps; for an attack bounded by the box alone use af.PGD(af.Box(), step_size=...)")
        if self.step_size is None and eps is None:
            raise ValueError(f"step_size is required for {self.threat_model()!r}, which has no eps to be relative to")

    @abstractmethod
    def threat_model(self) -> ThreatModel:
        """The set this attack searches."""

    @property
    def box(self) -> tuple[float | Tensor, float | Tensor]:
        t = self.threat_model()
        return (t.lower, t.upper)

    @property
    def batched_restarts(self) -> bool:
        """Whether ``Restarts(batched=True)`` may run this attack's restarts as one batch: random starts drawn by
        the threat model for a scalar eps, and ``run`` being ``run_from`` from such a start."""
        return self.random_start and not isinstance(self.threat_model().eps, Tensor)

    def step_length(self, threat: ThreatModel) -> float | Tensor:
        """The absolute step: ``step_size``, or ``rel_step_size * eps`` (default ``2.5 / steps * eps``,
        Madry et al.'s rule, which lets the iterate cross the ball)."""
        if self.step_size is not None:
            return self.step_size
        rel = self.rel_step_size if self.rel_step_size is not None else 2.5 / self.steps
        eps = threat.eps
        assert eps is not None  # __post_init__ requires a step_size without one
        return eps * rel

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.run_from(model, x, y, generator, None)

    def run_from(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None,
                 start: Tensor | None) -> Tensor:
        """``run``, from ``start`` (projected first) instead of the attack's own start when one is given."""
        threat = self.threat_model()
        criterion = self.success_criterion()
        objective = expected(Classification(model, y, self.loss or cross_entropy, criterion), self.draws)
        return optimize(
            objective, x, threat, steps=self.steps, step_size=self.step_length(threat),
            maximize=not criterion.descends, random_start=self.random_start and start is None, start=start,
            keep_best=self.keep_best, early_stop=self.early_stop, generator=generator, rule=self.rule,
        ).x

    def with_draws(self, draws: int) -> Attack:
        return dataclasses.replace(self, draws=draws)

    def for_evaluation(self, early_stop: bool) -> Attack:
        if self.targeted:
            return self
        if early_stop:
            return dataclasses.replace(self, early_stop=True)
        return dataclasses.replace(self, keep_best=True, early_stop=False)

    def __repr__(self) -> str:
        return config_repr(self)


@dataclass(frozen=True, eq=False, repr=False)
class PGD(GradientAttack):
    """Projected gradient descent over any threat model: ``PGD(af.L2Ball(0.5), steps=20)``.

    Each step moves along ``threat.direction`` of the loss gradient by the step length and projects back
    onto ball ∩ box. Untargeted attacks ascend ``loss(model(x), y)``; targeted ones descend it towards ``y``.
    ``keep_best`` returns each sample's best iterate (success first, then loss) at the cost of one forward.
    """

    threat: ThreatModel

    def __post_init__(self) -> None:
        if not isinstance(self.threat, ThreatModel):
            raise TypeError(f"threat must be an advfeat ThreatModel (L2Ball, LinfBall, Box), got {self.threat!r}")
        super().__post_init__()

    def threat_model(self) -> ThreatModel:
        return self.threat

    def select(self, index: Tensor) -> Attack:
        picked = self.threat.select(index)
        return self if picked is self.threat else dataclasses.replace(self, threat=picked)


@dataclass(frozen=True, eq=False, repr=False)
class BallPGD(BallAttack, GradientAttack):
    """A gradient attack in a ball: ``threat=`` (an ``L2Ball`` or ``LinfBall``, or any threat model the class
    searches) or the shorthand ``eps`` (a float or a (N,) tensor) with the box ``lower`` / ``upper``
    (``advfeat.attacks.base.BallAttack``)."""

    eps: float | Tensor | None = None
    lower: float | Tensor = field(default=0.0, kw_only=True)
    upper: float | Tensor = field(default=1.0, kw_only=True)
    threat: ThreatModel | None = field(default=None, kw_only=True)
    positive_eps: ClassVar[bool] = False

    def __post_init__(self) -> None:
        BallAttack.__post_init__(self)
        GradientAttack.__post_init__(self)

    def _norm(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True, eq=False, repr=False)
class L2PGD(BallPGD):
    """PGD in the L2 ball of radius ``eps``: steps ``g / ||g||_2``. ``eps``: a float or a (N,) tensor; or
    ``threat=af.L2Ball(...)``. The same attack as ``PGD(af.L2Ball(eps))``."""

    threats: ClassVar[tuple[type[ThreatModel], ...]] = (L2Ball,)

    def _norm(self) -> str:
        return "l2"


@dataclass(frozen=True, eq=False, repr=False)
class LinfPGD(BallPGD):
    """PGD in the Linf ball of radius ``eps``: steps ``sign(g)``. ``eps``: a float or a (N,) tensor; or
    ``threat=af.LinfBall(...)``. The same attack as ``PGD(af.LinfBall(eps))``."""

    threats: ClassVar[tuple[type[ThreatModel], ...]] = (LinfBall,)

    def _norm(self) -> str:
        return "linf"


@dataclass(frozen=True, eq=False, repr=False)
class FGSM(BallPGD):
    """The fast gradient sign method: one step of length ``rel_step_size * eps`` (default 1.0).

    ``norm="linf"`` (default) steps along ``sign(g)``; ``norm="l2"`` gives the fast gradient method; or
    ``threat=af.LinfBall(eps)`` / ``af.L2Ball(eps)``. With ``random_start=True`` and ``rel_step_size=1.25`` this is
    Wong et al.'s FGSM-RS.
    """

    steps: int = field(default=1, kw_only=True)
    rel_step_size: float | None = field(default=1.0, kw_only=True)
    norm: str = field(default="linf", kw_only=True)

    def __post_init__(self) -> None:
        if self.steps != 1:
            raise ValueError(f"steps must be 1 for FGSM (use LinfPGD or L2PGD for more), got {self.steps}")
        super().__post_init__()

    def _norm(self) -> str:
        return self.norm
