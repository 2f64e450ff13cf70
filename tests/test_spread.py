"""The published spread and the claims the suite asserts: every claim safe on every published run, the rule that
says so, and a run's report placing each cell in the published range."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from matplotlib.container import ErrorbarContainer

import advfeat as af
from advfeat.replicate import SCALES, settings_record
from advfeat.replicate import claims as cl
from advfeat.replicate import spread as sp

PUBLISHED = sp.Spread.load(sp.SPREAD_FILE)


def test_the_published_spread_is_the_quick_scale_over_ten_seeds_and_two_thread_counts():
    assert dict(PUBLISHED.settings) == settings_record(SCALES["planted", "quick"])
    assert sorted((r["seed"], r["threads"]) for r in PUBLISHED.runs) == [(s, t) for s in range(10) for t in (1, 2)]
    assert PUBLISHED.machine and PUBLISHED.commit and PUBLISHED.command.startswith("python benchmarks/spread.py")
    for claim in cl.PLANTED_QUICK:  # every run measured what every claim reads
        assert all(claim.applies(r["quantities"]) for r in PUBLISHED.runs), str(claim)


@pytest.mark.parametrize("claim", cl.PLANTED_QUICK, ids=str)
def test_every_claim_is_safe_on_every_published_run(claim):
    """The bound of each claim the suite asserts sits beyond the worst of the 20 published runs by the margin rule
    (docs/results.md): another seed, thread count or CPU is another draw, and it passes too."""
    safe, worst, required = cl.margin_rule(claim, PUBLISHED)
    assert safe, f"{claim}: worst margin {worst:.4f} < {required:.4f} (benchmarks/spread.py's claims table)"


def _spread(values: list[float], name: str = "d_det/clean") -> sp.Spread:
    return sp.Spread({}, [{"seed": i, "threads": 1, "seconds": 1.0, "quantities": {name: v}}
                          for i, v in enumerate(values)])


values = st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=25)


@given(values, st.floats(-1, 1), st.floats(-0.5, 0.5))
def test_the_margin_rule_reads_margins_not_positions(vs, bound, shift):
    """Moving every value and the bound together changes nothing; a claim's mirror image (at most, negated) is
    judged alike; the worst margin is the smallest value's distance to the bound."""
    at_least = cl.Claim("x", {"d_det/clean": 1.0}, bound)
    moved = cl.Claim("x", {"d_det/clean": 1.0}, bound + shift)
    mirror = cl.Claim("x", {"d_det/clean": -1.0}, -bound, at_most=True)
    a = cl.margin_rule(at_least, _spread(vs))
    assert a[1] == pytest.approx(min(vs) - bound, abs=1e-12)
    assert cl.margin_rule(moved, _spread([v + shift for v in vs])) == pytest.approx(a, abs=1e-9)
    assert cl.margin_rule(mirror, _spread(vs)) == pytest.approx(a, abs=1e-12)


@given(values, st.floats(-1, 1), st.floats(0, 1))
def test_a_lower_bound_is_never_less_safe(vs, bound, lower_by):
    safe = cl.margin_rule(cl.Claim("x", {"d_det/clean": 1.0}, bound), _spread(vs))[0]
    if safe:
        assert cl.margin_rule(cl.Claim("x", {"d_det/clean": 1.0}, bound - lower_by), _spread(vs))[0]


def test_the_margin_rule_asks_half_the_distance_from_the_median_to_the_worst():
    claim = cl.Claim("D_det above chance", {"d_det/clean": 1.0}, 0.15)
    # median 0.30, worst 0.22: half the distance is 0.04, the worst margin 0.07: safe
    assert cl.margin_rule(claim, _spread([0.22, 0.30, 0.30, 0.35])) == pytest.approx((True, 0.07, 0.04))
    # worst 0.175 (the Intel seed-0 draw): margin 0.025 < 0.0625: not safe
    assert cl.margin_rule(claim, _spread([0.175, 0.30, 0.30, 0.35]))[0] is False
    assert cl.margin_rule(claim, _spread([0.155] * 5)) == pytest.approx((False, 0.005, cl.MARGIN_FLOOR))
    with pytest.raises(ValueError, match="no run of the spread measured"):
        cl.margin_rule(cl.Claim("x", {"other": 1.0}, 0.0), _spread([0.2]))


def test_a_relation_between_rows_is_a_claim_of_its_difference():
    c = cl.Claim("D_R beats the control", {"d_r/robust/0.5": 1.0, "control/robust/0.5": -1.0}, 0.3)
    assert c.value({"d_r/robust/0.5": 0.56, "control/robust/0.5": 0.01}) == pytest.approx(0.55)
    assert not c.applies({"d_r/robust/0.5": 0.56})
    assert str(c) == "D_R beats the control: d_r/robust/0.5 - control/robust/0.5 >= 0.3"


def _summary(**cells: float) -> dict[str, Any]:
    """A run of the published settings whose every quantity is the spread's first run's, with ``cells`` changed."""
    q = dict(PUBLISHED.runs[0]["quantities"])
    rows: dict[str, Any] = {}
    for name, v in q.items():
        if name.startswith("map/"):
            continue
        *path, last = name.split("/")
        node = rows
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    for name, v in cells.items():
        row, key = name.split("__")
        rows[row][key] = v
    return {"settings": dict(PUBLISHED.settings), "seed": 42, "rows": rows}


def test_the_report_places_each_cell_and_says_plainly_which_fall_outside():
    inside = sp.placement(_summary(), PUBLISHED)
    assert "Every quantity this run measured lies inside the published range" in inside
    assert "| 6. standard training on D_det | " in inside and "**" not in inside
    r = PUBLISHED.range("d_det/clean")
    out = sp.placement(_summary(d_det__clean=r.hi + 0.05), PUBLISHED)
    assert f"{100 * (r.hi + 0.05):.1f} ({100 * r.lo:.1f} to {100 * r.hi:.1f}) **above**" in out
    assert (f"Outside the published range: d_det/clean {100 * (r.hi + 0.05):.1f}%, above the range "
            f"[{100 * r.lo:.1f}, {100 * r.hi:.1f}] of 20 runs") in out
    import re

    held = re.search(r": (\d+) of (\d+) hold in this run", cl.section(_summary()))
    assert held is not None and held.group(1) == held.group(2)  # every claim holds on a published run
    assert "- does not hold: D_det's mislabelled" in cl.section(_summary(d_det__clean=0.12))


def test_a_run_of_other_settings_has_no_published_spread():
    other = _summary()
    other["settings"] = {**other["settings"], "nonrobust_eps": 0.75}
    assert sp.published(other) is None and sp.published(_summary()) == PUBLISHED
    assert sp.ranges(other, None) == {}


def test_results_png_shows_the_published_range_as_error_bars():
    summary = {**_summary(), "paper": af.report.PAPER, "labels": af.report.SHORT}
    fig = af.figures.results_bars(summary, ranges=sp.ranges(summary, PUBLISHED))
    bars = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    rows = summary["rows"]  # every row's clean bar, and the robust bar of those with one at eps 0.5
    assert len(bars) == len(rows) + sum("0.5" in r.get("robust", {}) for r in rows.values())
    r = PUBLISHED.range("d_det/clean")
    lows = sorted(round(float(seg[0][1]), 6) for c in bars for seg in c.lines[2][0].get_segments())
    assert round(100 * r.lo, 6) in lows
    assert any("published range (20 runs)" in t.get_text() for t in fig.legends[0].get_texts())
    plain = af.figures.results_bars(summary)
    assert not [c for c in plain.axes[0].containers if isinstance(c, ErrorbarContainer)]


def test_a_spread_file_is_checked_when_read(tmp_path: Path):
    (tmp_path / "x.json").write_text(json.dumps({"runs": []}))
    with pytest.raises(ValueError, match="is not a spread record"):
        sp.Spread.load(tmp_path / "x.json")
    with pytest.raises(KeyError, match="no run of this spread measured 'nothing'"):
        PUBLISHED.range("nothing")


def test_quantities_name_every_measured_number_and_leave_out_times_and_counts():
    res = {"rows": {"robust": {"clean": 0.8, "robust": {"0.5": 0.6}, "seconds": 3.0, "n_test": 2000,
                               "gradient_free": {"n": 500, "pgd": {"accuracy": 0.62, "interval_95": [0.5, 0.7]},
                                                 "cascade": {"steps": 20}}},
                    "d_det": {"clean": 0.3, "construction": {"targets_reached": 0.99}, "predicts_y_plus_1": 0.6,
                              "curve": [0.1, 0.35, 0.3]}}}
    cells = [{"mode": "det", "eps": 0.5, "n": 2000, "learner": "mlp", "test_accuracy": 0.2, "transfer_n": 9,
              "curve": [0.2]}]
    assert sp.quantities(res, cells) == {
        "robust/clean": 0.8, "robust/robust/0.5": 0.6, "robust/gradient_free/pgd": 0.62, "d_det/clean": 0.3,
        "d_det/construction/targets_reached": 0.99, "d_det/predicts_y_plus_1": 0.6, "d_det/curve_peak": 0.35,
        "map/det_eps0.5/test_accuracy": 0.2}
