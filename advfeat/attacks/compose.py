"""Attacks made of attacks: ``Restarts`` (one attack n times) and ``WorstOf`` (several attacks), each keeping the
per-sample worst case, and ``EOT`` (an attack's gradients averaged over draws of a randomised model)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_positive_int
from .._config import short
from ..engine import working_dtype
from .base import Attack, Outcome, calls, check_fields, tile, towards, worst_of
from .gradient import GradientAttack
from .losses import LossFn

__all__ = ["Restarts", "WorstOf", "EOT", "FixedRandomness"]


@dataclass(frozen=True, eq=False)
class _Wrapper(Attack):
    """An attack around one ``attack``: its sense (targeted or not), mode, box, outcome and per-sample parts."""

    attack: Attack

    def __post_init__(self) -> None:
        if not isinstance(self.attack, Attack):
            raise TypeError(f"attack must be an advfeat Attack, got {self.attack!r}")
        check_fields(self)

    @property
    def targeted(self) -> bool:
        return self.attack.targeted

    @property
    def eval_mode(self) -> bool:
        return self.attack.eval_mode

    @property
    def box(self) -> tuple[float | Tensor, float | Tensor]:
        return self.attack.box

    def outcome(self, model: nn.Module, x_adv: Tensor, y: Tensor) -> Outcome:
        return self.attack.outcome(model, x_adv, y)

    def select(self, index: Tensor) -> Attack:
        part = self.attack.select(index)
        return self if part is self.attack else dataclasses.replace(self, attack=part)


@dataclass(frozen=True, eq=False)
class Restarts(_Wrapper):
    """Run ``attack`` ``n`` times and keep, per sample, the worst case: success first, then the highest
    score. Each run draws fresh random starts from the same generator (``generator=`` or ``seed``).

    ``batched=True`` runs the restarts of a PGD-family attack with random starts as one batch of ``n x N`` samples
    (at most ``max_batch`` samples per engine call; more runs are split into several calls): the starts are drawn
    exactly as the runs one after another draw them, so the result equals the sequential one sample for sample up to
    float rounding (a larger batch can take other kernels). Fewer, larger passes: faster on a GPU. Other attacks
    run one after another."""

    n: int
    seed: int | None = None
    batched: bool = field(default=False, kw_only=True, repr=False)
    max_batch: int | None = field(default=None, kw_only=True, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("n", self.n)
        if self.max_batch is not None:
            check_positive_int("max_batch", self.max_batch)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        a = self.attack
        if self.batched and self.n > 1 and isinstance(a, GradientAttack) and a.batched_restarts:
            return worst_of(model, y, self._batched(a, model, x, y, generator), a)
        return worst_of(model, y, _runs(model, x, y, [a] * self.n, generator), a)

    def _batched(self, a: GradientAttack, model: nn.Module, x: Tensor, y: Tensor,
                 generator: torch.Generator | None) -> Iterator[Tensor]:
        """The ``n`` runs' results, in order, computed ``per_call`` runs at a time as one batch each. Each call's
        starts are drawn just before it, in the sequential runs' order (a run given its start draws nothing else),
        so memory holds one call's batch, at most ``max_batch`` samples, whatever ``n``."""
        threat = a.threat_model()
        xw = x.detach().to(working_dtype(x.dtype))
        bounds = threat.bounds(xw)
        for _, k in calls(self.n, x.shape[0], self.max_batch):
            starts = torch.cat([threat.init(xw, bounds, generator) for _ in range(k)])
            out = a.run_from(model, tile(x, k), tile(y, k), generator, starts)
            del starts
            yield from towards(out.detach(), tile(x, k)).chunk(k)

    def for_evaluation(self, early_stop: bool) -> Attack:
        return dataclasses.replace(self, attack=self.attack.for_evaluation(early_stop))

    def with_draws(self, draws: int) -> Attack:
        return dataclasses.replace(self, attack=self.attack.with_draws(draws))


@dataclass(frozen=True, eq=False, init=False)
class WorstOf(Attack):
    """Per sample, the worst case over several attacks: ``WorstOf(af.L2PGD(0.5), af.LinfPGD(8 / 255))``.

    Candidates are ranked by success first, then by ``loss`` (default cross-entropy) of the combination,
    so that attacks with different losses compare on one scale. All parts must agree on ``targeted``
    and on the box.
    """

    attacks: tuple[Attack, ...]
    loss: LossFn | None = None
    seed: int | None = None

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
        check_fields(self)

    @property
    def targeted(self) -> bool:
        return self.attacks[0].targeted

    @property
    def eval_mode(self) -> bool:
        return self.attacks[0].eval_mode

    @property
    def box(self) -> tuple[float | Tensor, float | Tensor]:
        return self.attacks[0].box

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        return worst_of(model, y, _runs(model, x, y, list(self.attacks), generator), self)

    def for_evaluation(self, early_stop: bool) -> Attack:
        return WorstOf(*(a.for_evaluation(early_stop) for a in self.attacks), loss=self.loss, seed=self.seed)

    def select(self, index: Tensor) -> Attack:
        return WorstOf(*(a.select(index) for a in self.attacks), loss=self.loss, seed=self.seed)

    def with_draws(self, draws: int) -> Attack:
        return WorstOf(*(a.with_draws(draws) for a in self.attacks), loss=self.loss, seed=self.seed)

    def __repr__(self) -> str:
        extra = "" if self.loss is None else f", loss={short(self.loss)}"
        return f"WorstOf({', '.join(map(repr, self.attacks))}{extra})"


def EOT(attack: Attack, draws: int = 20) -> Attack:  # noqa: N802 (an attack's constructor, named like one)
    """``attack`` with Expectation over Transformation (Athalye et al. 2018) for randomised models: every gradient
    step averages the loss and its gradient over ``draws`` forward passes, each drawing the model's randomness anew
    (AutoAttack's "rand" version: 20). Applies to the gradient family (PGD, APGD, APGD-T) and to those inside
    ``Restarts`` and ``WorstOf``; the result is an attack like any other (immutable, printable).

    Examples:
        >>> import advfeat as af
        >>> af.EOT(af.Restarts(af.APGD(0.03), 2), draws=20)
        Restarts(attack=APGD(eps=0.03, draws=20), n=2, seed=None)
    """
    check_positive_int("draws", draws)
    if not isinstance(attack, Attack):
        raise TypeError(f"attack must be an advfeat Attack, got {attack!r}")
    return attack.with_draws(draws)


@dataclass(frozen=True, eq=False)
class FixedRandomness(_Wrapper):
    """``attack`` on a randomised model with its randomness frozen: before every forward pass of the attack the
    random generators are reset to one state (``seed``), so the model draws the same noise, dropout or
    transformation for each sample position at every step, and the attack optimises against one fixed model
    (arXiv 2505.22839; beside ``EOT``, which averages over draws instead). The attack runs without early stopping
    (every step on every sample, its best iterate kept), so a sample keeps its position, and its draw, throughout;
    the caller's random generators are left as they were. ``evaluate`` then scores the point on the model's own,
    random, forward.

    Examples:
        >>> import advfeat as af
        >>> af.FixedRandomness(af.APGD(0.03, steps=10))
        FixedRandomness(attack=APGD(eps=0.03, steps=10), seed=0)
    """

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seed is None:
            raise TypeError("seed must be a whole number in [0, 2**63): the state every forward starts from")

    def threat_model(self) -> Any:
        return self.attack.threat_model()  # type: ignore[attr-defined]

    def outcome(self, model: nn.Module, x_adv: Tensor, y: Tensor) -> Outcome:
        return self.attack.outcome(_Replayed(model, self.seed), x_adv, y)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        inner = self.attack.for_evaluation(False)  # every step on every sample: positions, and draws, stay fixed
        return inner.run(_Replayed(model, self.seed), x, y, generator)

    def for_evaluation(self, early_stop: bool) -> Attack:
        return self


class _Replayed(nn.Module):
    """``model`` whose every forward starts its random generators from one state (the caller's are restored)."""

    def __init__(self, model: nn.Module, seed: int) -> None:
        super().__init__()
        self.model, self.seed = model, seed

    def forward(self, x: Tensor) -> Tensor:
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices):
            torch.manual_seed(self.seed)
            out: Tensor = self.model(x)
        return out


def _same_box(a: tuple[float | Tensor, float | Tensor], b: tuple[float | Tensor, float | Tensor]) -> bool:
    return all(
        (isinstance(u, Tensor) and isinstance(v, Tensor) and torch.equal(u, v))
        or (not isinstance(u, Tensor) and not isinstance(v, Tensor) and u == v)
        for u, v in zip(a, b, strict=True)
    )


def _runs(model: nn.Module, x: Tensor, y: Tensor, parts: list[Attack],
          generator: torch.Generator | None) -> Iterator[Tensor]:
    """Each part's result in turn, run inside the caller's guard."""
    for part in parts:
        yield towards(part.run(model, x, y, generator).detach(), x)
