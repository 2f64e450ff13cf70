"""APGD (Croce & Hein, ICML 2020) on the one engine: APGD-CE, APGD-DLR, APGD-T and targeted APGD."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .._checks import check_logits, check_positive_int
from ..engine import optimize, working_dtype
from ..steps import APGDStep, StepRule
from ..threat import LinfBall, ThreatModel
from .base import Criterion, Outcome, calls, keep, tile, towards
from .gradient import BallPGD, expected
from .losses import LossFn, cross_entropy, dlr, dlr_targeted

__all__ = ["APGD", "malt_targets", "TARGETS"]


@dataclass(frozen=True, eq=False, repr=False)
class APGD(BallPGD):
    """APGD (Croce & Hein, ICML 2020): PGD with the adaptive step rule ``advfeat.steps.APGDStep``
    (momentum, the step halved where the objective stalls, restarts from the best point), from a random start
    with a step of 2 eps, returning each sample's best iterate. The attacks of AutoAttack:

    * ``APGD(eps)``: APGD-CE (untargeted, cross-entropy); ``APGD(eps, loss=af.dlr)``: APGD-DLR;
    * ``APGD(eps, loss=af.dlr, n_target_classes=9)``: APGD-T, untargeted robustness measured by targeted
      runs, one per class among the ``n_target_classes`` most likely wrong ones (by the clean logits), each
      raising the targeted DLR loss (``dlr_targeted``; with another loss ``L``, ``-L(logits, t)``); a
      sample broken by one target is not attacked with the next;
    * ``APGD(eps, targeted=True)``: towards given targets ``y`` (cross-entropy or any loss of the targets).

    APGD-T's target classes: ``targets="confidence"`` (the reference's: the most likely wrong classes by the clean
    logits) or ``"malt"`` (Melamed, Yehudai and Shamir, NeurIPS 2024: the classes whose boundary is nearest in the
    model's linearisation at the clean point, ``malt_targets``; one backward pass per class, once per sample).

    Where it may move: ``threat=af.L2Ball(eps)`` or ``af.LinfBall(eps)`` (eps a float or a per-sample (N,) tensor,
    with the threat model's box), or the shorthand ``eps`` with ``norm`` and ``lower`` / ``upper``. A sample counts
    as broken by ``criterion`` (default: misclassified; APGD-T judges each target's run by it too).

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
    targets: str = field(default="confidence", kw_only=True)
    batched: bool = field(default=False, kw_only=True, repr=False)
    max_batch: int | None = field(default=None, kw_only=True, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("n_target_classes", self.n_target_classes, minimum=0)
        if self.targets not in TARGETS:
            raise ValueError(f"targets must be one of {', '.join(map(repr, TARGETS))}, got {self.targets!r}")
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

    @property
    def batched_restarts(self) -> bool:
        return super().batched_restarts and not self.n_target_classes  # APGD-T's run is not run_from

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
        if self.targets == "malt":
            ranked = malt_targets(model, x, y, self.threat_model())
        else:
            ranked = logits.float().scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)
        threat = self.threat_model()
        criterion = self.success_criterion()
        xw = x.detach().to(working_dtype(x.dtype))
        bounds = threat.bounds(xw)

        def start() -> Tensor | None:  # every target's random start is drawn for the whole batch, in order
            return threat.init(xw, bounds, generator) if self.random_start else None

        def attack(xs: Tensor, ys: Tensor, targets: Tensor, z0: Tensor | None, alive: Tensor | None = None) -> Tensor:
            region = threat if alive is None else threat.select(alive)  # a per-sample eps follows the samples
            return towards(optimize(
                expected(_TowardsTarget(model, ys, targets, self.loss or cross_entropy, criterion), self.draws), xs,
                region,
                steps=self.steps,
                step_size=self.step_length(region), start=z0, keep_best=True, early_stop=self.early_stop,
                generator=generator, rule=self.rule,
            ).x, xs)

        if self.batched and not isinstance(threat.eps, Tensor):
            return self._targets_batched(model, x, y, ranked, start, attack)
        out, alive = x.clone(), torch.arange(x.shape[0], device=x.device)
        best: Outcome | None = None
        for j in range(self.n_target_classes):
            z0 = start()
            cand = attack(x[alive], y[alive], ranked[alive, j], None if z0 is None else z0[alive], alive)
            o = self.outcome(model, cand, y[alive])
            if best is None:
                out[alive], best = cand, o
            else:
                out[alive], best = keep(o.better_than(best), (cand, o), (out[alive], best))
            remaining = (~best.success).nonzero().squeeze(1)  # one host sync per target class, outside the steps
            alive, best = alive[remaining], Outcome(best.success[remaining], best.score[remaining])
            if alive.numel() == 0:
                break
        return out

    def _targets_batched(self, model: nn.Module, x: Tensor, y: Tensor, ranked: Tensor,
                         start: Callable[[], Tensor | None],
                         attack: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]) -> Tensor:
        """APGD-T with its target classes as one batch (``max_batch`` samples per engine call at most): every
        sample is attacked towards every target, and keeps the first target that broke it, else the best."""
        starts = [start() for _ in range(self.n_target_classes)]  # drawn as the sequential run draws them
        best: tuple[Tensor, Outcome] | None = None
        for i, k in calls(self.n_target_classes, x.shape[0], self.max_batch):
            z0 = None if starts[i] is None else torch.cat([z for z in starts[i:i + k] if z is not None])
            cands = attack(tile(x, k), tile(y, k), ranked[:, i:i + k].T.reshape(-1), z0)
            for cand in cands.chunk(k):
                new = (cand, self.outcome(model, cand, y))
                best = new if best is None else keep(~best[1].success & new[1].better_than(best[1]), new, best)
        assert best is not None
        return best[0]


TARGETS = ("confidence", "malt")
"""How APGD-T orders its target classes."""


def malt_targets(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
    """MALT's order of the target classes (Melamed, Yehudai and Shamir, NeurIPS 2024), per sample: the classes
    ``t`` by the linearised distance to their boundary at the clean point, ``(z_y - z_t) / ||grad (z_y - z_t)||_*``
    (the dual norm of the threat model's: L1 for an Linf ball, L2 for an L2 ball), nearest first; the true class
    last. One backward pass per class through the batch. (N, C) long.

    Examples:
        >>> import torch
        >>> from advfeat.threat import LinfBall
        >>> w = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 10.0]])  # class 2's logit moves 10x faster
        >>> model = torch.nn.Linear(2, 3, bias=False)
        >>> model.weight.data = w
        >>> x = torch.tensor([[-0.1, -0.05]])  # z = (0, -0.1, -0.5): class 1 is likelier, class 2 nearer
        >>> malt_targets(model, x, torch.tensor([0]), LinfBall(0.1)).tolist()
        [[2, 1, 0]]
    """
    with torch.enable_grad():
        z = x.detach().requires_grad_(True)
        logits = model(z)
        c = logits.shape[1]
        grads = torch.stack([torch.autograd.grad(logits[:, k].sum(), z, retain_graph=k < c - 1)[0].flatten(1)
                             for k in range(c)], 1).float()  # (N, C, D)
    rows = torch.arange(x.shape[0], device=x.device)
    gap = (logits.detach().float()[rows, y][:, None] - logits.detach().float())  # (N, C), >= 0 where y leads
    slope = grads[rows, y][:, None] - grads
    dual = slope.abs().sum(2) if isinstance(threat, LinfBall) else slope.norm(dim=2)
    distance = gap / dual.clamp_min(1e-12)
    distance[rows, y] = float("inf")
    order: Tensor = distance.argsort(1)
    return order


class _TowardsTarget:
    """APGD-T's objective: raise the targeted DLR (or ``-loss(logits, t)``); success: the attack's criterion on the
    true label (default: the true label is lost)."""

    def __init__(self, model: nn.Module, y: Tensor, target: Tensor, loss: LossFn, criterion: Criterion) -> None:
        self.model, self.y, self.target, self.loss, self.criterion = model, y, target, loss, criterion

    def __call__(self, x: Tensor, index: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = self.model(x)
        y = self.y if index is None else self.y.index_select(0, index)
        t = self.target if index is None else self.target.index_select(0, index)
        value = dlr_targeted(logits, y, t) if self.loss is dlr else -self.loss(logits, t)
        return value, self.criterion(logits, y)
