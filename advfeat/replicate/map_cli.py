"""``advfeat map``: the generalisation map's command line (``advfeat.replicate.map`` computes it)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._lock import InUseError
from ..allocator import tune
from ..progress import run_command
from .map import AXES, LEARNERS, build_cells, choose, design
from .map_report import MEASURES

__all__ = ["add_arguments", "run", "main"]


def _parse(value: str, axis: str, flag: str, item: str) -> Any:
    """One axis value of ``--base`` / ``--vary`` (``item``: the whole word, for the error)."""
    if axis not in AXES:
        raise ValueError(f"{flag} {item}: unknown axis {axis!r}; the axes are {', '.join(AXES)}")
    if axis in ("mode", "learner", "rule"):
        return value
    try:
        return float(value) if axis == "eps" else int(value)
    except ValueError:
        kind = "a number" if axis == "eps" else "a whole number"
        raise ValueError(f"{flag} {item}: {axis} must be {kind}, got {value!r}") from None


def _read_json(path: str, flag: str) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{flag} {path!r}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag} {path!r} is not JSON ({type(e).__name__})") from None



def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The map's options, on ``ap`` (``advfeat map`` and ``scripts/generalisation_map.py`` share them)."""
    ap.add_argument("--from", dest="source", default=None, help="a finished `advfeat replicate --out` folder")
    ap.add_argument("--dataset", default="fashion-mnist", help="without --from: the settings' dataset")
    ap.add_argument("--scale", default="full", help="without --from: the settings' scale (quick or full)")
    ap.add_argument("--out", help="where the map's sets, models and outputs are cached")
    ap.add_argument("--choose", metavar="MAP_JSON", default=None,
                    help="only read a map.json (also one still being filled) and print the protocol's choice "
                         "(docs/replication.md): the admissible D_det cells of --choose-n images, seed 0")
    ap.add_argument("--choose-n", type=int, default=20000)
    ap.add_argument("--design", default="grid", help="grid (every combination) or axes (one axis at a time)")
    ap.add_argument("--base", nargs="*", default=[], metavar="AXIS=VALUE", help=f"the base point; axes: {AXES}")
    ap.add_argument("--vary", nargs="*", default=[], metavar="AXIS=V1,V2",
                    help="the values of each axis to map (default with --from: eps=1,2,3 mode=rand,det "
                         "n=5000,20000,60000 learner=cnn,mlp,resnet)")
    ap.add_argument("--root", default=None, help="the dataset's folder, as given to replicate")
    ap.add_argument("--measure", nargs="*", default=[], choices=MEASURES,
                    help="measurements added to every cell: split (the reached and unreached parts apart, and the "
                         "unperturbed images with the set's labels), poison (D_det cells: its images with their "
                         "true labels against the clean images), transfer (independently trained models: how "
                         "often they classify the set's moved images as its label)")
    ap.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    """Run the map the parsed ``args`` describe; the exit status: 2 for a bad option, file or a folder in use, 1 for
    a failure of the machine (a full disk, a folder it may not write), 130 after Ctrl-C. Every error is one line
    naming the flag or the file."""
    return run_command(ap.prog, f"finished cells, sets and checkpoints are kept in --out {args.out}",
                       lambda: _run(args, ap), (ValueError, KeyError, IndexError, InUseError, FileNotFoundError))


def _run(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    if args.choose:
        record = _read_json(args.choose, "--choose")
        if not isinstance(record, dict) or not isinstance(record.get("cells"), list):
            raise ValueError(f"--choose {args.choose!r} holds no 'cells' list: give a map.json that advfeat map wrote")
        print(choose(record["cells"], n=args.choose_n)[1])
        return 0
    if not args.out:
        ap.error("--out is required (unless --choose)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out!r} is a file, not a folder")
    tune()
    base, vary = {}, {}
    for item in args.base:
        k, _, v = item.partition("=")
        base[k] = _parse(v, k, "--base", item)
    for item in args.vary:
        k, _, v = item.partition("=")
        vary[k] = [_parse(x, k, "--vary", item) for x in v.split(",")]
    if not vary and args.design == "grid":
        vary = {"eps": [1.0, 2.0, 3.0], "mode": ["rand", "det"], "n": [5000, 20000, 60000],
                "learner": list(LEARNERS)}
    build_cells(args.out, design(args.design, base, vary), source=args.source, dataset=args.dataset,
                scale=args.scale, root=args.root, progress=not args.no_progress, measures=args.measure)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``advfeat map`` as a function: parse ``argv`` (default: the process's) and run."""
    ap = argparse.ArgumentParser(prog="advfeat map", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv), ap)


if __name__ == "__main__":
    raise SystemExit(main())
