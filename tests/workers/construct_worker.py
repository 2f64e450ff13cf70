"""Subprocess worker for the constructors' crash and distributed tests.

``python tests/workers/construct_worker.py OUT KIND`` builds KIND ("robustify", "det" or "rand") of a small
planted set into OUT (resuming when OUT holds part of it); ``--ddp RANK WORLD PORT`` builds one rank's shards.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import advfeat as af


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("kind", choices=["robustify", "det", "rand"])
    ap.add_argument("--ddp", type=int, nargs=3, metavar=("RANK", "WORLD", "PORT"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.ddp:
        rank, world, port = args.ddp
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    data = af.data.planted(480, 8, seed=1).train
    torch.manual_seed(0)
    model = af.models.PlantedNet(hidden=32)
    common = dict(out=args.out, shard_size=16, batch_size=8, steps=200, progress=False, seed=3)
    if args.kind == "robustify":
        af.robustify(model, data, **common)
    else:
        af.nonrobustify(model, data, mode=args.kind, eps=0.5, step_size=0.1, **common)
    if args.ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
