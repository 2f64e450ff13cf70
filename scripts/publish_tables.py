"""Write the published results tables from ``results.json`` files, so README.md and docs/results.md show exactly
what a run wrote (no number is typed by hand).

    python3 -m advfeat replicate --out replication          # the README's main command
    python3 scripts/publish_tables.py planted-quick replication/results.json

A table lives between ``<!-- advfeat:table NAME -->`` (or ``<!-- advfeat:table NAME/KIND -->``) and
``<!-- /advfeat:table -->`` in README.md and docs/results.md. Every region of that NAME is replaced from the run:
``NAME`` alone by ``advfeat.report.headline_table`` (at the eps given by ``--eps``, default the settings' ``eps``)
with a line naming the run's settings and time; ``NAME/KIND`` by the table ``advfeat.report.TABLES[KIND]``
(``results``, ``constructions``, ``features``, ``controls``, ``transfer``) of the same run. One results.json,
every table of it. A generalisation map's ``map.json`` (``scripts/generalisation_map.py``) fills a ``NAME`` region
with its cells (``advfeat.report.map_table``), a ``NAME/measures`` region with the cells'
``--measure`` results (``advfeat.report.measures_table``) and a ``NAME/teaching`` region with their learning curves
and transfer rates (``advfeat.report.teaching_table``). A spread's record (``benchmarks/spread.py``, e.g.
``advfeat/replicate/spread_planted_quick.json``) fills a ``NAME`` region with the headline table's median and
range over its runs (``advfeat.replicate.spread.headline_table``), ``NAME/spread`` with every quantity's range and
``NAME/claims`` with the suite's claims beside the margin rule (``advfeat.replicate.claims.claims_table``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from advfeat.replicate import spread as spreads
from advfeat.replicate.claims import claims_table
from advfeat.report import TABLES, headline_table, map_table, measures_table, teaching_table

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "results.md"]
MAP_TABLES = {"headline": map_table, "measures": measures_table, "teaching": teaching_table}
SPREAD_TABLES = {"headline": spreads.headline_table, "spread": spreads.spread_table, "claims": claims_table}


def region(name: str, kind: str | None = None) -> re.Pattern[str]:
    """The regions of ``name`` (``kind`` None: the headline), or of ``name/kind`` (``kind="*"``: any kind)."""
    tag = re.escape(name) + ("" if kind is None else "/" + (r"(\w+)" if kind == "*" else re.escape(kind)))
    return re.compile(rf"(<!-- advfeat:table {tag} -->\n)(.*?)(<!-- /advfeat:table -->)", re.S)


def render(summary: dict, eps: str | None = None, kind: str = "headline") -> str:
    if "runs" in summary:  # a spread: its headline's median and range, every quantity's range, the claims
        if kind not in SPREAD_TABLES:
            raise SystemExit(f"publish_tables: a spread has three tables (NAME, NAME/spread, NAME/claims), not "
                             f"{kind!r}")
        sp = spreads.Spread(summary["settings"], summary["runs"], summary.get("machine", ""),
                            summary.get("commit", ""), summary.get("command", ""))
        hours = sum(float(r["seconds"]) for r in sp.runs) / 3600
        return SPREAD_TABLES[kind](sp) + (f"\n(median [smallest, largest] over {sp.describe()}; "
                                          f"`{sp.command}` at {sp.commit}, {hours:.1f} h of run time on "
                                          f"{sp.machine}; regenerate with `scripts/publish_tables.py`)\n")
    if "cells" in summary:  # a map.json: its cells, their measurements (NAME/measures), teaching (NAME/teaching)
        if kind not in MAP_TABLES:
            raise SystemExit(f"publish_tables: a map.json has three tables (NAME, NAME/measures, NAME/teaching), "
                             f"not {kind!r}")
        k = len(summary["cells"])
        table = MAP_TABLES[kind](summary) or f"(no cell of this map has {kind}: run it with --measure)\n"
        return table + (f"\n({k} cell{'s' * (k != 1)}, {summary['dataset']}, "
                                     "`scripts/generalisation_map.py`; regenerate with `scripts/publish_tables.py`)\n")
    s = summary["settings"]
    if kind != "headline":
        table = TABLES[kind]
        assert table is not None
        return table(summary) or f"(this run has no {kind} table: run it with --{kind})\n"
    eps = eps or f"{s['eps']:g}"
    return (headline_table(summary, eps) + f"\n(seed {summary['seed']}, {s['dataset']} {s['scale']}, "
            f"{run_time(summary)} on the machine that ran it; regenerate with `scripts/publish_tables.py`)\n")


def run_time(summary: dict) -> str:
    """The run's wall time; for a run that reported from its cache (its total shorter than its own stages), the sum
    of the stages' times instead, said as such."""
    total = float(summary.get("total_seconds", 0))
    stages = sum(float(r.get("seconds", 0)) for r in summary["rows"].values())
    if total >= stages:
        return f"{total:.0f} s"
    return f"{stages:.0f} s of stage time (resumed from its cache, stages run at different times)"


def publish(name: str, results: Path, eps: str | None = None, docs: Sequence[Path] = DOCS) -> int:
    """Replace every region of ``name`` (the headline and each ``name/KIND``); the number of regions found."""
    summary = json.loads(results.read_text())
    found = 0
    for doc in docs:
        text = doc.read_text()
        new, k = region(name).subn(lambda m: m.group(1) + render(summary, eps) + m.group(3), text)
        found += k
        for kind in sorted({m.group(2) for m in region(name, "*").finditer(new)}):
            if kind not in TABLES and not ("cells" in summary and kind in MAP_TABLES) and not (
                    "runs" in summary and kind in SPREAD_TABLES):
                raise SystemExit(f"publish_tables: {doc.name} names an unknown table {name}/{kind} "
                                 f"(known: {', '.join(TABLES)})")
            new, k = region(name, kind).subn(lambda m, kind=kind: m.group(1) + render(summary, eps, kind)
                                             + m.group(3), new)
            found += k
        if new != text:
            doc.write_text(new)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="the table's name in the docs' markers, e.g. planted-quick")
    ap.add_argument("results", type=Path, help="a results.json written by advfeat replicate, or a map.json by "
                    "scripts/generalisation_map.py")
    ap.add_argument("--eps", default=None, help="the L2 budget of the robust column (default: the run's eps)")
    args = ap.parse_args(argv)
    if publish(args.name, args.results, args.eps) == 0:
        print(f"publish_tables: no <!-- advfeat:table {args.name} --> region in README.md or docs/results.md",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
