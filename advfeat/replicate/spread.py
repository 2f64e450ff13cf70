"""The measured spread of a replication: a trained model's number is one draw.

The same settings give other numbers at another seed, another thread count or on another CPU (floating-point
sums in another order). ``benchmarks/spread.py`` runs the planted quick replication over seeds and thread counts
and records every number each run measured (``quantities``); the record ships with the package
(``spread_planted_quick.json``), and :func:`published` finds it for a run of the same settings. A run's report
places each of its cells in that range (:meth:`Spread.place`) and says plainly which fall outside.

    >>> spread = Spread.load(SPREAD_FILE)
    >>> r = spread.range("standard/clean")
    >>> r.lo <= r.median <= r.hi and len(spread.runs) >= 2
    True
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SPREAD_FILE", "Range", "Spread", "quantities", "published", "headline_table", "spread_table", "MAP_CELLS",
           "MAP_MEASURES"]

SPREAD_FILE = Path(__file__).with_name("spread_planted_quick.json")
"""The published spread of ``advfeat replicate`` on planted data at the quick scale (``benchmarks/spread.py``)."""

MAP_CELLS: tuple[dict[str, Any], ...] = (
    {"mode": "rand", "eps": 0.3, "n": 4000, "learner": "mlp"},
    {"mode": "det", "eps": 0.5, "n": 2000, "learner": "mlp"},
)
"""The generalisation-map cells the suite and the spread measure on a planted run (``--measure split poison
transfer``): D_rand at a budget that reaches about half its targets (4,000 images: at 2,000 the reached part's
lesson was too weak to assert on every draw; docs/results.md), D_det at the run's budget."""
MAP_MEASURES = ("split", "poison", "transfer")

_SKIP = {"seconds", "train_seconds", "n_test", "n", "eps", "queries", "steps", "cascade", "interval_95", "same_as",
         "source", "features", "curve", "split_seconds", "poison_seconds", "transfer_seconds", "transfer_n",
         "passes", "learner_epochs", "seed", "source_epochs", "split_size", "passes_per_image"}
"""What is not a measured quantity: times, counts, budgets, intervals and names."""


def _leaves(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int | float):
        yield prefix, float(value)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            if k not in _SKIP:
                name = f"{prefix}/{k}"
                yield from _leaves(name[:-len("/accuracy")] if name.endswith("/accuracy") else name, v)


def quantities(results: Mapping[str, Any], cells: Sequence[Mapping[str, Any]] = ()) -> dict[str, float]:
    """Every number a run measured, by a flat name: ``ROW/clean``, ``ROW/robust/EPS``, ``ROW/construction/NAME``,
    ``ROW/gradient_free/ATTACK`` (its accuracy), ``ROW/transfer_rate``, ``d_det/predicts_y_plus_1``,
    ``ROW/curve_peak`` (a learner's best epoch) for the rows of ``results`` (what ``results.json`` holds), and
    ``map/MODE_epsEPS/NAME`` for generalisation-map ``cells`` (what ``map.json``'s ``cells`` hold).

    >>> quantities({"rows": {"d_det": {"clean": 0.3, "robust": {"0.5": 0.0}, "curve": [0.2, 0.4, 0.3],
    ...                                 "seconds": 5.0}}})
    {'d_det/clean': 0.3, 'd_det/robust/0.5': 0.0, 'd_det/curve_peak': 0.4}
    """
    out: dict[str, float] = {}
    for key, row in results["rows"].items():
        out.update(_leaves(key, row))
        if row.get("curve"):
            out[f"{key}/curve_peak"] = float(max(row["curve"]))
    for c in cells:
        out.update(_leaves(f"map/{c['mode']}_eps{c['eps']:g}", {k: v for k, v in c.items()
                                                                 if k not in ("mode", "learner", "rule")}))
    return out


@dataclass(frozen=True)
class Range:
    """A quantity's smallest, median and largest value over the runs of a spread."""

    lo: float
    median: float
    hi: float
    n: int

    def place(self, value: float) -> str:
        """``"inside"``, ``"below"`` or ``"above"`` the range."""
        return "below" if value < self.lo else "above" if value > self.hi else "inside"


@dataclass(frozen=True)
class Spread:
    """Runs of one replication's settings over seeds and thread counts, each with every number it measured.

    ``settings``: the settings record (``settings.json``'s ``settings``) all runs share; ``runs``: one mapping per
    run with its ``seed``, ``threads``, ``seconds`` and ``quantities``; ``machine``, ``commit`` and ``command``:
    where and how the runs were made."""

    settings: Mapping[str, Any]
    runs: Sequence[Mapping[str, Any]]
    machine: str = ""
    commit: str = ""
    command: str = ""

    @classmethod
    def load(cls, path: str | Path) -> Spread:
        """Read a spread written by ``benchmarks/spread.py`` (plain JSON: nothing is executed)."""
        record = json.loads(Path(path).read_text())
        if not isinstance(record, dict) or not {"settings", "runs"} <= set(record):
            raise ValueError(f"{path} is not a spread record (a JSON object with 'settings' and 'runs')")
        return cls(record["settings"], record["runs"], record.get("machine", ""), record.get("commit", ""),
                   record.get("command", ""))

    def to_json(self) -> str:
        return json.dumps({"settings": self.settings, "machine": self.machine, "commit": self.commit,
                           "command": self.command, "runs": list(self.runs)}, indent=1) + "\n"

    def values(self, name: str, threads: int | None = None) -> list[float]:
        """``name``'s value in every run that measured it (those at ``threads`` only, when given)."""
        return [float(r["quantities"][name]) for r in self.runs
                if name in r["quantities"] and (threads is None or r["threads"] == threads)]

    def range(self, name: str, threads: int | None = None) -> Range:
        """``name``'s range over the runs (at ``threads``, when given)."""
        v = self.values(name, threads)
        if not v:
            raise KeyError(f"no run of this spread measured {name!r}")
        return Range(min(v), statistics.median(v), max(v), len(v))

    @property
    def names(self) -> list[str]:
        """Every quantity some run measured, in the first run's order."""
        seen: dict[str, None] = {}
        for r in self.runs:
            seen.update(dict.fromkeys(r["quantities"]))
        return list(seen)

    def describe(self) -> str:
        """One line: how many runs, which seeds and thread counts."""
        seeds = sorted({int(r["seed"]) for r in self.runs})
        threads = sorted({int(r["threads"]) for r in self.runs})
        return (f"{len(self.runs)} runs: seeds {_spans(seeds)} at {' and '.join(map(str, threads))} "
                f"thread{'s' * (threads != [1])}")

    def place(self, name: str, value: float) -> str:
        """A sentence that sets ``value`` beside ``name``'s range: ``"40.1%, inside the range [17.0, 45.2] of 20
        runs (median 30.2)"``."""
        r = self.range(name)
        return (f"{100 * value:.1f}%, {r.place(value)} the range [{100 * r.lo:.1f}, {100 * r.hi:.1f}] of {r.n} "
                f"runs (median {100 * r.median:.1f})")


def _spans(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts = []
    for _, run in itertools.groupby(enumerate(values), key=lambda p: p[1] - p[0]):
        v = [x for _, x in run]
        parts.append(str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}")
    return ", ".join(parts)


def published(results: Mapping[str, Any]) -> Spread | None:
    """The spread published with the package for a run of ``results``'s settings (any seed), or None."""
    if not SPREAD_FILE.exists():
        return None
    spread = Spread.load(SPREAD_FILE)
    return spread if dict(spread.settings) == dict(results["settings"]) else None


def _cell(r: Range) -> str:
    return f"{100 * r.median:.1f} [{100 * r.lo:.1f}, {100 * r.hi:.1f}]"


def headline_table(spread: Spread, eps: str | None = None) -> str:
    """The replication's headline table (``advfeat.report.headline_table``) over a spread: each cell the median
    and, in brackets, the smallest and largest value of its runs (%)."""
    from ..report import HEADLINE, PAPER

    eps = eps or f"{spread.settings['eps']:g}"
    n = spread.settings["n_construct"]
    lines = [f"| experiment | clean | L2 eps {eps} | paper (CIFAR-10, eps 0.25) |", "|---|---|---|---|"]
    labels = {**HEADLINE, "control": f"control: standard training on {n:,} real images (D_R's size and recipe)"}
    for key, label in labels.items():
        p = PAPER[key]
        robust = "" if key in ("d_rand", "d_det") else _cell(spread.range(f"{key}/robust/{eps}"))
        paper = "" if p[0] is None else (f"{p[0]}" if key in ("d_rand", "d_det") else f"{p[0]} / {p[1]}")
        lines.append(f"| {label} | {_cell(spread.range(f'{key}/clean'))} | {robust} | {paper} |")
    return "\n".join(lines) + "\n"


def spread_table(spread: Spread) -> str:
    """Every quantity of a spread: min / median / max (%) over all its runs and at each thread count."""
    threads = sorted({int(r["threads"]) for r in spread.runs})
    head = ["quantity", "all runs", *(f"{t} thread{'s' * (t != 1)}" for t in threads)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in spread.names:
        cells = [spread.range(name, t) if spread.values(name, t) else None for t in threads]
        lines.append(f"| {name} | {_cell(spread.range(name))} | "
                     + " | ".join("-" if c is None else _cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def placement(summary: Mapping[str, Any], spread: Spread) -> str:
    """``report.md``'s section for a run of the spread's settings: each cell of the results table beside the
    published range, and, plainly, every quantity of the run that falls outside its range."""
    from ..report import ROWS

    eps = [f"{e:g}" for e in summary["settings"]["eval_eps"]]
    q = quantities(summary)
    head = ["experiment", "clean", *(f"L2 eps {e}" for e in eps)]
    lines = [f"Each cell of this run (seed {summary['seed']}) beside the range of the published runs of these "
             f"settings ({spread.describe()}, `benchmarks/spread.py` at {spread.commit or '?'} on "
             f"{spread.machine or 'an unnamed machine'}): a trained model's number is one draw, and another seed, "
             "thread count or CPU is another.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, _ in ROWS:
        cells = []
        for name in (f"{key}/clean", *(f"{key}/robust/{e}" for e in eps)):
            if name not in q or not spread.values(name):
                cells.append("-")
                continue
            r = spread.range(name)
            mark = "" if r.place(q[name]) == "inside" else f" **{r.place(q[name])}**"
            cells.append(f"{100 * q[name]:.1f} ({100 * r.lo:.1f} to {100 * r.hi:.1f}){mark}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    outside = [f"{name} {spread.place(name, v)}" for name, v in q.items()
               if spread.values(name) and spread.range(name).place(v) != "inside"]
    lines += ["", "Outside the published range: " + "; ".join(outside) + "." if outside else
              f"Every quantity this run measured lies inside the published range ({len(q)} quantities)."]
    return "\n".join(lines) + "\n"


def ranges(summary: Mapping[str, Any], spread: Spread | None) -> dict[str, Range]:
    """The published range of each quantity of ``summary`` (none without a spread): what ``results.png``'s error
    bars show."""
    if spread is None:
        return {}
    return {name: spread.range(name) for name in quantities(summary) if spread.values(name)}
