"""The spread of the planted quick replication over seeds and thread counts: every number the suite and the README
read, as one draw per (seed, threads).

Run (about an hour on 2 cores; each run is cached in --out and a rerun resumes where it stopped):

    python benchmarks/spread.py --out runs/spread                      # seeds 0-9 at 1 and 2 threads
    python benchmarks/spread.py --out runs/spread --publish            # then write the package's spread file

Each run is ``advfeat replicate --seed S --controls`` (planted, quick) in its own process at ``OMP_NUM_THREADS=T``,
then the generalisation map's measured cells on it (``advfeat.replicate.spread.MAP_CELLS``, ``--measure split
poison transfer``), as the suite runs them. One-thread runs go two at a time on two cores. The spread is written to
``--out/spread.json`` with every run's quantities; the table printed gives each quantity's min / median / max over
all runs and at each thread count, and each claim of ``advfeat.replicate.claims.PLANTED_QUICK`` beside its
worst run and the margin rule. ``--publish`` copies the spread into ``advfeat/replicate/spread_planted_quick.json``
and fills the README's and docs/results.md's tables from it (``scripts/publish_tables.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
FIRST_MAP_CELLS = [{"mode": "rand", "eps": 0.3, "n": 2000, "learner": "mlp"},
                   {"mode": "det", "eps": 0.5, "n": 2000, "learner": "mlp"}]
"""The map cells of the records written before a record named its own (2026-12-06)."""


def worker(seed: int, folder: Path) -> None:
    """One run (in a process whose threads the environment set): the replication with its controls, then the
    map's cells, then ``quantities.json``."""
    from advfeat.cli import main
    from advfeat.replicate import map as the_map
    from advfeat.replicate.spread import MAP_CELLS, MAP_MEASURES, quantities

    t0 = time.perf_counter()
    rep = folder / "replication"
    if main(["replicate", "--seed", str(seed), "--out", str(rep), "--controls", "--no-progress"]) != 0:
        raise SystemExit(f"the replication at seed {seed} failed")
    cells = the_map.build_cells(folder / "map", MAP_CELLS, source=rep, progress=False, log=lambda line: None,
                                measures=MAP_MEASURES)["cells"]
    results = json.loads((rep / "results.json").read_text())
    record = {"seed": seed, "threads": int(os.environ["OMP_NUM_THREADS"]),
              "seconds": round(time.perf_counter() - t0, 1), "map_cells": list(MAP_CELLS),
              "quantities": quantities(results, cells)}
    (folder / "quantities.json").write_text(json.dumps(record, indent=1))


def run_one(seed: int, threads: int, out: Path) -> dict[str, object]:
    """One run's record: read back when it was made with today's map cells, else (re)made (the replication and
    every map stage already computed are read from their caches)."""
    from advfeat.replicate.spread import MAP_CELLS

    folder = out / f"t{threads}" / f"s{seed}"
    done = folder / "quantities.json"
    if done.exists() and json.loads(done.read_text()).get("map_cells", FIRST_MAP_CELLS) != list(MAP_CELLS):
        done.unlink()  # measured with other map cells: measure again
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
        with open(folder / "log.txt", "a") as log:
            subprocess.run([sys.executable, __file__, "--worker", str(seed), str(folder)], env=env, check=True,
                           stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    record: dict[str, object] = json.loads(done.read_text())
    return record


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/spread"), help="cache and output folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores to fill (default: all)")
    ap.add_argument("--publish", action="store_true", help="write the package's spread file and the docs' tables")
    ap.add_argument("--commit", default=None, help="the commit the cached runs were made at (default: HEAD here)")
    ap.add_argument("--worker", nargs=2, metavar=("SEED", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(int(args.worker[0]), Path(args.worker[1]))
        return 0

    from advfeat.machine import describe
    from advfeat.replicate import SCALES, settings_record
    from advfeat.replicate.claims import PLANTED_QUICK, claims_table
    from advfeat.replicate.spread import Spread, spread_table

    t0 = time.perf_counter()
    runs: list[dict[str, object]] = []
    with tqdm(total=len(args.seeds) * len(args.threads), desc="spread runs") as bar:
        for threads in args.threads:  # as many runs at once as the cores hold
            with ThreadPoolExecutor(max(1, args.cores // threads)) as pool:
                for record in pool.map(lambda s, t=threads: run_one(s, t, args.out), args.seeds):
                    runs.append(record)
                    bar.update()
    cmd = "python benchmarks/spread.py " + " ".join(
        [f"--seeds {' '.join(map(str, args.seeds))}", f"--threads {' '.join(map(str, args.threads))}"])
    spread = Spread(settings_record(SCALES["planted", "quick"]), runs, describe(), args.commit or commit(), cmd)
    (args.out / "spread.json").write_text(spread.to_json())
    print(spread_table(spread))
    print(claims_table(spread, PLANTED_QUICK))
    hours = sum(float(r["seconds"]) for r in runs) / 3600  # type: ignore[arg-type]
    print(f"{spread.describe()}; {hours:.2f} h of run time, {time.perf_counter() - t0:.0f} s of wall time here "
          f"({spread.machine}, commit {spread.commit})")
    if args.publish:
        from advfeat.replicate.spread import SPREAD_FILE

        SPREAD_FILE.write_text(spread.to_json())
        subprocess.run([sys.executable, str(ROOT / "scripts" / "publish_tables.py"), "planted-quick",
                        str(SPREAD_FILE)], check=True)
        print(f"wrote {SPREAD_FILE.relative_to(ROOT)} and the planted-quick tables")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
