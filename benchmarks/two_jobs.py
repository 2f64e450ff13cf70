"""Two jobs on one machine: a short PGD training of the planted model run alone and two at once, with OpenMP's
default (busy-waiting) threads and with ``OMP_WAIT_POLICY=PASSIVE``, all in one run.

Run:  python benchmarks/two_jobs.py [--repeats 3] [--epochs 2]

Each job is a fresh process (the policy is read when torch is first loaded). Reported per policy: the median time
of one job alone, of each of two started together, and their ratio; a fair share on a machine whose cores the two
split is a ratio near 2 (each job gets half the cores), and near 1 where each had cores to spare. The command line
(`advfeat ...`) sets ``PASSIVE`` unless the environment chose; library users export it themselves.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

JOB = """
import time, torch, advfeat as af
from torch.utils.data import DataLoader
data = af.data.planted(2000, 200, seed=0)
torch.manual_seed(0)
model = af.models.PlantedNet()
t0 = time.perf_counter()
af.adversarial_train(model, DataLoader(data.train, batch_size=128, shuffle=True), method="pgd",
                     attack=af.L2PGD(0.5, steps=7), epochs={epochs}, lr=0.1, progress=False)
print(time.perf_counter() - t0)
"""


def jobs(k: int, policy: str | None, epochs: int) -> list[float]:
    """Start ``k`` jobs together; each one's training time (s)."""
    env = {key: v for key, v in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    procs = [subprocess.Popen([sys.executable, "-c", JOB.format(epochs=epochs)], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(k)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a job failed (exit {p.returncode})")
        out.append(float(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    alone: dict[str, list[float]] = {"default": [], "PASSIVE": []}
    pair: dict[str, list[float]] = {"default": [], "PASSIVE": []}
    t0 = time.perf_counter()
    for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits every row alike
        for name, policy in (("default", None), ("PASSIVE", "PASSIVE")):
            alone[name] += jobs(1, policy, args.epochs)
            pair[name] += jobs(2, policy, args.epochs)
    print(f"{os.cpu_count()} cores, torch threads per job: default; {args.repeats} repeats, "
          f"{args.epochs} epochs; {time.perf_counter() - t0:.0f} s in all\n")
    print("| OMP_WAIT_POLICY | one job alone (s) | each of two at once (s) | two at once / alone |")
    print("|---|---|---|---|")
    for name in alone:
        a, b = statistics.median(alone[name]), statistics.median(pair[name])
        print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.1f}x |")


if __name__ == "__main__":
    main()
