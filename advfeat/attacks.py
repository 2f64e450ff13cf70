"""Attacks: small, immutable configurations of the one engine, called with the model.

``x_adv = attack(model, x, y)``. An attack is a frozen dataclass: printable, comparable, reusable across
models and devices. ``y`` holds the true labels, or the targets when ``targeted=True``.

Every attack call, built in or user-written, goes through ``Attack.__call__``, which

1. validates ``x`` (a finite floating tensor inside the attack's box) and ``y`` (integer labels, shape (N,)),
2. guards the model (``frozen_model``): runs it in eval mode and with ``requires_grad=False`` on every
   parameter, and afterwards restores every module's ``training`` flag, every parameter's
   ``requires_grad`` and every buffer exactly (``.grad`` is never touched: gradients are taken with
   respect to the input only),
3. calls ``Attack.run``, the one method a subclass writes, and returns a new tensor of ``x``'s
   dtype and device.

Examples:
    >>> import torch, advfeat as af
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    >>> x, y = torch.rand(5, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    >>> attack = af.L2PGD(0.5, steps=20)
    >>> attack
    L2PGD(eps=0.5, steps=20)
    >>> x_adv = attack(model, x, y)
    >>> bool(((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-6).all())
    True
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import final

from ._checks import check_batch, check_logits, check_positive_float, check_positive_int
from ._config import Config
from .adapters import classifier
from .engine import optimize, working_dtype
from .steps import APGDStep, Constant, StepRule
from .threat import ThreatModel, ball, column

__all__ = [
    "Attack", "PGD", "L2PGD", "LinfPGD", "FGSM", "APGD", "Restarts", "WorstOf", "Outcome",
    "cross_entropy", "cw_margin", "dlr", "dlr_targeted", "frozen_model", "LossFn",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``(logits (N, C), labels (N,)) -> per-sample loss (N,)``; the attack raises it (or lowers it, targeted)."""


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy, computed in float32 (also under autocast)."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def cw_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Carlini-Wagner margin ``max_{j != y} z_j - z_y`` per sample: positive once the label is lost.

    Targeted attacks minimise it with ``y`` = targets, which drives ``z_t`` above every other logit.
    """
    z = logits.float()
    zy = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], float("-inf")).amax(1)
    return others - zy


def dlr(logits: Tensor, y: Tensor) -> Tensor:
    """The difference-of-logits-ratio loss of Croce & Hein (2020), per sample:
    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, with ``z_pi1 >= z_pi2 >= ...`` the sorted logits.

    Unlike cross-entropy it does not change when the logits are shifted or scaled, so a model cannot hide
    behind large or saturated logits. Positive once the label is lost. Needs at least 3 classes.

    Examples:
        >>> import torch
        >>> dlr(torch.tensor([[4.0, 2.0, 0.0]]), torch.tensor([0]))
        tensor([-0.5000])
    """
    z = logits.float()
    if z.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got logits of shape {tuple(z.shape)}")
    top = z.topk(3, dim=1).values
    zy = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], float("-inf")).amax(1)
    return (others - zy) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """The targeted DLR loss of APGD-T: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` per sample; the
    attack raises it to push the target ``t`` above the true label ``y``. Needs at least 4 classes."""
    z = logits.float()
    if z.shape[1] < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, got logits of shape {tuple(z.shape)}")
    top = z.topk(4, dim=1).values
    zy, zt = z.gather(1, y[:, None]).squeeze(1), z.gather(1, target[:, None]).squeeze(1)
    return (zt - zy) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


@contextmanager
def frozen_model(model: nn.Module, *, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Run ``model`` with frozen parameters (and in eval mode), then put every bit of its state back.

    Restored on exit, also after an exception: every module's ``training`` flag, every parameter's
    ``requires_grad``, every buffer's values (BatchNorm running statistics, even when ``eval_mode=False``
    lets them change). Parameters' ``.grad`` are left alone: nothing inside computes parameter gradients.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        if eval_mode:
            model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)
        with torch.no_grad():
            for b, saved in buffers:  # through .data: the values return without bumping the version counter that
                b.data.copy_(saved)   # autograd checks for a backward still to come (BatchNorm's, in TRADES)


_validating: contextvars.ContextVar[bool] = contextvars.ContextVar("advfeat_validating", default=True)
"""Whether the attack being run checks its labels against the model's classes (``Attack.__call__``'s
``validate``): a host sync, skipped inside a training step, whose trainer checks labels on the CPU copy."""


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "model", model) if type(model).__name__ == "Classifier" else model


class Outcome(NamedTuple):
    """How well an attack did on each sample: ``success`` (label lost, or target reached) and ``score``
    (the attack's loss, negated when targeted, so that higher is always better for the attacker)."""

    success: Tensor
    score: Tensor

    def better_than(self, other: Outcome) -> Tensor:
        """Per sample: success first, then the higher score."""
        return (self.success & ~other.success) | ((self.success == other.success) & (self.score > other.score))


class Attack(Config, ABC):
    """Base class of all attacks. Subclass it as a frozen dataclass and implement ``run``.

    ``run(model, x, y, generator)`` receives a validated batch and a model already in eval mode with
    frozen parameters, and returns the perturbed batch. Use ``generator`` for any randomness.

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

    targeted: bool = False
    eval_mode: bool = True
    seed: int | None = None

    @final
    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None,
        validate: bool = True,
    ) -> Tensor:
        """Attack ``model`` at ``(x, y)``; returns a new tensor like ``x``.

        Args:
            model: any ``nn.Module`` mapping a batch to logits (N, C), as a tensor, a mapping with ``"logits"``
                or an object with a ``.logits`` tensor (``advfeat.adapters``); its state is left exactly as found.
            x: inputs (N, ...), floating, inside the box (default [0, 1]). Not modified.
            y: labels (N,), or target classes when the attack is targeted.
            generator: the random source; default: a new one seeded with ``self.seed`` if set, else
                PyTorch's global generator (so ``torch.manual_seed`` makes runs repeatable).
            validate: check ``x`` and ``y`` (box, finiteness, labels) before, and that the result is finite
                after: two host syncs per call. ``False`` is for callers that checked the batch already and
                check what they compute from the result (the trainer checks its loss), e.g. inside a training
                step, where no host sync is wanted.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        model = classifier(model)  # a tensor, a mapping or a Hugging Face output: logits from here on
        lower, upper = self.box
        if validate:
            x, y = check_batch(x, y, lower, upper)
        if x.shape[0] == 0:
            return x.clone()
        if generator is None and self.seed is not None:
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
        token = _validating.set(validate)
        try:
            with frozen_model(model, eval_mode=self.eval_mode):
                x_adv = self.run(model, x, y, generator)
        finally:
            _validating.reset(token)
        if not isinstance(x_adv, Tensor) or x_adv.shape != x.shape:
            got = tuple(x_adv.shape) if isinstance(x_adv, Tensor) else type(x_adv).__name__
            raise ValueError(f"{type(self).__name__}.run must return a tensor of shape {tuple(x.shape)}, got {got}")
        x_adv = x_adv.detach().to(device=x.device, dtype=x.dtype)
        if validate and not bool(torch.isfinite(x_adv).all()):  # one host sync at the end, none per step
            raise FloatingPointError(
                f"{type(self).__name__} on {type(_inner(model)).__name__}: the model's loss or gradient became "
                "non-finite (NaN or inf) during the attack, so the perturbed batch would hold NaN; check the model on "
                "this batch (af.evaluate reports non-finite logits; torch.autograd.detect_anomaly finds the layer)")
        return x_adv.clone() if x_adv.data_ptr() == x.data_ptr() else x_adv

    @abstractmethod
    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        """Return the perturbed batch. Called by ``__call__`` with a validated batch and a guarded model."""

    @property
    def box(self) -> tuple[float | Tensor, float | Tensor]:
        """The valid input range ``(lower, upper)``; inputs outside it are refused. Default ``(0, 1)``."""
        return (0.0, 1.0)

    def outcome(self, model: nn.Module, x_adv: Tensor, y: Tensor) -> Outcome:
        """Per-sample success and score of ``x_adv``, used to pick the worst case among candidates."""
        with torch.no_grad():
            logits = model(x_adv)
        loss_fn: LossFn = getattr(self, "loss", None) or cross_entropy
        loss = loss_fn(logits, y).float()
        pred = logits.argmax(1)
        if self.targeted:
            return Outcome(pred == y, -loss)
        return Outcome(pred != y, loss)

    def for_evaluation(self, early_stop: bool) -> Attack:
        """This attack as ``advfeat.evaluate`` runs it: a sample counts as broken when any iterate
        is misclassified (early stopping, or every step with ``keep_best``). Default: unchanged."""
        return self


class _Classification:
    """The attack objective: ``loss(model(x), y)`` per sample, and success (label lost / target hit)."""

    def __init__(self, model: nn.Module, y: Tensor, loss: LossFn, targeted: bool) -> None:
        self.model, self.y, self.loss, self.targeted = model, y, loss, targeted
        self.checked = False

    def __call__(self, x: Tensor, index: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = self.model(x)
        y = self.y if index is None else self.y.index_select(0, index)
        if not self.checked and _validating.get():
            check_logits(logits, y)
        loss = self.loss(logits, y)
        if not self.checked:
            if not isinstance(loss, Tensor) or loss.shape != y.shape:
                got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(f"loss must return one value per sample, shape ({y.shape[0]},); got {got}")
            self.checked = True
        pred = logits.argmax(1)
        return loss, (pred == y) if self.targeted else (pred != y)


@dataclass(frozen=True, eq=False, kw_only=True, repr=False)
class EnginePGD(Attack):
    """Fields shared by the PGD family: everything but the threat model."""

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

    def __post_init__(self) -> None:
        check_positive_int("steps", self.steps)
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
        threat = self.threat_model()
        eps = getattr(threat, "eps", 0.0)
        finite = math.isfinite(eps) if isinstance(eps, float) else bool(torch.isfinite(torch.as_tensor(eps)).all())
        if eps is not None and not finite:
            raise ValueError(f"eps must be finite for an attack, got {eps}: its steps and random start are relative "
                             "to eps; for an attack bounded by the box alone use af.PGD(af.Box(), step_size=...)")
        if self.step_size is None and getattr(threat, "eps", None) is None:
            raise ValueError(f"step_size is required for {threat!r}, which has no eps to be relative to")

    @abstractmethod
    def threat_model(self) -> ThreatModel:
        """The set this attack searches."""

    @property
    def box(self) -> tuple[float | Tensor, float | Tensor]:
        t = self.threat_model()
        return (t.lower, t.upper)

    def step_length(self, threat: ThreatModel) -> float | Tensor:
        """The absolute step: ``step_size``, or ``rel_step_size * eps`` (default ``2.5 / steps * eps``,
        Madry et al.'s rule, which lets the iterate cross the ball)."""
        if self.step_size is not None:
            return self.step_size
        rel = self.rel_step_size if self.rel_step_size is not None else 2.5 / self.steps
        eps: float | Tensor = threat.eps  # type: ignore[attr-defined]
        return eps * rel

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.run_from(model, x, y, generator, None)

    def run_from(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None,
                 start: Tensor | None) -> Tensor:
        """``run``, from ``start`` (projected first) instead of the attack's own start when one is given."""
        threat = self.threat_model()
        objective = _Classification(model, y, self.loss or cross_entropy, self.targeted)
        return optimize(
            objective, x, threat, steps=self.steps, step_size=self.step_length(threat),
            maximize=not self.targeted, random_start=self.random_start and start is None, start=start,
            keep_best=self.keep_best, early_stop=self.early_stop, generator=generator, rule=self.rule,
        ).x

    def for_evaluation(self, early_stop: bool) -> Attack:
        if self.targeted:
            return self
        if early_stop:
            return dataclasses.replace(self, early_stop=True)
        return dataclasses.replace(self, keep_best=True, early_stop=False)

    def __repr__(self) -> str:
        shown = []
        fields = sorted(dataclasses.fields(self), key=lambda f: bool(f.kw_only))  # positional first
        for f in fields:
            value = getattr(self, f.name)
            default = _default(f)
            if default is not dataclasses.MISSING and _same(value, default):
                continue
            shown.append(f"{f.name}={_short(value)}")
        return f"{type(self).__name__}({', '.join(shown)})"


def _same(a: Any, b: Any) -> bool:
    return not isinstance(a, Tensor) and not isinstance(b, Tensor) and type(a) is type(b) and a == b


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _short(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor(shape={tuple(value.shape)})"
    if callable(value) and hasattr(value, "__name__"):
        return str(value.__name__)
    return repr(value)


@dataclass(frozen=True, eq=False, repr=False)
class PGD(EnginePGD):
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


@dataclass(frozen=True, eq=False, repr=False)
class _BallPGD(EnginePGD):
    eps: float | Tensor
    lower: float | Tensor = field(default=0.0, kw_only=True)
    upper: float | Tensor = field(default=1.0, kw_only=True)

    def _norm(self) -> str:
        raise NotImplementedError

    def threat_model(self) -> ThreatModel:
        return ball(self._norm(), self.eps, lower=self.lower, upper=self.upper)


@dataclass(frozen=True, eq=False, repr=False)
class L2PGD(_BallPGD):
    """PGD in the L2 ball of radius ``eps``: steps ``g / ||g||_2``. ``eps``: a float or a (N,) tensor."""

    def _norm(self) -> str:
        return "l2"


@dataclass(frozen=True, eq=False, repr=False)
class LinfPGD(_BallPGD):
    """PGD in the Linf ball of radius ``eps``: steps ``sign(g)``. ``eps``: a float or a (N,) tensor."""

    def _norm(self) -> str:
        return "linf"


@dataclass(frozen=True, eq=False, repr=False)
class FGSM(_BallPGD):
    """The fast gradient sign method: one step of length ``rel_step_size * eps`` (default 1.0).

    ``norm="linf"`` (default) steps along ``sign(g)``; ``norm="l2"`` gives the fast gradient method.
    With ``random_start=True`` and ``rel_step_size=1.25`` this is Wong et al.'s FGSM-RS.
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


@dataclass(frozen=True, eq=False, repr=False)
class APGD(_BallPGD):
    """APGD (Croce & Hein, ICML 2020): PGD with the adaptive step rule ``advfeat.steps.APGDStep``
    (momentum, the step halved where the objective stalls, restarts from the best point), from a random start
    with a step of 2 eps, returning each sample's best iterate. The attacks of AutoAttack:

    * ``APGD(eps)``: APGD-CE (untargeted, cross-entropy); ``APGD(eps, loss=af.dlr)``: APGD-DLR;
    * ``APGD(eps, loss=af.dlr, n_target_classes=9)``: APGD-T, untargeted robustness measured by targeted
      runs, one per class among the ``n_target_classes`` most likely wrong ones (by the clean logits), each
      raising the targeted DLR loss (``dlr_targeted``; with another loss ``L``, ``-L(logits, t)``); a
      sample broken by one target is not attacked with the next;
    * ``APGD(eps, targeted=True)``: towards given targets ``y`` (cross-entropy or any loss of the targets).

    APGD-T with ``batched=True`` runs its target classes as one batch of ``n_target_classes x N`` samples (at most
    ``max_batch`` per engine call): every sample is attacked towards every target and keeps the first target that
    broke it, else the best, which is what the sequential run keeps; each target's random start is drawn for the
    whole batch in both, so the results agree sample for sample up to float rounding. Fewer, larger passes
    (faster on a GPU) at the price of attacking samples an earlier target already broke.

    ``norm="linf"`` (default) or ``"l2"``. Composes with ``Restarts`` and ``WorstOf``;
    ``advfeat.evaluate`` runs it with early stopping like any PGD.

    Examples:
        >>> APGD(0.5, norm="l2", loss=dlr, n_target_classes=9)
        APGD(eps=0.5, loss=dlr, norm='l2', n_target_classes=9)
    """

    norm: str = field(default="linf", kw_only=True)
    steps: int = field(default=100, kw_only=True)
    rel_step_size: float | None = field(default=2.0, kw_only=True)
    random_start: bool = field(default=True, kw_only=True)
    keep_best: bool = field(default=True, kw_only=True)
    rule: StepRule = field(default_factory=APGDStep, kw_only=True)
    n_target_classes: int = field(default=0, kw_only=True)
    batched: bool = field(default=False, kw_only=True, repr=False)
    max_batch: int | None = field(default=None, kw_only=True, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("n_target_classes", self.n_target_classes, minimum=0)
        if self.max_batch is not None:
            check_positive_int("max_batch", self.max_batch)
        if self.targeted and self.n_target_classes:
            raise ValueError("n_target_classes (APGD-T) picks its own targets and measures untargeted robustness; "
                             "it cannot be combined with targeted=True (given targets)")
        if self.targeted and self.loss is dlr:
            raise ValueError("loss=dlr with targeted=True: the targeted DLR needs the true label; use "
                             "n_target_classes for AutoAttack's APGD-T, or a loss of the targets (the default "
                             "cross-entropy)")

    def _norm(self) -> str:
        return self.norm

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        if not self.n_target_classes:
            return super().run(model, x, y, generator)
        with torch.no_grad():
            logits = model(x)
        check_logits(logits, y)
        c = logits.shape[1]
        if self.n_target_classes > c - 1:
            raise ValueError(f"n_target_classes must be at most C - 1 = {c - 1} for this model, got "
                             f"{self.n_target_classes}")
        ranked = logits.float().scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)
        threat = self.threat_model()
        xw = x.detach().to(working_dtype(x.dtype))
        bounds = threat.bounds(xw)

        def start() -> Tensor | None:  # every target's random start is drawn for the whole batch, in order
            return threat.init(xw, bounds, generator) if self.random_start else None

        def attack(xs: Tensor, ys: Tensor, targets: Tensor, z0: Tensor | None) -> Tensor:
            return optimize(
                _TowardsTarget(model, ys, targets, self.loss or cross_entropy), xs, threat, steps=self.steps,
                step_size=self.step_length(threat), start=z0, keep_best=True, early_stop=self.early_stop,
                generator=generator, rule=self.rule,
            ).x.to(x.dtype)

        if self.batched and not isinstance(getattr(threat, "eps", None), Tensor):
            return self._targets_batched(model, x, y, ranked, start, attack)
        out, alive = x.clone(), torch.arange(x.shape[0], device=x.device)
        best: Outcome | None = None
        for j in range(self.n_target_classes):
            z0 = start()
            cand = attack(x[alive], y[alive], ranked[alive, j], None if z0 is None else z0[alive])
            o = self.outcome(model, cand, y[alive])
            take = torch.ones_like(o.success) if best is None else o.better_than(best)
            out[alive] = torch.where(column(take, x.ndim), cand, out[alive])
            best = o if best is None else Outcome(torch.where(take, o.success, best.success),
                                                    torch.where(take, o.score, best.score))
            keep = (~best.success).nonzero().squeeze(1)  # one host sync per target class, outside the steps
            alive, best = alive[keep], Outcome(best.success[keep], best.score[keep])
            if alive.numel() == 0:
                break
        return out

    def _targets_batched(self, model: nn.Module, x: Tensor, y: Tensor, ranked: Tensor,
                         start: Callable[[], Tensor | None],
                         attack: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]) -> Tensor:
        """APGD-T with its target classes as one batch (``max_batch`` samples per engine call at most): every
        sample is attacked towards every target, and keeps the first target that broke it, else the best."""
        starts = [start() for _ in range(self.n_target_classes)]  # drawn as the sequential run draws them
        out, best = x.clone(), None
        for i, k in _calls(self.n_target_classes, x.shape[0], self.max_batch):
            z0 = None if starts[i] is None else torch.cat([z for z in starts[i:i + k] if z is not None])
            cands = attack(_tile(x, k), _tile(y, k), ranked[:, i:i + k].T.reshape(-1), z0)
            for cand in cands.chunk(k):
                o = self.outcome(model, cand, y)
                take = torch.ones_like(o.success) if best is None else ~best.success & o.better_than(best)
                out = torch.where(column(take, x.ndim), cand, out)
                best = o if best is None else Outcome(torch.where(take, o.success, best.success),
                                                        torch.where(take, o.score, best.score))
        return out


class _TowardsTarget:
    """APGD-T's objective: raise the targeted DLR (or ``-loss(logits, t)``); success: the true label is lost."""

    def __init__(self, model: nn.Module, y: Tensor, target: Tensor, loss: LossFn) -> None:
        self.model, self.y, self.target, self.loss = model, y, target, loss

    def __call__(self, x: Tensor, index: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = self.model(x)
        y = self.y if index is None else self.y.index_select(0, index)
        t = self.target if index is None else self.target.index_select(0, index)
        value = dlr_targeted(logits, y, t) if self.loss is dlr else -self.loss(logits, t)
        return value, logits.argmax(1) != y


@dataclass(frozen=True, eq=False)
class Restarts(Attack):
    """Run ``attack`` ``n`` times and keep, per sample, the worst case: success first, then the highest
    score. Each run draws fresh random starts from the same generator (``generator=`` or ``seed``).

    ``batched=True`` runs the restarts of a PGD-family attack with random starts as one batch of ``n x N`` samples
    (at most ``max_batch`` samples per engine call; more runs are split into several calls): the starts are drawn
    exactly as the runs one after another draw them, so the result equals the sequential one sample for sample up to
    float rounding (a larger batch can take other kernels). Fewer, larger passes: faster on a GPU. Other attacks
    run one after another."""

    attack: Attack
    n: int
    seed: int | None = None
    batched: bool = field(default=False, kw_only=True, repr=False)
    max_batch: int | None = field(default=None, kw_only=True, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.attack, Attack):
            raise TypeError(f"attack must be an advfeat Attack, got {self.attack!r}")
        check_positive_int("n", self.n)
        if self.max_batch is not None:
            check_positive_int("max_batch", self.max_batch)

    @property
    def targeted(self) -> bool:  # type: ignore[override]
        return self.attack.targeted

    @property
    def eval_mode(self) -> bool:  # type: ignore[override]
        return self.attack.eval_mode

    @property
    def box(self) -> tuple[float | Tensor, float | Tensor]:
        return self.attack.box

    def outcome(self, model: nn.Module, x_adv: Tensor, y: Tensor) -> Outcome:
        return self.attack.outcome(model, x_adv, y)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        a = self.attack
        if (self.batched and self.n > 1 and isinstance(a, EnginePGD) and a.random_start
                and not getattr(a, "n_target_classes", 0)  # APGD-T's run is not run_from: one after another
                and not isinstance(getattr(a.threat_model(), "eps", None), Tensor)):
            return _keep_worst(model, x, y, self._batched(a, model, x, y, generator), a)
        return _worst_case(model, x, y, [a] * self.n, a, generator)

    def _batched(self, a: EnginePGD, model: nn.Module, x: Tensor, y: Tensor,
                 generator: torch.Generator | None) -> Iterator[Tensor]:
        """The ``n`` runs' results, in order, computed ``per_call`` runs at a time as one batch each."""
        threat = a.threat_model()
        xw = x.detach().to(working_dtype(x.dtype))
        bounds = threat.bounds(xw)
        starts = [threat.init(xw, bounds, generator) for _ in range(self.n)]  # the sequential runs' draws, in order
        for i, k in _calls(self.n, x.shape[0], self.max_batch):
            out = a.run_from(model, _tile(x, k), _tile(y, k), generator, torch.cat(starts[i:i + k]))
            yield from out.detach().to(x.dtype).chunk(k)

    def for_evaluation(self, early_stop: bool) -> Attack:
        return dataclasses.replace(self, attack=self.attack.for_evaluation(early_stop))


@dataclass(frozen=True, eq=False, init=False)
class WorstOf(Attack):
    """Per sample, the worst case over several attacks: ``WorstOf(af.L2PGD(0.5), af.LinfPGD(8 / 255))``.

    Candidates are ranked by success first, then by ``loss`` (default cross-entropy) of the combination,
    so that attacks with different losses compare on one scale. All parts must agree on ``targeted``
    and on the box.
    """

    attacks: tuple[Attack, ...]
    loss: LossFn | None
    seed: int | None

    def __init__(self, *attacks: Attack, loss: LossFn | None = None, seed: int | None = None) -> None:
        if not attacks:
            raise ValueError("attacks: WorstOf needs at least one attack")
        for a in attacks:
            if not isinstance(a, Attack):
                raise TypeError(f"attacks must be advfeat Attacks, got {a!r}")
        if len({a.targeted for a in attacks}) > 1:
            raise ValueError("attacks must all be targeted or all untargeted")
        boxes = [a.box for a in attacks]
        if any(not _same_box(boxes[0], b) for b in boxes[1:]):
            raise ValueError(f"attacks must share one box, got {boxes}")
        if loss is not None and not callable(loss):
            raise TypeError(f"loss must be a callable (logits, y) -> per-sample loss, got {loss!r}")
        object.__setattr__(self, "attacks", tuple(attacks))
        object.__setattr__(self, "loss", loss)
        object.__setattr__(self, "seed", seed)

    @property
    def targeted(self) -> bool:  # type: ignore[override]
        return self.attacks[0].targeted

    @property
    def eval_mode(self) -> bool:  # type: ignore[override]
        return self.attacks[0].eval_mode

    @property
    def box(self) -> tuple[float | Tensor, float | Tensor]:
        return self.attacks[0].box

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        return _worst_case(model, x, y, list(self.attacks), self, generator)

    def for_evaluation(self, early_stop: bool) -> Attack:
        return WorstOf(*(a.for_evaluation(early_stop) for a in self.attacks), loss=self.loss, seed=self.seed)

    def __repr__(self) -> str:
        extra = "" if self.loss is None else f", loss={_short(self.loss)}"
        return f"WorstOf({', '.join(map(repr, self.attacks))}{extra})"


def _same_box(a: tuple[float | Tensor, float | Tensor], b: tuple[float | Tensor, float | Tensor]) -> bool:
    return all(
        (isinstance(u, Tensor) and isinstance(v, Tensor) and torch.equal(u, v))
        or (not isinstance(u, Tensor) and not isinstance(v, Tensor) and u == v)
        for u, v in zip(a, b, strict=True)
    )


def _worst_case(
    model: nn.Module, x: Tensor, y: Tensor, parts: list[Attack], judge: Attack,
    generator: torch.Generator | None,
) -> Tensor:
    """Run each part (inside the caller's guard) and keep, per sample, the candidate ``judge`` rates worst."""
    return _keep_worst(model, x, y, (part.run(model, x, y, generator).detach().to(x.dtype) for part in parts), judge)


def _calls(runs: int, n: int, max_batch: int | None) -> Iterator[tuple[int, int]]:
    """``(first, count)`` of the runs each engine call takes when ``runs`` runs of ``n`` samples go as one batch
    of at most ``max_batch`` samples (at least one run per call)."""
    per_call = runs if max_batch is None else max(1, max_batch // max(1, n))
    for i in range(0, runs, per_call):
        yield i, min(per_call, runs - i)


def _tile(t: Tensor, k: int) -> Tensor:
    """``k`` copies of a batch, one after another along the batch dimension."""
    return t.repeat(k, *([1] * (t.ndim - 1)))


def _keep_worst(model: nn.Module, x: Tensor, y: Tensor, candidates: Iterable[Tensor], judge: Attack) -> Tensor:
    """Per sample, the candidate ``judge`` rates worst (success first, then the score), the first on a tie."""
    best: Tensor | None = None
    best_outcome: Outcome | None = None
    for cand in candidates:
        out = judge.outcome(model, cand, y)
        if best is None or best_outcome is None:
            best, best_outcome = cand, out
            continue
        better = out.better_than(best_outcome)
        best = torch.where(better.reshape(-1, *([1] * (x.ndim - 1))), cand, best)
        best_outcome = Outcome(torch.where(better, out.success, best_outcome.success),
                               torch.where(better, out.score, best_outcome.score))
    assert best is not None
    return best

