"""The ``advfeat`` console script (also ``python -m advfeat``): ``advfeat replicate [options]``, ``advfeat map
[options]`` (``advfeat.replicate.map``), and ``advfeat env`` (what this process runs with, for a bug report).

The command line runs with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets the variable: OpenMP's default
busy-waiting threads make two jobs on one machine each four to six times slower than alone (docs/benchmarks.md).
OpenMP reads the variable when torch is first loaded, which importing advfeat has done, so the entry point sets it
and starts the command again (``os.execv``, POSIX only) before doing anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

WAIT_POLICY = "OMP_WAIT_POLICY"


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and WAIT_POLICY not in os.environ and os.name == "posix":  # the process's own entry point
        os.environ[WAIT_POLICY] = "PASSIVE"
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "advfeat", *sys.argv[1:]])
    ap = argparse.ArgumentParser(prog="advfeat", description="Adversarial examples are features: the library's "
                                 "command line.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print what this process runs with (versions, threads, OpenMP policy, devices)")
    from .replicate import map as the_map
    from .replicate import map_cli

    m = sub.add_parser("map", help="map when non-robust features generalise: D_rand / D_det cells with the leakage "
                       "probe", description=the_map.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    map_cli.add_arguments(m)
    r = sub.add_parser("replicate", help="run the paper's six experiments and write a report",
                       description="Train standard and robust models, build D_R, D_NR, D_rand and D_det, train on "
                       "each, evaluate, and write report.md, results.json and image grids to --out. Finished "
                       "stages are skipped on a rerun.")
    r.add_argument("--dataset", default="planted", choices=["planted", "fashion-mnist", "mnist", "cifar10"])
    r.add_argument("--root", default=None, help="folder of the dataset's files (default: the dataset's usual "
                   "place, e.g. /usr/share/datasets/fashion-mnist)")
    r.add_argument("--out", default="replication", help="output and cache folder (default: ./replication)")
    r.add_argument("--scale", default="quick", choices=["quick", "full"])
    r.add_argument("--device", default="cpu")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--transfer", action="store_true", help="also the transfer experiment (Figure 3): several "
                   "architectures trained on D_det")
    r.add_argument("--controls", action="store_true", help="also the critics' controls: a D_det of non-transferring "
                   "bugs, the robust-feature leakage probe, class-keyed shortcuts, distillation from wrong labels")
    r.add_argument("--standard-model", default=None, metavar="FILE", help="cifar10: a robustness-library checkpoint "
                   "(e.g. the paper's cifar_nat.pt) used instead of training the standard model")
    r.add_argument("--robust-model", default=None, metavar="FILE", help="cifar10: a robustness-library checkpoint "
                   "(e.g. the paper's cifar_l2_0_5.pt) used instead of training the robust model")
    r.add_argument("--checkpoint-arch", default="resnet50", choices=["resnet18", "resnet34", "resnet50", "resnet101",
                   "resnet152"], help="the architecture of --standard-model / --robust-model (default resnet50)")
    r.add_argument("--checkpoint-width", type=int, default=64, help="their stem width (default 64, the library's)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--keep-malloc", action="store_true", help="leave glibc's malloc settings alone (by default "
                   "the process keeps freed memory for reuse, which is faster on CPU: see advfeat.allocator)")
    args = ap.parse_args(argv)
    if args.command == "env":
        return _env()
    if args.command == "map":
        return map_cli.run(args, m)
    _check(r, args)
    from ._lock import InUseError
    from .allocator import tune
    from .replicate import replicate

    if not args.keep_malloc:
        tune()

    from .progress import run_command

    def work() -> int:
        replicate(args.dataset, root=args.root, out=args.out, scale=args.scale, device=args.device,
                  seed=args.seed, progress=not args.no_progress, transfer=args.transfer,
                  controls=args.controls, standard_model=args.standard_model, robust_model=args.robust_model,
                  checkpoint_arch=args.checkpoint_arch, checkpoint_width=args.checkpoint_width)
        return 0

    return run_command("advfeat replicate", f"finished stages, shards and checkpoints are kept in {args.out}", work,
                       (FileNotFoundError, ValueError, InUseError, ImportError))


def _env() -> int:
    import platform

    import torch

    from . import __version__

    cuda = torch.cuda.is_available()
    lines = [f"advfeat {__version__}", f"torch {torch.__version__}", f"python {platform.python_version()}",
             f"platform {platform.platform()}", f"threads {torch.get_num_threads()}",
             *(f"{k}={os.environ.get(k, '(unset)')}" for k in (WAIT_POLICY, "OMP_NUM_THREADS")),
             f"cuda {torch.cuda.get_device_name(0) if cuda else 'not available'}"]
    print("\n".join(lines))
    return 0


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that would fail deep inside the run fail here: one line naming the flag, exit status 2."""
    import os
    from pathlib import Path

    if not args.out.strip():
        parser.error("--out must name a folder, got an empty string (it would write into the current folder)")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be in [0, 2**63), got {args.seed}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out!r} is a file, not a folder")
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--out {args.out!r}: {existing} is not writable")
    if args.root is not None and not (Path(args.root).is_dir() and os.access(args.root, os.R_OK | os.X_OK)):
        parser.error(f"--root {args.root!r} is not a readable folder")
    if args.checkpoint_width < 1:
        parser.error(f"--checkpoint-width must be a positive number of channels, got {args.checkpoint_width}")
    from ._checks import check_device

    try:
        check_device("--device", args.device)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
