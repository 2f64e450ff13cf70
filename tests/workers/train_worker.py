"""Subprocess worker for the trainer's crash and distributed tests.

``python tests/workers/train_worker.py OUT [--kill-after N]`` trains a small model with a checkpoint in OUT
(resuming when one exists), killing itself with SIGKILL after N batches when asked (``--pause-after N``: print
``paused`` and wait until stdin closes, holding the checkpoint); at the end it saves the weights to
OUT/final.pt. ``--ddp RANK WORLD FILE`` trains one rank of a gloo process group that meets at the file FILE.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import advfeat as af


@dataclass(frozen=True, eq=False)
class Smoothed(af.TrainingMethod):
    """A user's method, as docs/training.md writes one: cross-entropy on the batch and on a noised copy."""

    sigma: float = 0.1

    def loss(self, model, x, y, ctx):
        noisy = (x + self.sigma * torch.randn_like(x)).clamp(0, 1)
        logits = model(torch.cat([x, noisy]))
        return F.cross_entropy(logits.float(), torch.cat([y, y])), logits[: len(y)]


class KillingLoader:
    """A DataLoader that sends SIGKILL to its own process after ``kill_after`` batches (a real crash)."""

    def __init__(self, loader: DataLoader, kill_after: int | None, pause_after: int | None = None) -> None:
        self.loader, self.kill_after, self.pause_after, self.count = loader, kill_after, pause_after, 0
        self.sampler = loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if self.kill_after is not None and self.count == self.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.pause_after is not None and self.count == self.pause_after:
                print("paused", flush=True)
                sys.stdin.read()
            self.count += 1
            yield batch


def model(dropout: float) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(af.models.PlantedNet(hidden=32), torch.nn.Dropout(dropout))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--kill-after", type=int)
    ap.add_argument("--pause-after", type=int)
    ap.add_argument("--method", default="pgd")
    ap.add_argument("--ddp", nargs=3, metavar=("RANK", "WORLD", "FILE"))
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    data = af.data.planted(256, 8, seed=1).train
    net = model(0.0 if args.ddp else 0.1)  # dropout masks differ between ranks
    if args.ddp:
        rank, world = int(args.ddp[0]), int(args.ddp[1])
        torch.distributed.init_process_group("gloo", init_method=Path(args.ddp[2]).resolve().as_uri(), rank=rank,
                                             world_size=world)
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
        loader = DataLoader(data, batch_size=args.batch, sampler=sampler)
        net = torch.nn.parallel.DistributedDataParallel(net)
        af.adversarial_train(net, loader, method=args.method, attack=af.L2PGD(0.5, steps=2), epochs=2,
                             lr=0.05, progress=False)
        if rank == 0:
            torch.save(net.module.state_dict(), args.out / "final.pt")
        torch.distributed.barrier()  # final.pt is written before any rank leaves
        # PyTorch 2.13's gloo can deadlock at teardown (seen once in this suite, on a loaded CPU): freeing the DDP
        # model frees its process group, whose destructor joins gloo's worker thread while holding the GIL, and that
        # thread waits for the GIL to free the last collective's work (gdb: ~ProcessGroupGloo -> thread::join;
        # pt_gloo_runloop -> ~AsyncBarrierWork -> take_gil). Every rank is done here: leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    torch.manual_seed(1)
    loader = KillingLoader(DataLoader(data, batch_size=args.batch, shuffle=True), args.kill_after, args.pause_after)
    attack = af.L2PGD(0.5, steps=2, random_start=True)
    method = {"custom": lambda: Smoothed(), "free": lambda: af.FreeTraining(attack, replays=2)}.get(
        args.method, lambda: af.methods.from_name(args.method, attack))()
    af.adversarial_train(net, loader, method=method, epochs=3, lr=0.05, checkpoint=args.out / "ckpt.pt", resume=True,
                         history_file=args.out / "history.jsonl", progress=False)
    torch.save(net.state_dict(), args.out / "final.pt")


if __name__ == "__main__":
    main()
