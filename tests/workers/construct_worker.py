"""Subprocess worker for the constructors' crash, lock and distributed tests.

``python tests/workers/construct_worker.py OUT KIND`` builds KIND ("robustify", "det" or "rand") of a small
planted set into OUT (resuming when OUT holds part of it). Crashes and pauses are placed by the work's own
progress, never by a clock:

* ``--kill-after-batches N``: SIGKILL itself once N batches are finished (counted by the progress bar's
  updates: inside a shard, or between a shard's last batch and its write, as N falls);
* ``--kill-in-write N``: SIGKILL itself half-way through writing the N-th file (a shard's array or record),
  leaving a partial temporary file and a shard without its record;
* ``--pause-after-batches N``: print ``paused`` after N batches and wait until stdin closes (the lock is held);
* ``--ddp RANK WORLD FILE``: build one rank's shards of a gloo job that meets at the rendezvous file FILE.

On exit it prints one JSON line: the number of batches this process finished.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

import advfeat as af
import advfeat.construct.shards
import advfeat.construct.store

finished = 0


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    global finished
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("kind", choices=["robustify", "det", "rand"])
    ap.add_argument("--ddp", nargs=3, metavar=("RANK", "WORLD", "FILE"))
    ap.add_argument("--kill-after-batches", type=int)
    ap.add_argument("--kill-in-write", type=int)
    ap.add_argument("--pause-after-batches", type=int)
    ap.add_argument("--n", type=int, default=160)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.ddp:
        rank, world, rendezvous = args.ddp
        torch.distributed.init_process_group("gloo", init_method=Path(rendezvous).resolve().as_uri(),
                                             rank=int(rank), world_size=int(world))

    real_bar = advfeat.construct.shards.progress_bar

    class Counting:
        def __init__(self, bar: Any) -> None:
            self.bar = bar

        def update(self, n: int) -> None:
            global finished
            self.bar.update(n)
            finished += 1
            if finished == args.kill_after_batches:
                die()
            if finished == args.pause_after_batches:
                print("paused", flush=True)
                sys.stdin.read()

    class CountingBar:
        def __init__(self, *a: Any, **kw: Any) -> None:
            self.cm = real_bar(*a, **kw)

        def __enter__(self) -> Counting:
            return Counting(self.cm.__enter__())

        def __exit__(self, *exc: Any) -> Any:
            return self.cm.__exit__(*exc)

    advfeat.construct.shards.progress_bar = CountingBar  # type: ignore[assignment]

    real_write = advfeat.construct.store.atomic_write
    writes = 0

    def write(path: Any, fn: Any, size: Any = None) -> None:
        nonlocal writes
        writes += 1
        if writes != args.kill_in_write:
            return real_write(path, fn, size)

        def half(f: Any) -> None:  # write half of the bytes, then die before the rename
            import io
            buf = io.BytesIO()
            fn(buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            die()

        return real_write(path, half, size)

    advfeat.construct.store.atomic_write = write  # type: ignore[assignment]

    data = af.data.planted(args.n, 8, seed=1).train
    torch.manual_seed(0)
    model = af.models.PlantedNet(hidden=32)
    common: dict[str, Any] = dict(out=args.out, shard_size=16, batch_size=8, steps=args.steps, progress=False, seed=3)
    if args.kind == "robustify":
        af.robustify(model, data, **common)
    else:
        af.nonrobustify(model, data, mode=args.kind, eps=0.5, step_size=0.1, **common)
    if args.ddp:
        torch.distributed.destroy_process_group()
    print(json.dumps({"batches": finished}))


if __name__ == "__main__":
    main()
