"""Clean and robust accuracy of a model over a loader, under one or more attacks.

Robust accuracy here counts a sample as correct only if it is classified correctly clean and at every
iterate of the attack (the start and the final point included). With ``early_stop=True`` (default), PGD
attacks stop spending steps on a sample as soon as it is misclassified and drop it from the batch (after
every step on CPU; at steps 1, 2, 4, 8, ... on accelerators, one host sync each); with
``early_stop=False`` every step is run with ``keep_best``. Both count the same samples as broken: the
trajectory of a sample until its first misclassification does not depend on the others (eval mode), so the
accuracies agree.

Examples:
    >>> import torch, advfeat as af
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    >>> data = TensorDataset(torch.rand(32, 4), torch.randint(0, 2, (32,)))
    >>> result = af.evaluate(model, DataLoader(data, batch_size=16), {"l2": af.L2PGD(0.5)}, progress=False)
    >>> result.total, 0 <= result.robust_accuracy("l2") <= result.clean_accuracy <= 1
    (32, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ._dist import all_gather_object, rank_world
from .adapters import check_keys, classifier
from .attacks import Attack
from .cost import Passes, counting
from .guard import device_of, frozen_model
from .progress import progress_bar
from .result import Comparison, EvalResult, compare
from .stats import wilson
from .tally import Tally, checked_batches

__all__ = ["evaluate", "EvalResult", "Comparison", "compare", "robustness_curve", "RobustnessCurve",
           "shifted_accuracy"]


def _named(attacks: Attack | Sequence[Attack] | Mapping[str, Attack] | None) -> dict[str, Attack]:
    if attacks is None:
        return {}
    if isinstance(attacks, Attack):
        attacks = [attacks]
    if isinstance(attacks, (str, bytes)) or not isinstance(attacks, (Mapping, Sequence)):
        raise TypeError(f"attacks must be an advfeat Attack, a list of them or a dict name -> Attack; got "
                        f"{attacks!r}")
    if isinstance(attacks, Mapping):
        named = dict(attacks)
    else:
        named = {repr(a): a for a in attacks}
        if len(named) < len(attacks):
            seen = [repr(a) for a in attacks]
            twice = next(r for r in seen if seen.count(r) > 1)
            raise ValueError(f"attacks: two attacks print as {twice}, and a list names them by their repr: pass a "
                             "dict name -> attack to tell them apart (or drop the repeat)")
    for name, a in named.items():
        if not isinstance(a, Attack):
            raise TypeError(f"attacks must be advfeat Attacks, got {a!r} for {name!r}")
        if a.targeted:
            raise ValueError(f"attacks: evaluate measures untargeted robustness; {name!r} is targeted")
    return named


def shifted_accuracy(model: nn.Module, data: Any, shift: int = 0, device: str | torch.device | None = None) -> float:
    """The share of samples the model predicts as ``(y + shift) mod C``: the accuracy (``shift=0``), or how often
    a model trained on D_det follows the shifted robust features (``shift=1``). ``data``: a Dataset of
    ``(x, y)`` (read in batches of 500) or any iterable of batches.

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from advfeat.evaluate import shifted_accuracy
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> data = TensorDataset(torch.rand(6, 1, 2, 2), torch.zeros(6, dtype=torch.long))
        >>> sum(shifted_accuracy(model, data, shift=k) for k in range(3))
        1.0
    """
    dev = device_of(model, device)
    batches = DataLoader(data, batch_size=500) if isinstance(data, Dataset) else data
    tally = Tally(["clean"])  # here "correct" is "predicted as y + shift"
    with frozen_model(model) as m:
        for _, _x, y, logits in checked_batches(batches, classifier(m), device=dev, what="data"):
            tally.update("clean", logits.argmax(1) == (y + shift) % logits.shape[1])
    return float(tally.compute().clean_accuracy)


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    attacks: Attack | Sequence[Attack] | Mapping[str, Attack] | None = None,
    *,
    early_stop: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
    generator: torch.Generator | None = None,
    keys: tuple[str, str] | None = None,
    per_sample: bool = False,
    distributed: bool | None = None,
) -> EvalResult:
    """Clean accuracy, robust accuracy per attack and the worst case over attacks.

    Args:
        model: maps a batch in [0, 1] to logits (N, C); run in eval mode, its state is restored.
        loader: yields ``(x, y, ...)`` tuples or mappings with image and label keys (a DataLoader or any
            iterable; see ``advfeat.adapters``).
        keys: ``(image key, label key)`` of mapping batches, when not among the common names.
        attacks: an attack, a list (named by their repr) or a dict name -> attack. Untargeted only.
        early_stop: stop attacking samples once misclassified (same accuracy, less work).
        device: where to run; default: the device of the model's parameters.
        progress: show a progress bar (tqdm, notebook aware).
        generator: the random source for attacks with random starts.
        per_sample: keep each sample's correctness (``EvalResult.samples``): which samples each attack broke.
        distributed: under ``torch.distributed``, return the global result on every rank: each rank evaluates its
            part and the parts are gathered, each dataset index counted once (``DistributedSampler`` repeats
            samples to even out the ranks), so the result equals one process's on the same samples. Default
            (None): on when ``loader`` is a DataLoader with a ``DistributedSampler`` and more than one rank runs.
    """
    keys = check_keys(keys)
    model = classifier(model)
    named = _named(attacks)
    runs = {k: a.for_evaluation(early_stop) for k, a in named.items()}
    dev = device_of(model, device)
    sampler = _sampler(loader, distributed)
    tally = Tally(["clean", *runs], keep=per_sample or sampler is not None)
    cost: dict[str, Passes] = {}
    lower, upper = next(iter(runs.values())).box if runs else (0.0, 1.0)
    with frozen_model(model) as m, progress_bar(loader, desc="evaluate", enabled=progress) as bar:
        for batch_no, x, y, logits in checked_batches(bar, m, keys, (lower, upper), dev):
            correct = logits.argmax(1) == y
            tally.update("clean", correct)
            keep = correct.nonzero().squeeze(1)
            xs, ys = x.index_select(0, keep), y.index_select(0, keep)
            still: Tensor = torch.ones_like(ys, dtype=torch.bool)
            for k, attack in runs.items():
                ok = torch.zeros_like(ys, dtype=torch.bool)
                if ys.shape[0] > 0:  # (known: nonzero synced); some models refuse empty batches
                    try:
                        with counting() as passes:
                            # a per-sample eps follows the samples; the batch was checked once, by the tally
                            x_adv = attack.select(keep)(m, xs, ys, generator=generator, validate="result")
                        cost.setdefault(k, Passes()).add(passes)
                    except FloatingPointError as e:
                        raise FloatingPointError(f"loader batch {batch_no}, attack {k!r}: {e}") from None
                    with torch.no_grad():
                        ok = m(x_adv).argmax(1) == ys
                    still &= ok
                tally.update(k, torch.zeros_like(correct).index_put((keep,), ok))
            if runs:
                tally.update_worst(still)
            if progress:
                bar.set_postfix(clean=f"{tally.count('clean') / max(tally.total, 1):.3f}", refresh=False)
    if sampler is not None:
        result: EvalResult = tally.compute(indices=list(iter(sampler)))
        for k, p in _summed_passes(cost).items():
            result.passes[k] = p
        return result
    done: EvalResult = tally.compute()
    done.passes = {k: cost.get(k, Passes()) for k in runs}
    return done


def _sampler(loader: Iterable[Any], distributed: bool | None) -> DistributedSampler[Any] | None:
    """The loader's ``DistributedSampler`` when the result is to be gathered across ranks (``distributed``: True,
    or None and more than one rank runs), else None."""
    sampler = getattr(loader, "sampler", None)
    if distributed is None:
        distributed = isinstance(sampler, DistributedSampler) and rank_world()[1] > 1
    if not distributed:
        return None
    if not isinstance(sampler, DistributedSampler):
        raise ValueError("distributed=True needs a DataLoader with a DistributedSampler (its indices tell which "
                         "samples each rank holds, so that each is counted once)")
    return sampler


def _summed_passes(cost: dict[str, Passes]) -> dict[str, Passes]:
    """Every rank's passes, added (each rank attacked its own samples)."""
    total: dict[str, Passes] = {}
    for part in cast(list[dict[str, Any]], all_gather_object({k: p.as_dict() for k, p in cost.items()})):
        for k, record in part.items():
            total.setdefault(k, Passes()).add(Passes.from_dict(record))
    return total


@dataclass(frozen=True)
class RobustnessCurve:
    """Accuracy against the budget: ``eps`` (ascending), ``accuracy`` at each (fractions), their 95% Wilson
    ``intervals``, ``clean`` accuracy and ``total`` samples; ``figure()`` draws it (matplotlib)."""

    eps: tuple[float, ...]
    accuracy: tuple[float, ...]
    intervals: tuple[tuple[float, float], ...]
    clean: float
    total: int
    name: str = ""

    def figure(self) -> Any:
        """The curve as a matplotlib Figure (``advfeat.figures.robustness_curve``)."""
        from .figures import robustness_curve as draw

        return draw(self)


def robustness_curve(
    model: nn.Module,
    loader: Iterable[Any],
    attack: Callable[[float], Attack],
    eps: Sequence[float],
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    generator: torch.Generator | None = None,
    keys: tuple[str, str] | None = None,
    name: str = "",
    distributed: bool | None = None,
) -> RobustnessCurve:
    """Accuracy under ``attack(e)`` for every budget ``e`` in ``eps``, in one pass over ``loader``. A sample broken
    at a smaller budget is broken at every larger one (its perturbation is inside the larger ball), so each budget
    attacks only the samples every smaller budget left standing. ``distributed`` as in ``evaluate``: under
    ``torch.distributed`` every rank gets the curve of all ranks' samples, each dataset index counted once.

    Examples:
        >>> import torch, advfeat as af
        >>> data = af.data.planted(64, 64, seed=0).test
        >>> model = af.models.PlantedNet()
        >>> c = af.robustness_curve(model, [data.tensors()], lambda e: af.L2PGD(e, steps=3), [0.1, 0.5], progress=False)
        >>> c.eps, c.accuracy[0] >= c.accuracy[1]
        ((0.1, 0.5), True)
    """
    budgets = [float(e) for e in eps]
    if not budgets or any(not (e > 0 and math.isfinite(e)) for e in budgets) or any(
            b <= a for a, b in zip(budgets, budgets[1:], strict=False)):
        raise ValueError(f"eps must be budgets > 0 in strictly ascending order, got {list(eps)}")
    keys = check_keys(keys)
    model = classifier(model)
    dev = device_of(model, device)
    named = _named({str(j): attack(e) for j, e in enumerate(budgets)})  # one name per budget, however they print
    runs = [a.for_evaluation(True) for a in named.values()]
    sampler = _sampler(loader, distributed)
    tally = Tally(["clean", *named], keep=sampler is not None)
    with frozen_model(model) as m, progress_bar(loader, desc="robustness curve", enabled=progress) as bar:
        for _, x, y, logits in checked_batches(bar, m, keys, runs[0].box, dev):
            correct = logits.argmax(1) == y
            tally.update("clean", correct)
            keep = correct.nonzero().squeeze(1)
            xs, ys = x.index_select(0, keep), y.index_select(0, keep)
            for name, run in zip(named, runs, strict=True):
                ok = torch.zeros_like(ys, dtype=torch.bool)
                if ys.shape[0] > 0:
                    with torch.no_grad():
                        ok = m(run(m, xs, ys, generator=generator)).argmax(1) == ys
                tally.update(name, torch.zeros_like(correct).index_put((keep,), ok))
                keep, xs, ys = keep[ok], xs[ok], ys[ok]
    if sampler is None and tally.total == 0:
        raise ValueError("loader yielded no samples: there is no curve to draw")
    result = tally.compute(indices=None if sampler is None else list(iter(sampler)))
    total = result.total
    counts = [result.robust_correct[name] for name in named]
    return RobustnessCurve(tuple(budgets), tuple(c / total for c in counts), tuple(wilson(c, total) for c in counts),
                           result.clean_correct / total, total, name)
