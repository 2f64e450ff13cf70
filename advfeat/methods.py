"""Training methods: how a batch becomes a training loss. Small immutable configurations, like attacks.

``af.adversarial_train(model, loader, method=af.TRADES(af.L2PGD(0.5, steps=7), beta=6))``. A method is a frozen
dataclass with one method to write, ``TrainingMethod.loss``: given the batch, return the loss to minimise
and the logits the trainer reports accuracy on. The trainer (``advfeat.train``) owns everything else: the
loop, devices, mixed precision, DDP, the optimiser and its schedule, checkpoints and resume (the method's repr
is part of a checkpoint's fingerprint), evaluation and progress. A method that needs several optimiser steps
per batch (free training's replays) overrides ``TrainingMethod.batch``, a generator that yields one loss
per optimiser step.

Built in: ``StandardTraining``, ``PGDTraining`` (Madry et al. 2018), ``FGSMRS`` (Wong et al.
2020, with a catastrophic-overfitting guard), ``FreeTraining`` (Shafahi et al. 2019), ``TRADES``
(Zhang et al. 2019) and ``MART`` (Wang et al. 2020). Every adversarial example comes from the one engine.

A method of your own (here: train on Gaussian-noised inputs):

Examples:
    >>> import torch, torch.nn.functional as F, advfeat as af
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True, eq=False)
    ... class Noisy(af.TrainingMethod):
    ...     sigma: float = 0.1
    ...     def loss(self, model, x, y, ctx):
    ...         noise = torch.randn(x.shape, device=x.device, dtype=x.dtype)
    ...         logits = model((x + self.sigma * noise).clamp(0, 1))
    ...         return F.cross_entropy(logits.float(), y), logits
    >>> data = af.data.planted(64, 16, seed=0)
    >>> hist = af.adversarial_train(af.models.PlantedNet(), torch.utils.data.DataLoader(data.train, batch_size=32),
    ...                             method=Noisy(0.05), epochs=1, progress=False)
    >>> len(hist)
    1
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_positive_float, check_positive_int
from ._config import Config
from .attacks import PGD, Attack, GradientAttack
from .attacks.gradient import expected
from .engine import optimize
from .guard import frozen_model
from .threat import ThreatModel, column

__all__ = ["TrainingMethod", "TrainContext", "StandardTraining", "PGDTraining", "FGSMRS", "FreeTraining", "TRADES",
           "MART", "from_name", "NAMES", "DEFAULT_METHOD"]


@dataclass
class TrainContext:
    """What a method may use besides the batch.

    ``model``: the model being trained, as the trainer holds it (possibly wrapped in DistributedDataParallel;
    compute the training loss through it). ``module``: the bare module inside (craft attacks on it: no gradient
    synchronisation is needed). ``attack_eval_mode``: whether attacks run the model in eval mode. ``state``: the
    method's memory, kept for one epoch. ``epoch``: the epoch being trained (0-based).
    """

    model: nn.Module
    module: nn.Module
    attack_eval_mode: bool = True
    state: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0

    def perturb(self, attack: Attack, x: Tensor, y: Tensor) -> Tensor:
        """``attack``'s examples for the batch, crafted on the bare module (in eval mode unless the trainer's
        ``attack_eval_mode`` is off); the model's state is restored afterwards, as by every attack."""
        if dataclasses.is_dataclass(attack) and any(f.name == "eval_mode" for f in dataclasses.fields(attack)):
            if attack.eval_mode != self.attack_eval_mode:
                attack = dataclasses.replace(attack, eval_mode=self.attack_eval_mode)
        elif not self.attack_eval_mode:
            raise ValueError(f"attack_eval_mode=False needs an attack with an eval_mode field; {attack!r} has none")
        return attack(self.module, x, y, validate=False)  # the trainer checked the batch and checks the loss


@dataclass(frozen=True, eq=False)
class TrainingMethod(Config, ABC):
    """Base class of training methods: a frozen dataclass; write ``loss`` (see the module docs)."""

    @abstractmethod
    def loss(self, model: nn.Module, x: Tensor, y: Tensor, ctx: TrainContext) -> tuple[Tensor, Tensor]:
        """The training loss of the batch (a scalar) and the logits to report training accuracy on.

        ``model`` is in train mode; ``x`` is inside the attack's box. Use ``ctx.perturb(attack, x, y)`` for
        adversarial examples.
        """

    def batch(self, model: nn.Module, x: Tensor, y: Tensor, ctx: TrainContext) -> Iterator[tuple[Tensor, Tensor]]:
        """The optimiser steps of one batch: yield ``(loss, logits)`` once per step; after each yield the trainer
        has backpropagated that loss and stepped the optimiser. Default: one step with ``loss``."""
        yield self.loss(model, x, y, ctx)

    @property
    def steps_per_batch(self) -> int:
        """How many times ``batch`` yields (the schedule counts optimiser steps)."""
        return 1

    @property
    def box(self) -> tuple[float | Tensor, float | Tensor]:
        """The valid input range; batches outside it are refused. Default: the method's ``attack``'s box."""
        attack = getattr(self, "attack", None)
        return attack.box if isinstance(attack, Attack) else (-float("inf"), float("inf"))

    def guard_attack(self) -> Attack | None:
        """An attack to guard training with, or None (default). With one, the trainer measures its accuracy on a
        held batch after every epoch and ends with the weights of the best epoch (a guard against catastrophic
        overfitting)."""
        return None


def _cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), y)


def _check_attack(method: str, attack: object, ball: bool = False) -> None:
    if not isinstance(attack, Attack):
        raise TypeError(f"attack must be an advfeat Attack for {method}, got {attack!r}")
    if ball and not isinstance(attack, GradientAttack):
        raise TypeError(f"{method} takes its ball, steps and step size from a PGD configuration (L2PGD, LinfPGD or "
                        f"PGD); got {type(attack).__name__}")


def _ball(method: str, attack: GradientAttack) -> tuple[ThreatModel, float | Tensor]:
    """The attack's threat model and its radius (refused when it has none)."""
    threat = attack.threat_model()
    eps = threat.eps
    if eps is None:
        raise ValueError(f"{method} needs a ball with an eps; {threat!r} has none")
    return threat, eps


@dataclass(frozen=True, eq=False)
class StandardTraining(TrainingMethod):
    """Cross-entropy on the clean batch. Batches must lie in ``box`` (default [0, 1], pixels, as every attack
    expects: 0-255 images are refused); pass ``StandardTraining(box=(lo, hi))`` for other inputs."""

    box: tuple[float | Tensor, float | Tensor] = field(default=(0.0, 1.0), repr=False)  # repr: the method name alone

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, ctx: TrainContext) -> tuple[Tensor, Tensor]:
        logits = model(x)
        return _cross_entropy(logits, y), logits


@dataclass(frozen=True, eq=False)
class PGDTraining(TrainingMethod):
    """Adversarial training (Madry et al. 2018): cross-entropy on ``attack``'s examples (any attack)."""

    attack: Attack

    def __post_init__(self) -> None:
        _check_attack("PGDTraining", self.attack)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, ctx: TrainContext) -> tuple[Tensor, Tensor]:
        logits = model(ctx.perturb(self.attack, x, y))
        return _cross_entropy(logits, y), logits


@dataclass(frozen=True, eq=False)
class FGSMRS(TrainingMethod):
    """Fast adversarial training (Wong et al. 2020): one step of 1.25 eps from a random start in ``attack``'s
    ball (with its loss). ``guard``: after every epoch, measure ``attack``'s accuracy on a held batch and end
    with the best epoch's weights, against catastrophic overfitting."""

    attack: GradientAttack
    guard: bool = True

    def __post_init__(self) -> None:
        _check_attack("FGSMRS", self.attack, ball=True)
        _ball("FGSMRS", self.attack)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, ctx: TrainContext) -> tuple[Tensor, Tensor]:
        step = PGD(self.attack.threat_model(), steps=1, rel_step_size=1.25, random_start=True, loss=self.attack.loss)
        logits = model(ctx.perturb(step, x, y))
        return _cross_entropy(logits, y), logits

    def guard_attack(self) -> Attack | None:
        return self.attack if self.guard else None


@dataclass(frozen=True, eq=False)
class FreeTraining(TrainingMethod):
    """Free adversarial training (Shafahi et al. 2019): ``replays`` passes over each batch; one backward gives
    the weight gradient and the input gradient, which moves the perturbation by eps along the attack's direction.
    The perturbation carries over between replays and batches (within an epoch). An epoch costs ``replays``
    standard epochs, and the schedule counts every replay."""

    attack: GradientAttack
    replays: int = 4

    def __post_init__(self) -> None:
        _check_attack("FreeTraining", self.attack, ball=True)
        _ball("FreeTraining", self.attack)
        check_positive_int("replays", self.replays)

    @property
    def steps_per_batch(self) -> int:
        return self.replays

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, ctx: TrainContext) -> tuple[Tensor, Tensor]:
        """One replay: the loss at ``x`` plus the carried perturbation (kept in ``ctx.state``)."""
        threat = self.attack.threat_model()
        delta = ctx.state.get("delta")
        if delta is None or delta.shape[1:] != x.shape[1:]:
            delta = torch.zeros_like(x)
        if delta.shape[0] < x.shape[0]:
            delta = torch.cat([delta, torch.zeros_like(x[delta.shape[0]:])])
        z = x + delta[: x.shape[0]]
        threat.project_(z, x, threat.bounds(x))
        z.requires_grad_(True)
        ctx.state.update(delta=delta, z=z, x=x)
        logits = model(z)
        return _cross_entropy(logits, y), logits

    def batch(self, model: nn.Module, x: Tensor, y: Tensor, ctx: TrainContext) -> Iterator[tuple[Tensor, Tensor]]:
        threat, eps = _ball("FreeTraining", self.attack)
        bounds = threat.bounds(x)
        for _ in range(self.replays):
            yield self.loss(model, x, y, ctx)
            z, delta = ctx.state["z"], ctx.state["delta"]
            if z.grad is None:
                raise RuntimeError("FreeTraining: the trainer did not backpropagate to the input")
            with torch.no_grad():  # the input gradient of the backward the trainer just ran
                step = column(eps, x.ndim) if isinstance(eps, Tensor) else eps
                moved = z.detach() + threat.direction(z.grad.float()).mul_(step)
                threat.project_(moved, x, bounds)
                delta[: x.shape[0]] = moved - x


@dataclass(frozen=True, eq=False)
class TRADES(TrainingMethod):
    """TRADES (Zhang et al. 2019): clean cross-entropy plus ``beta`` x KL(f(x_adv) || f(x)), with ``x_adv``
    maximising the KL in ``attack``'s ball (its steps, step size and step rule) from a start 0.001-Gaussian off
    ``x``. Accuracy is reported on the clean logits."""

    attack: GradientAttack
    beta: float = 6.0

    def __post_init__(self) -> None:
        _check_attack("TRADES", self.attack, ball=True)
        check_positive_float("beta", self.beta)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, ctx: TrainContext) -> tuple[Tensor, Tensor]:
        logits = model(x)
        threat = self.attack.threat_model()
        target = F.softmax(logits.detach().float(), dim=1)

        def kl(z: Tensor, index: Tensor | None) -> tuple[Tensor, None]:
            p = target if index is None else target.index_select(0, index)
            return F.kl_div(F.log_softmax(ctx.module(z).float(), dim=1), p, reduction="none").sum(1), None

        start = x + 0.001 * torch.randn_like(x)
        with frozen_model(ctx.module, eval_mode=ctx.attack_eval_mode):  # the attack's draws too (EOT)
            x_adv = optimize(expected(kl, self.attack.draws), x, threat, steps=self.attack.steps,
                             step_size=self.attack.step_length(threat), start=start,
                             rule=self.attack.rule).x.to(x.dtype)
        logp_adv = F.log_softmax(model(x_adv).float(), dim=1)
        robust = F.kl_div(logp_adv, F.softmax(logits.float(), dim=1), reduction="batchmean")
        return _cross_entropy(logits, y) + self.beta * robust, logits


@dataclass(frozen=True, eq=False)
class MART(TrainingMethod):
    """MART (Wang et al., ICLR 2020): on ``attack``'s examples, a boosted cross-entropy (the true class up and
    the strongest wrong class down) plus ``beta`` x KL(f(x) || f(x_adv)) weighted by 1 - p_y(x), which puts
    the weight on the misclassified examples. Accuracy is reported on the adversarial logits."""

    attack: Attack
    beta: float = 6.0

    def __post_init__(self) -> None:
        _check_attack("MART", self.attack)
        check_positive_float("beta", self.beta)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, ctx: TrainContext) -> tuple[Tensor, Tensor]:
        x_adv = ctx.perturb(self.attack, x, y)
        logits, logits_adv = model(x).float(), model(x_adv).float()
        p_adv, p_nat = logits_adv.softmax(1), logits.softmax(1)
        wrong = p_adv.scatter(1, y[:, None], -1.0).argmax(1)  # the most likely wrong class
        boosted = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
        kl = F.kl_div(torch.log(p_adv + 1e-12), p_nat, reduction="none").sum(1)
        p_y = p_nat.gather(1, y[:, None]).squeeze(1)
        return boosted + self.beta * (kl * (1.0000001 - p_y)).mean(), logits_adv


_BY_NAME: dict[str, type[TrainingMethod]] = {"standard": StandardTraining, "pgd": PGDTraining, "fgsm-rs": FGSMRS,
                                               "free": FreeTraining, "trades": TRADES, "mart": MART}
NAMES = tuple(_BY_NAME)
"""The names of the built-in methods, shorthands for their defaults in ``advfeat.adversarial_train``."""
DEFAULT_METHOD = "pgd"


def from_name(name: str, attack: Attack | None = None, **options: Any) -> TrainingMethod:
    """The method a string names, with its defaults: ``"standard"``, ``"pgd"``, ``"fgsm-rs"``, ``"free"``,
    ``"trades"``, ``"mart"``. Each but "standard" takes ``attack`` (given to "standard", it is ignored: the
    trainer evaluates with it); ``options`` are the method's fields (``beta`` for trades and mart, ``replays``
    for free, ``guard`` for fgsm-rs).

    Examples:
        >>> import advfeat as af
        >>> from_name("trades", af.L2PGD(0.5), beta=3.0)
        TRADES(attack=L2PGD(eps=0.5), beta=3.0)
    """
    if name not in _BY_NAME:
        raise ValueError(f"method must be one of {', '.join(map(repr, NAMES))} or a TrainingMethod; got {name!r}")
    cls = _BY_NAME[name]
    fields = [f.name for f in dataclasses.fields(cls) if f.name != "attack"]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TypeError(f"{', '.join(unknown)}: not an option of method={name!r} (its options: "
                        f"{', '.join(fields) or 'none'})")
    if cls is StandardTraining:
        return StandardTraining()
    if not isinstance(attack, Attack):
        raise TypeError(f"attack must be an advfeat Attack for method={name!r}, got {attack!r}")
    return cls(attack, **options)  # type: ignore[call-arg]
