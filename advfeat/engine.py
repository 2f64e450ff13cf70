"""The one projected-gradient loop.

Every attack and every dataset constructor in advfeat runs ``optimize``: a per-sample objective is
maximised (attacks) or minimised (targeted attacks, representation inversion) by steps that a step rule
(``advfeat.steps``; default: a constant step along the threat model's direction) proposes, each
followed by the threat model's projection.

The objective is any callable ``objective(x, index) -> (loss, success)``:

* ``x`` is the current batch of iterates, in the dtype of the caller's input;
* ``index`` is None, or -- after early stopping has dropped finished samples -- a 1-D long tensor of the
  positions of the remaining samples in the original batch, so the objective can select its own
  per-sample data (labels, targets, reference representations) with ``y[index]``;
* ``loss`` is a per-sample tensor of shape (n,);
* ``success`` is a per-sample bool tensor or None (used by ``keep_best`` and ``early_stop``).

Work inside the loop is whole-batch tensor ops; there is no host synchronisation in a step, except, with
``early_stop``, at the steps where finished samples are dropped from the batch: every step on CPU (where
a host sync costs nothing), steps 1, 2, 4, 8, ... on accelerators, where the batch shrinks to powers of two only
(a compiled model sees few shapes). The step rule's per-sample state is dropped with its samples.

Examples:
    Push a point of a linear score as high as the L2 ball allows:

    >>> import torch, advfeat as af
    >>> w = torch.tensor([[3.0, 4.0]])
    >>> x = torch.full((1, 2), 0.5)
    >>> res = af.engine.optimize(lambda z, i: ((z * w).sum(1), None), x, af.L2Ball(0.1),
    ...                          steps=5, step_size=0.05)
    >>> [round(v, 3) for v in (res.x - x)[0].tolist()]   # eps * w / ||w||
    [0.06, 0.08]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .steps import Constant, StepContext, StepRule
from .threat import Bounds, ThreatModel, column

__all__ = ["optimize", "OptimizeResult", "Objective", "working_dtype"]

Objective = Callable[[Tensor, "Tensor | None"], "tuple[Tensor, Tensor | None]"]


@dataclass
class OptimizeResult:
    """What ``optimize`` returns.

    ``x``: the perturbed batch in the working dtype (see ``working_dtype``). ``loss`` and ``success``:
    per sample at the returned iterate, when ``keep_best`` made them known (else None).
    """

    x: Tensor
    loss: Tensor | None = None
    success: Tensor | None = None


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the perturbation arithmetic: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _accelerated(device: torch.device) -> bool:
    """Whether early stopping follows the accelerator schedule on ``device`` (everything but the CPU).

    On the CPU the batch is compacted to exactly its unfinished samples after every step (a host sync is free
    there). On an accelerator it is compacted after steps 1, 2, 4, 8, ... only (log2(steps) host syncs in all),
    and only to a power of two (the unfinished samples, then as many finished ones, frozen, as fill it), so a
    compiled model (``torch.compile``, CUDA graphs) sees at most log2(N) + 2 batch sizes whatever the pattern
    in which samples finish.
    """
    return device.type != "cpu"


def _compacted_size(active: int, size: int, accelerated: bool) -> int:
    """The batch size to compact ``size`` samples of which ``active`` are unfinished to."""
    if not accelerated or active == 0:
        return active
    return min(size, 1 << (active - 1).bit_length())


def optimize(
    objective: Objective,
    x: Tensor,
    threat: ThreatModel,
    *,
    steps: int,
    step_size: float | Tensor,
    maximize: bool = True,
    start: Tensor | None = None,
    random_start: bool = False,
    keep_best: bool = False,
    early_stop: bool = False,
    generator: torch.Generator | None = None,
    rule: StepRule | None = None,
) -> OptimizeResult:
    """Run projected gradient ascent (``maximize=True``) or descent on ``objective`` around ``x``.

    Args:
        objective: ``(x, index) -> (loss (n,), success (n,) bool or None)``; see the module docs.
        x: the centre of the threat model's set, a floating batch (N, ...). Not modified.
        threat: supplies the random start, the step direction and the projection.
        steps: number of gradient steps (>= 1). Each costs one forward and one backward to the input.
        step_size: the base step length (a float or a per-sample tensor of shape (N,)), which the rule uses.
        maximize: ascend (True) or descend (False) the objective.
        start: a starting point (projected first); else ``x`` itself or, with ``random_start``, the
            threat model's random init.
        keep_best: return, per sample, the best iterate seen (the start and the final iterate included;
            one extra forward pass): a successful iterate first, then the highest (or lowest) loss.
        early_stop: stop updating a sample once ``success`` is True for it and drop finished samples from
            the batch (after every step on CPU; at steps 1, 2, 4, 8, ... on accelerators, to a power of two).
            A finished sample keeps its first successful iterate.
        generator: the random source of ``random_start``.
        rule: the step rule (``advfeat.steps``); default ``advfeat.steps.Constant``.
    """
    rule = Constant() if rule is None else rule
    if not isinstance(rule, StepRule):
        raise TypeError(f"rule must be an advfeat StepRule (see advfeat.steps), got {rule!r}")
    n = x.shape[0]
    wdt = working_dtype(x.dtype)
    in_dtype = x.dtype
    xc = x.detach().to(wdt)
    bounds: Bounds = threat.bounds(xc)
    sign = 1.0 if maximize else -1.0
    step: float | Tensor = (
        column(step_size.to(device=xc.device, dtype=wdt), xc.ndim)
        if isinstance(step_size, Tensor) else float(step_size)
    )
    state: dict[str, Tensor] = {}  # the rule's per-sample memory

    if start is not None:
        z = start.detach().to(device=xc.device, dtype=wdt).clone()
    elif random_start:
        z = threat.init(xc, bounds, generator)
    else:
        z = xc.clone()
    threat.project_(z, xc, bounds)

    index: Tensor | None = None  # positions of the active samples in the original batch (None: all)
    out: Tensor | None = None  # full-size result, allocated when early stopping first drops samples
    done = torch.zeros(n, dtype=torch.bool, device=xc.device) if early_stop else None
    best_z = z.clone() if keep_best else None
    best_score = torch.full((n,), -torch.inf, device=xc.device, dtype=wdt) if keep_best else None
    best_loss = torch.zeros((n,), device=xc.device, dtype=wdt) if keep_best else None
    best_ok = torch.zeros(n, dtype=torch.bool, device=xc.device) if keep_best else None
    saw_success = False

    def remember(z: Tensor, loss: Tensor, success: Tensor | None) -> None:
        nonlocal best_z, best_score, best_loss, best_ok, saw_success
        assert best_z is not None and best_score is not None and best_loss is not None and best_ok is not None
        loss = loss.detach().to(wdt)
        score = loss * sign
        better = score > best_score
        if success is not None:
            saw_success = True
            better = (success & ~best_ok) | ((success == best_ok) & better)
            best_ok = torch.where(better, success, best_ok)
        best_score = torch.where(better, score, best_score)
        best_loss = torch.where(better, loss, best_loss)
        best_z = torch.where(column(better, z.ndim), z, best_z)

    accelerated = _accelerated(xc.device)
    with torch.enable_grad():
        for t in range(steps):
            z.requires_grad_(True)
            loss, success = objective(z.to(in_dtype), index)
            (grad,) = torch.autograd.grad(loss.sum(), z)
            z = z.detach()
            if keep_best:
                remember(z, loss, success)
            grad = grad.to(wdt)
            if not (grad.is_contiguous() or grad.is_contiguous(memory_format=torch.channels_last)):
                grad = grad.contiguous()  # e.g. an expanded gradient: the direction is computed in place
            score = loss.detach().to(wdt)
            if not maximize:  # the rule always ascends: negating is exact, so results equal a descent
                grad, score = grad.neg_(), score.neg()
            before: Tensor | None = None
            if early_stop and success is not None:
                assert done is not None
                done = done | success
                before = z.clone()
            z = rule.step(z, grad, score, state, StepContext(t, steps, step, xc, threat, bounds))
            if before is not None:  # finished samples keep their first successful iterate
                assert done is not None
                z = torch.where(column(done, z.ndim), before, z)
            threat.project_(z, xc, bounds)

            if early_stop and (not accelerated or (t + 1) & t == 0) and t + 1 < steps:
                assert done is not None
                size = _compacted_size(int((~done).sum()), z.shape[0], accelerated)  # the check's one host sync
                if size == z.shape[0]:
                    continue
                # the unfinished samples in order, then (accelerated) finished ones to fill a power of two
                keep = torch.argsort(done.to(torch.uint8), stable=True)[:size]
                current = best_z if best_z is not None else z
                if index is None:
                    out, index = current.clone(), keep
                else:
                    assert out is not None
                    out.index_copy_(0, index, current)
                    index = index.index_select(0, keep)
                z, xc, done = z.index_select(0, keep), xc.index_select(0, keep), done.index_select(0, keep)
                bounds = bounds.take(keep)
                if isinstance(step, Tensor):
                    step = step.index_select(0, keep)
                state = _take(state, keep, rule)
                if keep_best:
                    assert best_z is not None and best_score is not None
                    assert best_loss is not None and best_ok is not None
                    best_z, best_score = best_z.index_select(0, keep), best_score.index_select(0, keep)
                    best_loss, best_ok = best_loss.index_select(0, keep), best_ok.index_select(0, keep)
                if size == 0:
                    break

    if keep_best and z.shape[0] > 0:
        with torch.no_grad():
            loss, success = objective(z.to(in_dtype), index)
        remember(z, loss, success)
    result = best_z if best_z is not None else z
    if index is None:  # nothing was dropped: per-sample loss and success are known
        return OptimizeResult(result, best_loss, best_ok if saw_success else None)
    assert out is not None
    if index.shape[0] > 0:
        out.index_copy_(0, index, result)
    return OptimizeResult(out)


def _take(state: dict[str, Tensor], keep: Tensor, rule: StepRule) -> dict[str, Tensor]:
    """The rule's state of the samples ``keep``: every value is per sample (its first dimension the batch)."""
    out = {}
    for k, v in state.items():
        if not isinstance(v, Tensor) or v.ndim == 0:
            raise TypeError(f"{type(rule).__name__} keeps state[{k!r}] = {type(v).__name__}; a step rule's state "
                            "must hold per-sample tensors (first dimension = the batch)")
        out[k] = v.index_select(0, keep)
    return out
