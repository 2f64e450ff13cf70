"""Subprocess worker for distributed evaluation: ``python tests/workers/evaluate_worker.py OUT RANK WORLD FILE``
evaluates a fixed planted model on 37 test samples (an uneven split: DistributedSampler pads one rank) as one rank
of a gloo process group that meets at FILE, and saves the result's JSON to OUT/rank<RANK>.json and its robustness
curve's to OUT/curve<RANK>.json. WORLD 1 runs one process without a group, on the plain loader."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

import advfeat as af


def main() -> None:
    out, rank, world, rendezvous = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = af.data.planted(400, 37, seed=0)
    model = af.models.PlantedNet(hidden=32)
    af.adversarial_train(model, DataLoader(data.train, batch_size=50, shuffle=True), method="standard", epochs=3,
                         lr=0.1, progress=False)
    attacks = {"l2": af.L2PGD(0.5, steps=5), "linf": af.LinfPGD(0.05, steps=5)}
    if world == 1:
        loader = DataLoader(data.test, batch_size=8)
        result = af.evaluate(model, loader, attacks, progress=False, per_sample=True)
        curve = af.robustness_curve(model, loader, lambda e: af.L2PGD(e, steps=5), [0.25, 0.5, 1.0], progress=False)
    else:
        torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
        loader = DataLoader(data.test, batch_size=8, sampler=DistributedSampler(data.test, shuffle=True, seed=3))
        result = af.evaluate(model, loader, attacks, progress=False)
        curve = af.robustness_curve(model, loader, lambda e: af.L2PGD(e, steps=5), [0.25, 0.5, 1.0], progress=False)
        torch.distributed.barrier()
    (out / f"rank{rank}.json").write_text(result.to_json())
    (out / f"curve{rank}.json").write_text(json.dumps(dataclasses.asdict(curve)))
    sys.stdout.flush()
    os._exit(0)  # every rank is done: leave without gloo's teardown (see train_worker.py)


if __name__ == "__main__":
    main()
