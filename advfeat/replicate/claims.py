"""The paper's claims, and the checks a reviewer asks for, as inequalities over what a replication measures.

A claim is a linear inequality over a run's quantities (``advfeat.replicate.spread.quantities``): "D_R's learner is
more robust than the standard model by 30 points" is ``d_r/robust/0.5 - standard/robust/0.5 >= 0.3``. The suite
asserts every claim of :data:`PLANTED_QUICK` on its own run of ``advfeat replicate`` (any seed, any machine);
:func:`margin_rule` says whether a claim's bound is safe for that: it must hold on every run of the published
spread with room to spare, so that another draw (another seed, thread count or CPU) passes too.

    >>> c = Claim("D_det teaches the real task above chance", {"d_det/clean": 1.0}, 0.15)
    >>> c.holds({"d_det/clean": 0.3}), round(c.margin({"d_det/clean": 0.3}), 3)
    (True, 0.15)
    >>> print(c)
    D_det teaches the real task above chance: d_det/clean >= 0.15
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .spread import Spread, quantities

__all__ = ["Claim", "PLANTED_QUICK", "margin_rule", "claims_table", "section", "MARGIN_FLOOR"]

MARGIN_FLOOR = 0.01
"""The least room a claim's bound leaves beyond the worst run of the spread (one point of accuracy)."""


@dataclass(frozen=True)
class Claim:
    """``sum(coefficient * quantity) >= bound`` (``at_most``: ``<=``) over a run's quantities."""

    text: str
    terms: Mapping[str, float]
    bound: float
    at_most: bool = False
    group: str = field(default="experiments", compare=False)

    def applies(self, q: Mapping[str, float]) -> bool:
        """Whether the run measured every quantity the claim reads (the controls' claims need ``--controls``)."""
        return all(name in q for name in self.terms)

    def value(self, q: Mapping[str, float]) -> float:
        return sum(coef * q[name] for name, coef in self.terms.items())

    def margin(self, q: Mapping[str, float]) -> float:
        """How far the run is on the right side of the bound (negative: the claim fails)."""
        v = self.value(q)
        return self.bound - v if self.at_most else v - self.bound

    def holds(self, q: Mapping[str, float]) -> bool:
        return self.margin(q) >= 0

    def __str__(self) -> str:
        expr = ""
        for name, coef in self.terms.items():
            sign = "-" if coef < 0 else "+"
            size = "" if abs(coef) == 1 else f"{abs(coef):g} * "
            expr += (f" {sign} " if expr else ("-" if coef < 0 else "")) + size + name
        return f"{self.text}: {expr} {'<=' if self.at_most else '>='} {self.bound:g}"


def margin_rule(claim: Claim, spread: Spread) -> tuple[bool, float, float]:
    """Whether ``claim``'s bound is safe on ``spread``: it holds on every run that measured its quantities, and
    the worst run's margin is at least ``MARGIN_FLOOR`` and at least half the distance from the median run's
    value to the worst run's. (Over 20 normal draws the worst lies about 1.9 standard deviations from the median;
    the rule puts the bound about 2.8 away, so a new draw fails about once in 400.) Returns ``(safe, worst
    margin, required margin)``."""
    margins = [claim.margin(r["quantities"]) for r in spread.runs if claim.applies(r["quantities"])]
    if not margins:
        raise ValueError(f"no run of the spread measured every quantity of {claim}")
    worst = min(margins)
    required = max(MARGIN_FLOOR, 0.5 * (statistics.median(margins) - worst))
    return worst >= required, worst, required


def _at_least(text: str, name: str, bound: float, group: str = "experiments") -> Claim:
    return Claim(text, {name: 1.0}, bound, group=group)


def _at_most(text: str, name: str, bound: float, group: str = "experiments") -> Claim:
    return Claim(text, {name: 1.0}, bound, at_most=True, group=group)


PLANTED_QUICK: tuple[Claim, ...] = (
    _at_least("standard training is accurate", "standard/clean", 0.95),
    _at_most("... and not robust", "standard/robust/0.5", 0.1),
    _at_least("adversarial training keeps most clean accuracy", "robust/clean", 0.7),
    _at_least("... and is robust", "robust/robust/0.5", 0.5),
    _at_least("D_R teaches the real task", "d_r/clean", 0.7),
    Claim("D_R's learner is more robust than the standard model", {"d_r/robust/0.5": 1.0,
                                                                    "standard/robust/0.5": -1.0}, 0.3),
    Claim("... and than a model of the same recipe on as many real images", {"d_r/robust/0.5": 1.0,
                                                                              "control/robust/0.5": -1.0}, 0.3),
    _at_most("robustify matches the robust representation", "d_r/construction/rel_distance_median", 0.1),
    _at_least("D_NR teaches the real task", "d_nr/clean", 0.8),
    _at_most("... without robustness", "d_nr/robust/0.5", 0.1),
    _at_least("D_rand's mislabelled images teach the real task", "d_rand/clean", 0.5),
    _at_least("D_det's mislabelled images teach the real task above chance (10%)", "d_det/clean", 0.15),
    _at_least("D_det's attack reaches most of its targets", "d_det/construction/targets_reached", 0.8),
    # the gradient-free check: the robust rows keep their robustness without gradients, the standard rows do not
    *(c for key in ("robust", "d_r") for c in (
        _at_least(f"{key}: robust under PGD on the checked images", f"{key}/gradient_free/pgd", 0.4, "gradient-free"),
        Claim(f"{key}: Square finds no more than PGD (no gradient masking)",
              {f"{key}/gradient_free/square": 1.0, f"{key}/gradient_free/pgd": -1.0}, -0.05, group="gradient-free"),
        Claim(f"{key}: the cascade agrees with PGD from below",
              {f"{key}/gradient_free/autoattack": 1.0, f"{key}/gradient_free/pgd": -1.0}, -0.05,
              group="gradient-free"),
        Claim(f"{key}: ... and is no weaker than PGD", {f"{key}/gradient_free/autoattack": 1.0,
                                                        f"{key}/gradient_free/pgd": -1.0}, 0.01, at_most=True,
              group="gradient-free"))),
    *(c for key in ("standard", "d_nr") for c in (
        _at_most(f"{key}: not robust under PGD", f"{key}/gradient_free/pgd", 0.05, "gradient-free"),
        _at_most(f"{key}: nor under Square", f"{key}/gradient_free/square", 0.3, "gradient-free"),
        _at_most(f"{key}: nor under the cascade", f"{key}/gradient_free/autoattack", 0.05, "gradient-free"))),
    # the critics' controls (--controls)
    _at_least("the bugs reach most of their targets", "d_det_bugs/targets_reached", 0.85, "controls"),
    Claim("the bugs transfer at most half as often as D_det's perturbations",
          {"d_det/transfer_rate": 0.5, "d_det_bugs/transfer_rate": -1.0}, 0.0, group="controls"),
    _at_most("the bugs teach the real task no better than chance", "d_det_bugs/clean", 0.12, "controls"),
    _at_most("a probe on robust features learns nothing from D_det", "leakage_det/clean", 0.12, "controls"),
    # the generalisation map's measurements (spread.MAP_CELLS)
    _at_least("D_det's perturbations move an independently trained model", "map/det_eps0.5/transfer_same", 0.5,
              "map"),
    _at_least("... and one of another architecture", "map/det_eps0.5/transfer_other", 0.3, "map"),
    *(_at_most(f"{mode}: unperturbed images do not transfer", f"map/{mode}_eps{e}/transfer_clean", 0.05, "map")
      for mode, e in (("rand", "0.3"), ("det", "0.5"))),
    Claim("D_rand at half its targets transfers less than D_det", {"map/det_eps0.5/transfer_same": 1.0,
                                                                   "map/rand_eps0.3/transfer_same": -1.0}, 0.2,
          group="map"),
    _at_most("random labels on clean images teach nothing", "map/rand_eps0.3/random_labels_teach", 0.15, "map"),
    Claim("the lesson is in the reached targets", {"map/rand_eps0.3/reached_teaches": 1.0,
                                                   "map/rand_eps0.3/unreached_teaches": -1.0}, 0.04, group="map"),
    Claim("D_det's images poison the true task", {"map/det_eps0.5/clean_accuracy": 1.0,
                                                  "map/det_eps0.5/poison_accuracy": -1.0}, 0.05, group="map"),
    _at_least("... whose clean images teach it", "map/det_eps0.5/clean_accuracy", 0.8, "map"),
)
"""The claims the suite asserts on its planted quick run; each bound is safe by :func:`margin_rule` on the
published spread (``tests/test_spread.py`` checks it)."""


def claims_table(spread: Spread, claims: tuple[Claim, ...] = PLANTED_QUICK) -> str:
    """Each claim beside its value's range over the spread's runs, its worst margin and the margin the rule asks
    (:func:`margin_rule`); values and margins in points (%)."""
    lines = ["| claim | value: min / median / max | worst margin | required | safe |", "|---|---|---|---|---|"]
    for c in claims:
        values = [c.value(r["quantities"]) for r in spread.runs if c.applies(r["quantities"])]
        if not values:
            continue
        safe, worst, required = margin_rule(c, spread)
        lines.append(f"| {c} | {100 * min(values):.1f} / {100 * statistics.median(values):.1f} / "
                     f"{100 * max(values):.1f} | {100 * worst:+.1f} | {100 * required:.1f} | "
                     f"{'yes' if safe else '**no**'} |")
    return "\n".join(lines) + "\n"


def section(summary: Mapping[str, Any], claims: tuple[Claim, ...] = PLANTED_QUICK) -> str:
    """``report.md``'s lines on the claims a run of the published settings measured: how many hold, and each
    that does not, with its value."""
    q = quantities(summary)
    measured = [c for c in claims if c.applies(q)]
    failed = [c for c in measured if not c.holds(q)]
    lines = [f"The claims the suite asserts at these settings (`advfeat.replicate.claims`, each safe on every "
             f"published run): {len(measured) - len(failed)} of {len(measured)} hold in this run."]
    lines += [f"- does not hold: {c} (here {c.value(q):.3f})" for c in failed]
    return "\n".join(lines) + "\n"
