"""The base of every attack: ``Attack`` (validation, the model's guard, the one method ``run`` to write), the
success criteria, ``Outcome`` and the one keep-the-worst rule that restarts, worst cases and APGD-T share."""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from typing_extensions import final

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

from .. import cost
from .._checks import check_batch, check_labels
from .._config import Config, config_repr
from ..adapters import Classifier, classifier
from ..guard import check_input, frozen_model
from ..threat import L2Ball, LinfBall, ThreatModel, ball, column
from .losses import LossFn, cross_entropy

__all__ = ["Attack", "BallAttack", "Outcome", "Criterion", "Misclassified", "ReachedTarget", "keep"]


@dataclass(frozen=True, eq=False)
class Criterion(Config, ABC):
    """When an attack has succeeded on a sample, from the model's logits and the attack's labels. ``descends``: the
    attack lowers its loss (towards targets) instead of raising it (away from the true labels)."""

    descends: ClassVar[bool] = False

    @abstractmethod
    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per sample: succeeded (bool, shape (N,))."""


@dataclass(frozen=True, eq=False)
class Misclassified(Criterion):
    """Untargeted success: the model no longer predicts the true label."""

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        return logits.argmax(1) != labels


@dataclass(frozen=True, eq=False)
class ReachedTarget(Criterion):
    """Targeted success: the model predicts the target (the labels an attack with ``targeted=True`` is given)."""

    descends: ClassVar[bool] = True

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        return logits.argmax(1) == labels


class Outcome(NamedTuple):
    """How well an attack did on each sample: ``success`` (its criterion met) and ``score`` (the attack's loss,
    negated when it descends, so that higher is always better for the attacker)."""

    success: Tensor
    score: Tensor

    def better_than(self, other: Outcome) -> Tensor:
        """Per sample: success first, then the higher score."""
        return (self.success & ~other.success) | ((self.success == other.success) & (self.score > other.score))


def keep(take: Tensor, new: tuple[Tensor, Outcome], old: tuple[Tensor, Outcome]) -> tuple[Tensor, Outcome]:
    """The worst case so far, per sample: ``new`` where ``take`` is True, else ``old`` (a candidate batch and its
    ``Outcome`` each). Restarts, ``WorstOf`` and APGD-T's targets all keep their worst case through this."""
    x_new, o_new = new
    x_old, o_old = old
    return (torch.where(column(take, x_new.ndim), x_new, x_old),
            Outcome(torch.where(take, o_new.success, o_old.success), torch.where(take, o_new.score, o_old.score)))


class _Checked(Classifier):
    """The model as ``Attack.__call__`` hands it to ``run`` when it validates: the first forward's logits are
    checked against the batch's labels (shape (n, C), every label below C); every forward's logits are folded into
    ``finite`` (a device flag, no host sync), which ``__call__`` reads once at the end."""

    def __init__(self, model: nn.Module, labels: Tensor) -> None:
        super().__init__(model)
        self.labels: Tensor | None = labels
        self.finite = torch.ones((), dtype=torch.bool, device=labels.device)

    def forward(self, x: Tensor) -> Tensor:
        logits = super().forward(x)
        if self.labels is not None:
            if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(f"model must return logits of shape (N, C) = ({x.shape[0]}, C), got "
                                 f"{tuple(logits.shape)}")
            check_labels(self.labels, logits.shape[1])
            self.labels = None
        self.finite = self.finite & torch.isfinite(logits.detach()).all()
        return logits


class Attack(Config, ABC):
    """Base class of all attacks. Subclass it as a frozen dataclass and implement ``run``.

    ``run(model, x, y, generator)`` receives a validated batch and a model already in eval mode with
    frozen parameters, and returns the perturbed batch. Use ``generator`` for any randomness. A subclass may
    declare the fields ``targeted``, ``eval_mode``, ``seed`` and ``loss`` (the base's defaults: untargeted, eval
    mode, no seed, cross-entropy for judging outcomes).

    Examples:
        >>> import torch, advfeat as af
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Noise(af.Attack):
        ...     sigma: float = 0.1
        ...     def run(self, model, x, y, generator):
        ...         noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        ...         return (x + self.sigma * noise).clamp(0, 1)
        >>> Noise(0.2)(torch.nn.Flatten(), torch.rand(2, 4), torch.tensor([0, 1]), generator=torch.Generator()).shape
        torch.Size([2, 4])
    """

    @property
    def targeted(self) -> bool:
        """Whether ``y`` holds targets to reach (True) or true labels to move away from (False, the default)."""
        return False

    @property
    def eval_mode(self) -> bool:
        """Whether the model runs in eval mode during the attack (default True)."""
        return True

    @property
    def seed(self) -> int | None:
        """The seed of the attack's own generator when the caller gives none (default None: the global one)."""
        return None

    @property
    def loss(self) -> LossFn | None:
        """The loss that judges the attack's outcomes (``outcome``); None: cross-entropy."""
        return None

    @property
    def criterion(self) -> Criterion | None:
        """The attack's own success criterion (an attack may take one as ``criterion=``); None: the default for
        its targeting (``success_criterion``)."""
        return None

    @final
    def success_criterion(self) -> Criterion:
        """When the attack has succeeded on a sample: its ``criterion`` if it has one, else ``ReachedTarget`` when
        targeted and ``Misclassified`` when not. Early stopping, the best iterate, restarts, worst cases, APGD-T's
        and FAB-T's targets, Square's search and AutoAttack's cascade all read success through it."""
        own = self.criterion
        if own is not None:
            return own
        return ReachedTarget() if self.targeted else Misclassified()

    def select(self, index: Tensor) -> Attack:
        """This attack for the samples ``index`` (a 1-D long tensor) of the batch it was configured for: a
        per-sample parameter (an eps tensor of shape (N,)) follows them. Default: unchanged."""
        return self

    def with_draws(self, draws: int) -> Attack:
        """This attack with its gradients averaged over ``draws`` forward passes (``advfeat.EOT``). The gradient
        family and attacks made of it (``Restarts``, ``WorstOf``) override it; an attack without gradients has
        nothing to average."""
        raise TypeError(f"attack: EOT averages gradients, so it takes the gradient family (PGD, APGD) or Restarts / "
                        f"WorstOf of them; got {type(self).__name__}")

    @final
    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None,
        validate: bool | str = True,
    ) -> Tensor:
        """Attack ``model`` at ``(x, y)``; returns a new tensor like ``x``.

        Args:
            model: any ``nn.Module`` mapping a batch to logits (N, C), as a tensor, a mapping with ``"logits"``
                or an object with a ``.logits`` tensor (``advfeat.adapters``); its state is left exactly as found.
            x: inputs (N, ...), floating, inside the box (default [0, 1]). Not modified.
            y: labels (N,), or target classes when the attack is targeted.
            generator: the random source; default: a new one seeded with ``self.seed`` if set, else
                PyTorch's global generator (so ``torch.manual_seed`` makes runs repeatable).
            validate: check ``x`` and ``y`` (box, finiteness, labels against the model's classes) before, and that
                the result and every logit the attack saw are finite after: a few host syncs per call. ``"result"``
                checks only the latter (for callers that checked the batch already: ``evaluate``). ``False`` is for
                callers that checked the batch already and check what they compute from the result (the trainer
                checks its loss), e.g. inside a training step, where no host sync is wanted.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        name = type(model.model if isinstance(model, Classifier) else model).__name__
        model = classifier(model)  # a tensor, a mapping or a Hugging Face output: logits from here on
        lower, upper = self.box
        if validate not in (True, False, "result"):
            raise ValueError(f"validate must be True, False or 'result', got {validate!r}")
        if validate is True:
            x, y = check_batch(x, y, lower, upper)
            check_input(model, x)
        if x.shape[0] == 0:
            return x.clone()
        if generator is None and self.seed is not None:
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
        runs_on: nn.Module = cost.Counted(model) if cost.active() else model  # passes counted inside counting()
        checked = _Checked(runs_on, y) if validate else None
        with frozen_model(model, eval_mode=self.eval_mode):
            x_adv = self.run(checked if checked is not None else runs_on, x, y, generator)
        if not isinstance(x_adv, Tensor) or x_adv.shape != x.shape:
            got = tuple(x_adv.shape) if isinstance(x_adv, Tensor) else type(x_adv).__name__
            raise ValueError(f"{type(self).__name__}.run must return a tensor of shape {tuple(x.shape)}, got {got}")
        x_adv = towards(x_adv.detach().to(device=x.device), x)
        # one host sync at the end, none per step: the result and every logit the attack saw
        if checked is not None and not bool(torch.isfinite(x_adv).all() & checked.finite):
            raise FloatingPointError(
                f"{type(self).__name__} on {name}: the model's logits, loss or gradient became non-finite (NaN or "
                "inf) during the attack, so the perturbed batch cannot be trusted; check the model on this batch "
                "(af.evaluate reports non-finite logits; torch.autograd.detect_anomaly finds the layer)")
        return x_adv.clone() if x_adv.data_ptr() == x.data_ptr() else x_adv

    @abstractmethod
    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        """Return the perturbed batch. Called by ``__call__`` with a validated batch and a guarded model."""

    @property
    def box(self) -> tuple[float | Tensor, float | Tensor]:
        """The valid input range ``(lower, upper)``; inputs outside it are refused. Default ``(0, 1)``."""
        return (0.0, 1.0)

    def outcome(self, model: nn.Module, x_adv: Tensor, y: Tensor) -> Outcome:
        """Per-sample success (the ``criterion``) and score (``loss``, negated when the criterion descends) of
        ``x_adv``, used to pick the worst case among candidates."""
        with torch.no_grad():
            logits = model(x_adv)
        loss = (self.loss or cross_entropy)(logits, y).float()
        criterion = self.success_criterion()
        return Outcome(criterion(logits, y), -loss if criterion.descends else loss)

    def for_evaluation(self, early_stop: bool) -> Attack:
        """This attack as ``advfeat.evaluate`` runs it: a sample counts as broken when any iterate
        is misclassified (early stopping, or every step with ``keep_best``). Default: unchanged."""
        return self


_FLAGS = ("targeted", "random_start", "keep_best", "early_stop", "eval_mode", "batched")


def check_fields(attack: DataclassInstance) -> None:
    """The fields every attack configuration may share, checked when it is made: ``seed`` None or a whole number
    in [0, 2**63) (what ``torch.Generator.manual_seed`` takes), and each yes / no flag a bool."""
    for f in dataclasses.fields(attack):
        value = getattr(attack, f.name)
        if f.name == "seed" and value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63):
            raise (ValueError if isinstance(value, int) and not isinstance(value, bool) else TypeError)(
                f"seed must be None or a whole number in [0, 2**63), got {value!r}")
        if f.name in _FLAGS and not isinstance(value, bool):
            raise TypeError(f"{f.name} must be True or False, got {value!r}")


class BallAttack(Attack):
    """The base of attacks confined to a threat model: where the attack may move, given whole as ``threat=``
    (``af.L2Ball(0.5)``, ``af.LinfBall(eps_tensor, lower=..., upper=...)``) or by the shorthand ``eps`` (a float or
    a per-sample tensor of shape (N,)), ``norm`` (for attacks that offer a choice) and the box ``lower`` / ``upper``.
    The threat model is resolved, and every one of those arguments checked, once, here: ``threat_model()``,
    ``box``, ``select`` and the repr come with it.

    A plain ``L2Ball`` or ``LinfBall`` given as ``threat=`` is stored as the shorthand, so both spellings make
    equal, identically printed attacks; another threat model (a subclass, a ``Box``) is kept as given, for the
    attacks that search any threat model (``threats``).

    A subclass is a frozen dataclass that declares the fields ``eps``, ``lower``, ``upper``, ``threat`` (and
    ``norm`` if it offers a choice) and calls ``BallAttack.__post_init__``.
    """

    eps: float | Tensor | None
    lower: float | Tensor
    upper: float | Tensor
    threat: ThreatModel | None
    norm: str | None  # declared by the subclasses that offer a choice of norm
    _region: ThreatModel
    threats: ClassVar[tuple[type[ThreatModel], ...]] = (L2Ball, LinfBall)
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[object]]]  # a subclass is a dataclass
    """The threat models the attack can search."""
    positive_eps: ClassVar[bool] = True
    """Whether the ball's radius must be positive and finite (a minimum-norm or search attack)."""

    def __post_init__(self) -> None:
        check_fields(self)
        t = self.threat
        name = type(self).__name__
        if t is not None:
            if not isinstance(t, ThreatModel):
                raise TypeError(f"threat must be an advfeat ThreatModel (L2Ball, LinfBall, Box), got {t!r}")
            if self.eps is not None or not (_at(self.lower, 0.0) and _at(self.upper, 1.0)):
                raise ValueError(f"{name}: give threat= or the shorthand eps / lower / upper, not both (the threat "
                                 "model carries its radius and its box)")
            if not isinstance(t, self.threats):
                raise TypeError(f"threat: {name} searches {' or '.join(c.__name__ for c in self.threats)}, got {t!r}")
            norm = _NORM_OF.get(type(t))
            if norm is not None and "norm" in _fields(self) and self.norm not in (norm, _default(self, "norm")):
                raise ValueError(f"{name}: norm={self.norm!r} disagrees with threat={t!r}; give one of them")
            if norm is not None:  # a plain ball: stored as the shorthand
                for key, value in (("eps", t.eps), ("lower", t.lower), ("upper", t.upper), ("threat", None)):
                    object.__setattr__(self, key, value)
                if "norm" in _fields(self):
                    object.__setattr__(self, "norm", norm)
            region = t
        else:
            if self.eps is None:
                raise TypeError(f"{name} needs eps (the ball's radius) or threat= (a threat model)")
            region = ball(self._norm(), self.eps, lower=self.lower, upper=self.upper)  # checks eps and the box
            if not isinstance(region, self.threats):
                raise TypeError(f"norm: {name} searches {' or '.join(c.__name__ for c in self.threats)}, got "
                                f"{self._norm()!r}")
        if self.positive_eps:
            _check_radius(region.eps)
        object.__setattr__(self, "_region", region)

    def _norm(self) -> str:
        """The norm the shorthand names: the ``norm`` field, or the class's own (``L2PGD``, ``LinfPGD``)."""
        return str(self.norm)

    def threat_model(self) -> ThreatModel:
        """The set this attack searches."""
        region: ThreatModel = self._region
        return region

    @property
    def box(self) -> tuple[float | Tensor, float | Tensor]:
        t = self.threat_model()
        return (t.lower, t.upper)

    def select(self, index: Tensor) -> Attack:
        t = self.threat_model()
        if not isinstance(t.eps, Tensor):
            return self
        picked = t.select(index)
        if self.threat is not None:
            return dataclasses.replace(self, threat=picked)
        return dataclasses.replace(self, eps=picked.eps)

    def __repr__(self) -> str:
        return config_repr(self)


_NORM_OF: dict[type[ThreatModel], str] = {L2Ball: "l2", LinfBall: "linf"}


def _fields(obj: DataclassInstance) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)}


def _default(obj: DataclassInstance, name: str) -> object:
    return next(f.default for f in dataclasses.fields(obj) if f.name == name)


def _at(value: float | Tensor, default: float) -> bool:
    return not isinstance(value, Tensor) and value == default


def _check_radius(eps: float | Tensor | None) -> None:
    """A positive, finite radius: a float, or a tensor whose every element is."""
    if eps is None:
        return
    ok = (eps > 0 and math.isfinite(eps)) if isinstance(eps, float) else bool(
        (torch.isfinite(eps) & (eps > 0)).all())
    if not ok:
        raise ValueError(f"eps must be a finite number > 0 (every element of a tensor), got {eps}")


def towards(z: Tensor, x: Tensor) -> Tensor:
    """``z`` in ``x``'s dtype, each element rounded towards ``x`` instead of to the nearest value: never farther
    from ``x`` than ``z`` in any coordinate, so a point of the ball and the box (computed in a wider working dtype)
    stays in both once it is cast to float16 or bfloat16. Unchanged when the dtypes agree."""
    r = z.to(x.dtype)
    if r.dtype == z.dtype:
        return r
    xz = x.to(z.dtype)
    away = (r.to(z.dtype) - xz).abs() > (z - xz).abs()
    return torch.where(away, torch.nextafter(r, x), r)


def worst_of(model: nn.Module, y: Tensor, candidates: Iterator[Tensor], judge: Attack) -> Tensor:
    """Per sample, the candidate ``judge`` rates worst (success first, then the score), the first on a tie."""
    best: tuple[Tensor, Outcome] | None = None
    for cand in candidates:
        new = (cand, judge.outcome(model, cand, y))
        best = new if best is None else keep(new[1].better_than(best[1]), new, best)
    assert best is not None
    return best[0]


def tile(t: Tensor, k: int) -> Tensor:
    """``k`` copies of a batch, one after another along the batch dimension."""
    return t.repeat(k, *([1] * (t.ndim - 1)))


def calls(runs: int, n: int, max_batch: int | None) -> Iterator[tuple[int, int]]:
    """``(first, count)`` of the runs each engine call takes when ``runs`` runs of ``n`` samples go as one batch
    of at most ``max_batch`` samples (at least one run per call)."""
    per_call = runs if max_batch is None else max(1, max_batch // max(1, n))
    for i in range(0, runs, per_call):
        yield i, min(per_call, runs - i)
