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

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ._checks import check_batch, check_logits
from ._dist import all_gather_object, rank_world
from .adapters import batch_xy, check_keys, classifier
from .attacks import Attack
from .guard import check_input, device_of, frozen_model
from .progress import progress_bar
from .stats import mcnemar, wilson

__all__ = ["evaluate", "EvalResult", "Comparison", "compare", "robustness_curve", "RobustnessCurve",
           "shifted_accuracy"]


@dataclass
class EvalResult:
    """Counts from ``evaluate``; accuracies are fractions in [0, 1].

    With ``per_sample=True`` (and always under ``torch.distributed``), ``samples`` holds each sample's
    correctness (bool tensors in loader order, or by dataset index across ranks): ``"clean"``, each attack's name
    and ``"worst"``; ``indices`` the dataset index of each sample when known (across ranks). ``interval`` gives a
    confidence interval for any accuracy; ``compare`` pairs two results on the same samples (McNemar);
    ``merge`` adds results of several loaders or runs; ``to_json`` / ``from_json`` round-trip all of it.
    """

    total: int = 0
    clean_correct: int = 0
    robust_correct: dict[str, int] = field(default_factory=dict)
    worst_correct: int | None = None
    samples: dict[str, Tensor] | None = None
    indices: Tensor | None = None

    @property
    def clean_accuracy(self) -> float:
        return self.clean_correct / self.total if self.total else float("nan")

    def robust_accuracy(self, name: str) -> float:
        """Accuracy under the attack named ``name``."""
        return self.robust_correct[name] / self.total if self.total else float("nan")

    @property
    def worst_accuracy(self) -> float | None:
        """Accuracy under the worst case over all attacks (correct only if no attack broke the sample)."""
        if self.worst_correct is None:
            return None
        return self.worst_correct / self.total if self.total else float("nan")

    def correct(self, name: str = "clean") -> int:
        """How many samples are correct: ``"clean"``, ``"worst"`` or an attack's name."""
        if name == "clean":
            return self.clean_correct
        if name == "worst":
            if self.worst_correct is None:
                raise KeyError("worst: this result has no attacks")
            return self.worst_correct
        if name not in self.robust_correct:
            raise KeyError(f"{name!r}: not 'clean', 'worst' or an attack of this result ({list(self.robust_correct)})")
        return self.robust_correct[name]

    def interval(self, name: str = "clean", level: float = 0.95) -> tuple[float, float]:
        """Wilson's confidence interval for the accuracy ``name`` (``"clean"``, ``"worst"`` or an attack's)."""
        return wilson(self.correct(name), self.total, level)

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "clean_correct": self.clean_correct,
            "clean_accuracy": self.clean_accuracy,
            "robust_correct": dict(self.robust_correct),
            "robust_accuracy": {k: self.robust_accuracy(k) for k in self.robust_correct},
            "worst_correct": self.worst_correct,
            "worst_accuracy": self.worst_accuracy,
        }

    def __str__(self) -> str:
        def line(label: str, name: str) -> str:
            lo, hi = self.interval(name)
            return (f"{label}: {self.correct(name) / max(self.total, 1):.2%} ({self.correct(name)}/{self.total}; "
                    f"95% CI {lo:.1%}-{hi:.1%})")

        lines = [line("clean", "clean")] + [line(k, k) for k in self.robust_correct]
        if self.worst_correct is not None and len(self.robust_correct) > 1:
            lines.append(line("worst case", "worst"))
        return "\n".join(lines)

    def to_json(self) -> str:
        """The counts, accuracies, 95% intervals and (when kept) per-sample results and indices as JSON."""
        record = self.as_dict()
        names = ["clean", *self.robust_correct] + (["worst"] if self.worst_correct is not None else [])
        record["interval_95"] = {k: list(self.interval(k)) for k in names}
        if self.samples is not None:
            record["samples"] = {k: "".join("1" if b else "0" for b in v.tolist()) for k, v in self.samples.items()}
        if self.indices is not None:
            record["indices"] = self.indices.tolist()
        return json.dumps(record, indent=2)

    @classmethod
    def from_json(cls, text: str) -> EvalResult:
        """The result ``to_json`` wrote."""
        r = json.loads(text)
        samples = r.get("samples")
        return cls(total=int(r["total"]), clean_correct=int(r["clean_correct"]),
                   robust_correct={k: int(v) for k, v in r["robust_correct"].items()},
                   worst_correct=None if r["worst_correct"] is None else int(r["worst_correct"]),
                   samples=None if samples is None else {k: torch.tensor([c == "1" for c in v], dtype=torch.bool)
                                                         for k, v in samples.items()},
                   indices=None if r.get("indices") is None else torch.tensor(r["indices"], dtype=torch.long))

    @classmethod
    def from_samples(cls, samples: Mapping[str, Tensor], indices: Tensor | None = None) -> EvalResult:
        """The result whose per-sample correctness is ``samples`` (``"clean"``, attacks, optionally ``"worst"``)."""
        flags = {k: v.detach().to("cpu", torch.bool) for k, v in samples.items()}
        attacks = [k for k in flags if k not in ("clean", "worst")]
        if attacks and "worst" not in flags:
            flags["worst"] = torch.stack([flags[k] for k in attacks]).all(0) & flags["clean"]
        return cls(total=int(flags["clean"].numel()), clean_correct=int(flags["clean"].sum()),
                   robust_correct={k: int(flags[k].sum()) for k in attacks},
                   worst_correct=int(flags["worst"].sum()) if attacks else None, samples=flags, indices=indices)

    @staticmethod
    def merge(*results: EvalResult) -> EvalResult:
        """One result of several (loaders, runs, shards): counts added; per-sample results concatenated when every
        part has them (indices only when every part has them and none repeats). Attacks must be the same."""
        if not results:
            raise ValueError("merge needs at least one EvalResult")
        names = list(results[0].robust_correct)
        if any(list(r.robust_correct) != names for r in results):
            raise ValueError(f"merge: every result must have the same attacks, got "
                             f"{[list(r.robust_correct) for r in results]}")
        merged = EvalResult(total=sum(r.total for r in results), clean_correct=sum(r.clean_correct for r in results),
                            robust_correct={k: sum(r.robust_correct[k] for r in results) for k in names},
                            worst_correct=None if results[0].worst_correct is None else
                            sum(r.worst_correct or 0 for r in results))
        if all(r.samples is not None for r in results):
            merged.samples = {k: torch.cat([r.samples[k] for r in results if r.samples is not None])
                              for k in results[0].samples or {}}
            if all(r.indices is not None for r in results):
                idx = torch.cat([r.indices for r in results if r.indices is not None])
                merged.indices = idx if len(set(idx.tolist())) == idx.numel() else None
        return merged


@dataclass(frozen=True)
class Comparison:
    """Two results on the same samples: how many only ``a`` gets right, how many only ``b``, and McNemar's exact
    two-sided p-value for "they are equally accurate"."""

    name: str
    a_accuracy: float
    b_accuracy: float
    only_a: int
    only_b: int
    p_value: float


def compare(a: EvalResult, b: EvalResult, name: str = "worst") -> Comparison:
    """Compare two models' results on the same samples (``evaluate(..., per_sample=True)`` on the same loader):
    the claim "A is more robust than B" as a paired test on accuracy ``name`` (``"clean"``, ``"worst"`` or an
    attack's name)."""
    if a.samples is None or b.samples is None:
        raise ValueError("compare needs per-sample results: evaluate(..., per_sample=True) for both")
    if name not in a.samples or name not in b.samples:
        raise KeyError(f"{name!r}: not among the per-sample results ({list(a.samples)}, {list(b.samples)})")
    if a.total != b.total or (a.indices is not None and b.indices is not None and not torch.equal(a.indices,
                                                                                                   b.indices)):
        raise ValueError("compare: the two results must be on the same samples, in the same order")
    x, y = a.samples[name], b.samples[name]
    only_a, only_b = int((x & ~y).sum()), int((~x & y).sum())
    return Comparison(name, a.correct(name) / a.total, b.correct(name) / b.total, only_a, only_b,
                      mcnemar(only_a, only_b))


def _named(attacks: Attack | Sequence[Attack] | Mapping[str, Attack] | None) -> dict[str, Attack]:
    if attacks is None:
        return {}
    if isinstance(attacks, Attack):
        attacks = [attacks]
    if isinstance(attacks, (str, bytes)) or not isinstance(attacks, (Mapping, Sequence)):
        raise TypeError(f"attacks must be an advfeat Attack, a list of them or a dict name -> Attack; got "
                        f"{attacks!r}")
    named = dict(attacks) if isinstance(attacks, Mapping) else {repr(a): a for a in attacks}
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
    hits = total = 0
    with torch.no_grad(), frozen_model(model):
        for batch in batches:
            x, y = batch_xy(batch)
            logits = classifier(model)(x.to(dev))
            hits += int((logits.argmax(1).cpu() == (y.cpu() + shift) % logits.shape[1]).sum())
            total += len(y)
    return hits / max(1, total)


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
    sampler = getattr(loader, "sampler", None)
    world = rank_world()[1]
    if distributed is None:
        distributed = isinstance(sampler, DistributedSampler) and world > 1
    if distributed and not isinstance(sampler, DistributedSampler):
        raise ValueError("distributed=True needs a DataLoader with a DistributedSampler (its indices tell which "
                         "samples each rank holds, so that each is counted once)")
    flags: dict[str, list[Tensor]] = {k: [] for k in ("clean", *runs)}
    keep_flags = per_sample or bool(distributed)
    total = torch.zeros((), dtype=torch.long, device=dev)
    clean = torch.zeros((), dtype=torch.long, device=dev)
    robust = {k: torch.zeros((), dtype=torch.long, device=dev) for k in runs}
    worst = torch.zeros((), dtype=torch.long, device=dev)
    lower, upper = next(iter(runs.values())).box if runs else (0.0, 1.0)
    with frozen_model(model) as m, progress_bar(loader, desc="evaluate", enabled=progress) as bar:
        for batch_no, x, y in _checked(bar, m, keys, (lower, upper), dev):
            with torch.no_grad():
                logits = m(x)
            check_logits(logits, y)
            if not bool(torch.isfinite(logits).all()):
                raise FloatingPointError(f"model ({type(model.model).__name__}) returned non-finite logits (NaN or "
                                         f"inf) on loader batch {batch_no}: no accuracy is reported for it")
            correct = logits.argmax(1) == y
            total += y.shape[0]
            clean += correct.sum()
            keep = correct.nonzero().squeeze(1)
            xs, ys = x.index_select(0, keep), y.index_select(0, keep)
            still: Tensor = torch.ones_like(ys, dtype=torch.bool)
            if keep_flags:
                flags["clean"].append(correct)
            for k, attack in runs.items():
                ok = torch.zeros_like(ys, dtype=torch.bool)
                if ys.shape[0] > 0:  # (known: nonzero synced); some models refuse empty batches
                    try:
                        x_adv = attack.select(keep)(m, xs, ys, generator=generator)  # a per-sample eps follows
                    except FloatingPointError as e:
                        raise FloatingPointError(f"loader batch {batch_no}, attack {k!r}: {e}") from None
                    with torch.no_grad():
                        ok = m(x_adv).argmax(1) == ys
                    robust[k] += ok.sum()
                    still &= ok
                if keep_flags:
                    flags[k].append(torch.zeros_like(correct).index_put((keep,), ok))
            worst += still.sum()
            if progress:
                bar.set_postfix(clean=f"{clean.item() / max(total.item(), 1):.3f}", refresh=False)
    if distributed:
        assert isinstance(sampler, DistributedSampler)
        return _gathered(flags, list(iter(sampler)), int(total), bool(runs))
    if int(total) == 0:
        raise ValueError("loader yielded no samples: there is no accuracy to report")
    if keep_flags:
        return EvalResult.from_samples({k: torch.cat(v) for k, v in flags.items()} if runs else
                                       {"clean": torch.cat(flags["clean"])})
    return EvalResult(
        total=int(total), clean_correct=int(clean),
        robust_correct={k: int(v) for k, v in robust.items()},
        worst_correct=int(worst) if runs else None,
    )


def _checked(batches: Iterable[Any], model: nn.Module, keys: tuple[str, str] | None,
             box: tuple[float | Tensor, float | Tensor], dev: torch.device) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(batch number, x, y)`` of every batch: read from any batch form, checked (box, labels, the model's device
    and dtype) and moved to ``dev``; an error names the batch."""
    for batch_no, batch in enumerate(batches):
        x, y = batch_xy(batch, keys, f"loader, batch {batch_no}")
        x, y = check_batch(x, y, *box)
        x, y = x.to(dev), y.to(dev)
        check_input(model, x, f"loader, batch {batch_no}: x")
        yield batch_no, x, y


def _gathered(flags: dict[str, list[Tensor]], indices: list[int], total: int, attacked: bool) -> EvalResult:
    """The global result of every rank's per-sample flags: gathered, each dataset index counted once (the first
    rank that holds it), in index order."""
    if len(indices) < total:
        raise ValueError(f"the loader yielded {total} samples but its DistributedSampler holds {len(indices)}")
    local = {k: (torch.cat(v).cpu() if v else torch.zeros(0, dtype=torch.bool)) for k, v in flags.items()}
    parts = cast(list[tuple[list[int], dict[str, Tensor]]], all_gather_object((indices[:total], local)))
    seen: dict[int, tuple[int, int]] = {}
    for r, (idx, _) in enumerate(parts):
        for j, i in enumerate(idx):
            seen.setdefault(int(i), (r, j))
    order = sorted(seen)
    if not order:
        raise ValueError("loader yielded no samples on any rank: there is no accuracy to report")
    merged = {k: torch.tensor([bool(parts[seen[i][0]][1][k][seen[i][1]]) for i in order], dtype=torch.bool)
              for k in flags}
    result = EvalResult.from_samples(merged if attacked else {"clean": merged["clean"]},
                                     torch.tensor(order, dtype=torch.long))
    return result


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
) -> RobustnessCurve:
    """Accuracy under ``attack(e)`` for every budget ``e`` in ``eps``, in one pass over ``loader``. A sample broken
    at a smaller budget is broken at every larger one (its perturbation is inside the larger ball), so each budget
    attacks only the samples every smaller budget left standing.

    Examples:
        >>> import torch, advfeat as af
        >>> data = af.data.planted(64, 64, seed=0).test
        >>> model = af.models.PlantedNet()
        >>> c = af.robustness_curve(model, [data.tensors()], lambda e: af.L2PGD(e, steps=3), [0.1, 0.5], progress=False)
        >>> c.eps, c.accuracy[0] >= c.accuracy[1]
        ((0.1, 0.5), True)
    """
    budgets = [float(e) for e in eps]
    if not budgets or any(not e > 0 for e in budgets) or budgets != sorted(budgets):
        raise ValueError(f"eps must be budgets > 0 in ascending order, got {list(eps)}")
    keys = check_keys(keys)
    model = classifier(model)
    dev = device_of(model, device)
    attacks = [attack(e) for e in budgets]
    named = _named({f"{e:g}": a for e, a in zip(budgets, attacks, strict=True)})
    runs = [a.for_evaluation(True) for a in named.values()]
    lower, upper = runs[0].box
    total, clean = 0, torch.zeros((), dtype=torch.long, device=dev)
    standing = torch.zeros(len(runs), dtype=torch.long, device=dev)
    with frozen_model(model) as m, progress_bar(loader, desc="robustness curve", enabled=progress) as bar:
        for _, x, y in _checked(bar, m, keys, (lower, upper), dev):
            with torch.no_grad():
                correct = m(x).argmax(1) == y
            total += y.shape[0]
            clean += correct.sum()
            keep = correct.nonzero().squeeze(1)
            xs, ys = x.index_select(0, keep), y.index_select(0, keep)
            for j, run in enumerate(runs):
                if ys.shape[0] == 0:
                    break
                with torch.no_grad():
                    ok = m(run(m, xs, ys, generator=generator)).argmax(1) == ys
                standing[j] += ok.sum()
                left = ok.nonzero().squeeze(1)
                xs, ys = xs.index_select(0, left), ys.index_select(0, left)
    if total == 0:
        raise ValueError("loader yielded no samples: there is no curve to draw")
    counts = standing.tolist()
    return RobustnessCurve(tuple(budgets), tuple(c / total for c in counts), tuple(wilson(c, total) for c in counts),
                           int(clean) / total, total, name)
