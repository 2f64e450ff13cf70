"""Write the published results tables from ``results.json`` files, so README.md and docs/results.md show exactly
what a run wrote (no number is typed by hand).

    python3 -m advfeat replicate --out replication          # the README's main command
    python3 scripts/publish_tables.py planted-quick replication/results.json

A table lives between ``<!-- advfeat:table NAME -->`` and ``<!-- /advfeat:table -->`` in README.md and
docs/results.md; every region with that NAME is replaced by ``advfeat.report.headline_table`` of the run (at the
eps given by ``--eps``, default the settings' ``eps``), with a line naming the command's settings and time.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from advfeat.report import headline_table

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "results.md"]


def region(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- advfeat:table {re.escape(name)} -->\n)(.*?)(<!-- /advfeat:table -->)", re.S)


def render(summary: dict, eps: str | None = None) -> str:
    s = summary["settings"]
    eps = eps or f"{s['eps']:g}"
    return (headline_table(summary, eps) + f"\n(seed {summary['seed']}, {s['dataset']} {s['scale']}, "
            f"{summary.get('total_seconds', 0):.0f} s on the machine that ran it; regenerate with "
            "`scripts/publish_tables.py`)\n")


def publish(name: str, results: Path, eps: str | None = None, docs: Sequence[Path] = DOCS) -> int:
    table = render(json.loads(results.read_text()), eps)
    found = 0
    for doc in docs:
        text = doc.read_text()
        new, k = region(name).subn(lambda m: m.group(1) + table + m.group(3), text)
        found += k
        if k and new != text:
            doc.write_text(new)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="the table's name in the docs' markers, e.g. planted-quick")
    ap.add_argument("results", type=Path, help="a results.json written by advfeat replicate")
    ap.add_argument("--eps", default=None, help="the L2 budget of the robust column (default: the run's eps)")
    args = ap.parse_args(argv)
    if publish(args.name, args.results, args.eps) == 0:
        print(f"publish_tables: no <!-- advfeat:table {args.name} --> region in README.md or docs/results.md",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
