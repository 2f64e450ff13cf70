"""What an evaluation measured: ``EvalResult`` (counts, per-sample results, intervals, passes, JSON, the best
known over several results), and ``compare`` (two models on the same samples, McNemar's exact test).

``advfeat.evaluate`` computes them; ``advfeat.tally`` accumulates them; both import this module.

Examples:
    >>> import torch
    >>> from advfeat.result import EvalResult
    >>> r = EvalResult.from_samples({"clean": torch.tensor([1, 1, 0]).bool(), "pgd": torch.tensor([1, 0, 0]).bool()})
    >>> r.total, r.robust_accuracy("pgd"), EvalResult.from_json(r.to_json()).samples["pgd"].tolist()
    (3, 0.3333333333333333, [True, False, False])
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .cost import Passes
from .stats import mcnemar, wilson

__all__ = ["EvalResult", "Comparison", "compare"]


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
    passes: dict[str, Passes] = field(default_factory=dict)

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

    def passes_per_image(self, name: str, part: str | None = None) -> float:
        """The model's forward and backward passes per evaluated image that the attack ``name`` made (``part``: one
        part of a cascade, e.g. ``"apgd-t"`` of ``AutoAttack``): the cost that carries from one machine to
        another."""
        if name not in self.passes:
            raise KeyError(f"{name!r}: no passes counted for it (attacks: {list(self.passes)})")
        p = self.passes[name]
        if part is not None:
            if part not in p.parts:
                raise KeyError(f"{part!r}: not a part of {name!r} ({list(p.parts)})")
            p = p.parts[part]
        return p.total / self.total if self.total else float("nan")

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

        def cost(name: str) -> str:
            if name not in self.passes or not self.total:
                return ""
            parts = self.passes[name].parts
            inside = "; " + ", ".join(f"{k} {self.passes_per_image(name, k):.1f}" for k in parts) if parts else ""
            return f" [{self.passes_per_image(name):.1f} passes per image{inside}]"

        lines = [line("clean", "clean")] + [line(k, k) + cost(k) for k in self.robust_correct]
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
        if self.passes:
            record["passes"] = {k: p.as_dict() for k, p in self.passes.items()}
            record["passes_per_image"] = {k: self.passes_per_image(k) for k in self.passes}
        return json.dumps(_strict(record), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> EvalResult:
        """The result ``to_json`` wrote, every field checked against the others (counts against the per-sample
        results, their lengths against ``total``, indices unique); a contradiction is refused naming the field."""
        return _from_json(text)

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
    def best_known(*results: EvalResult | Tensor) -> EvalResult:
        """The per-sample worst case over several evaluations of one model on the same samples, as RobustBench ranks
        defences: a sample counts as robust only if no attack of any result broke it. ``results``: ``EvalResult``s
        with per-sample results (``evaluate(..., per_sample=True)``: attacks, runs, seeds), or bool tensors (N,) of
        per-sample correctness under an adversarial set you made yourself. Results that all know their samples'
        indices must agree on them; tensors and results without indices are taken by position. The result keeps
        every attack (named ``"<k>:<name>"``, k the result's position, when names repeat); its ``worst`` is the
        best-known accuracy, and ``compare`` and ``interval`` work on it.

        Examples:
            >>> import torch, advfeat as af
            >>> a = af.EvalResult.from_samples({"clean": torch.tensor([1, 1, 1, 0]).bool(),
            ...                                 "pgd": torch.tensor([1, 0, 1, 0]).bool()})
            >>> b = af.EvalResult.from_samples({"clean": torch.tensor([1, 1, 1, 0]).bool(),
            ...                                 "square": torch.tensor([1, 1, 0, 0]).bool()})
            >>> best = af.EvalResult.best_known(a, b, torch.tensor([0, 1, 1, 1]).bool())
            >>> best.worst_accuracy, best.robust_accuracy("pgd")
            (0.0, 0.5)
        """
        return _best_known(results)

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
        for r in results:
            for k, p in r.passes.items():
                merged.passes.setdefault(k, Passes()).add(p)
        if all(r.samples is not None for r in results):
            merged.samples = {k: torch.cat([r.samples[k] for r in results if r.samples is not None])
                              for k in results[0].samples or {}}
            if all(r.indices is not None for r in results):
                idx = torch.cat([r.indices for r in results if r.indices is not None])
                merged.indices = idx if len(set(idx.tolist())) == idx.numel() else None
        return merged


def _strict(v: Any) -> Any:
    """``v`` with every non-finite float (an undefined accuracy) as None: strict JSON."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _strict(w) for k, w in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict(w) for w in v]
    return v


def _count(record: dict[str, Any], key: str, at_most: int | None, field_name: str | None = None) -> int:
    """A count of the JSON record: a whole number in [0, ``at_most``]."""
    v = record.get(key)
    name = field_name or key
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (at_most is not None and v > at_most):
        bound = "" if at_most is None else f" and at most {at_most}"
        raise ValueError(f"EvalResult JSON: {name}{'' if field_name is None else f'[{key!r}]'} must be a whole "
                         f"number >= 0{bound}, got {v!r}")
    return v


def _flags(samples: Any, total: int, names: list[str]) -> dict[str, Tensor]:
    """The per-sample results of the JSON record: one string of 0 / 1 of length ``total`` per name."""
    if not isinstance(samples, dict) or not set(samples) <= set(names) or "clean" not in samples:
        raise ValueError(f"EvalResult JSON: samples must be an object with 'clean' and names among {names}")
    out = {}
    for k, v in samples.items():
        if not isinstance(v, str) or len(v) != total or set(v) - {"0", "1"}:
            raise ValueError(f"EvalResult JSON: samples[{k!r}] must be a string of {total} characters 0 or 1")
        out[k] = torch.tensor([c == "1" for c in v], dtype=torch.bool)
    return out


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


def compare(a: EvalResult, b: EvalResult, name: str = "worst", *, paired: bool = False) -> Comparison:
    """Compare two models' results on the same samples (``evaluate(..., per_sample=True)`` on the same loader):
    the claim "A is more robust than B" as a paired test on accuracy ``name`` (``"clean"``, ``"worst"`` or an
    attack's name).

    The samples are paired by their dataset indices when both results know them (``indices``: evaluate records
    them across ``torch.distributed`` ranks; set them for your own loaders). Results without indices are paired by
    position only when you say they are on the same samples in the same order (``paired=True``): otherwise two
    different or shuffled sample sets of one size would be compared silently."""
    if a.samples is None or b.samples is None:
        raise ValueError("compare needs per-sample results: evaluate(..., per_sample=True) for both")
    if name not in a.samples or name not in b.samples:
        raise KeyError(f"{name!r}: not among the per-sample results ({list(a.samples)}, {list(b.samples)})")
    if a.indices is None or b.indices is None:
        if not paired:
            raise ValueError("compare: neither result knows its samples' indices (set result.indices), so nothing "
                             "says they are the same samples in the same order; pass paired=True if they are (the "
                             "same loader, unshuffled)")
    elif a.indices.shape != b.indices.shape or not torch.equal(a.indices, b.indices):
        raise ValueError("compare: the two results must be on the same samples, in the same order (their indices "
                         "differ)")
    if a.total != b.total:
        raise ValueError(f"compare: the two results must be on the same samples ({a.total} and {b.total} samples)")
    x, y = a.samples[name], b.samples[name]
    only_a, only_b = int((x & ~y).sum()), int((~x & y).sum())
    return Comparison(name, a.correct(name) / a.total, b.correct(name) / b.total, only_a, only_b,
                      mcnemar(only_a, only_b))


def _from_json(text: str) -> EvalResult:
    """``EvalResult.from_json``."""
    try:
        r = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"EvalResult JSON: not JSON ({e})") from None
    if not isinstance(r, dict):
        raise ValueError(f"EvalResult JSON: not an object, got {type(r).__name__}")
    total = _count(r, "total", None)
    clean = _count(r, "clean_correct", total)
    robust = r.get("robust_correct")
    if not isinstance(robust, dict):
        raise ValueError(f"EvalResult JSON: robust_correct must be an object name -> count, got {robust!r}")
    robust = {str(k): _count(robust, k, clean, "robust_correct") for k in robust}
    worst = None if r.get("worst_correct") is None else _count(r, "worst_correct", min([clean, *robust.values()]))
    if (worst is None) != (not robust):
        raise ValueError("EvalResult JSON: worst_correct must be given exactly when there are attacks")
    samples = r.get("samples")
    flags = None if samples is None else _flags(samples, total, ["clean", *robust, *(["worst"] * bool(robust))])
    if flags is not None:
        for name, count in [("clean", clean), *robust.items(), *([("worst", worst)] if robust else [])]:
            if name in flags and int(flags[name].sum()) != count:
                field = {"clean": "clean_correct", "worst": "worst_correct"}.get(name, "robust_correct")
                raise ValueError(f"EvalResult JSON: {field} ({count} for {name!r}) disagrees with samples "
                                 f"({int(flags[name].sum())} correct)")
    indices = r.get("indices")
    if indices is not None:
        if (not isinstance(indices, list) or len(indices) != total
                or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices)
                or len(set(indices)) != len(indices)):
            raise ValueError(f"EvalResult JSON: indices must be {total} distinct whole numbers >= 0 (one per "
                             "sample)")
    passes = r.get("passes", {})
    if not isinstance(passes, dict) or not set(passes) <= set(robust):
        raise ValueError(f"EvalResult JSON: passes must be an object keyed by attacks among {list(robust)}")
    return EvalResult(total=total, clean_correct=clean, robust_correct=robust, worst_correct=worst, samples=flags,
               indices=None if indices is None else torch.tensor(indices, dtype=torch.long),
               passes={k: Passes.from_dict(v, f"EvalResult JSON: passes[{k!r}]") for k, v in passes.items()})


def _best_known(results: tuple[EvalResult | Tensor, ...]) -> EvalResult:
    """``EvalResult.best_known``."""
    if not results:
        raise ValueError("best_known needs at least one result")
    parts: list[tuple[dict[str, Tensor], Tensor | None]] = []
    for k, r in enumerate(results):
        if isinstance(r, Tensor):
            if r.dtype != torch.bool or r.ndim != 1:
                raise TypeError(f"results[{k}]: a tensor must be per-sample correctness, bool of shape (N,); got "
                                f"{r.dtype} of shape {tuple(r.shape)}")
            parts.append(({f"set {k}": r.detach().cpu()}, None))
        elif isinstance(r, EvalResult):
            if r.samples is None:
                raise ValueError(f"results[{k}] has no per-sample results: evaluate(..., per_sample=True)")
            parts.append(({n: v for n, v in r.samples.items() if n != "worst"}, r.indices))
        else:
            raise TypeError(f"results[{k}] must be an EvalResult or a bool tensor, got {type(r).__name__}")
    n = next(iter(parts[0][0].values())).numel()
    if any(v.numel() != n for flags, _ in parts for v in flags.values()):
        raise ValueError(f"best_known: every result must hold the same {n} samples, got "
                         f"{sorted({v.numel() for flags, _ in parts for v in flags.values()})}")
    known = [idx for flags, idx in parts if "clean" in flags]
    if not known:
        raise ValueError("best_known needs at least one EvalResult (for the clean accuracy)")
    order = known[0]

    def same(idx: Tensor | None) -> bool:
        if idx is None or order is None:
            return idx is None and order is None
        return idx.shape == order.shape and torch.equal(idx, order)

    if not all(same(idx) for idx in known):
        raise ValueError("best_known: the results must hold the same samples in the same order (their indices "
                         "differ, or only some of them know their indices)")
    names = [name for flags, _ in parts for name in flags if name != "clean"]
    repeated = len(set(names)) < len(names)
    clean: Tensor | None = None
    merged: dict[str, Tensor] = {}
    for k, (flags, _) in enumerate(parts):
        for name, v in flags.items():
            if name == "clean":
                clean = v if clean is None else clean & v
            else:
                merged[f"{k}:{name}" if repeated else name] = v
    assert clean is not None
    best = EvalResult.from_samples({"clean": clean, **{k: v & clean for k, v in merged.items()}}, order)
    for k, r in enumerate(results):
        if isinstance(r, EvalResult):
            for name, p in r.passes.items():
                best.passes.setdefault(f"{k}:{name}" if repeated else name, Passes()).add(p)
    return best
