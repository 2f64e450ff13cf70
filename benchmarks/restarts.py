"""Restarts one after another vs in one batch: time per forward + backward pass, measured in one run, interleaved.

    python benchmarks/restarts.py [--device cpu|cuda] [--repeats 5] [--threads N]

``Restarts(L2PGD(0.5, steps=10, random_start=True), n)`` on a SmallCNN (1x28x28) at batch 128, for n in 2, 5 and
10, sequential and ``batched=True`` (one batch of n x 128); the same generator seed for both, so the results agree
sample for sample (checked here too). Prints microseconds per image-pass and batched / sequential.

Then APGD-T (``APGD(0.5, norm="l2", loss=af.dlr, n_target_classes=k, steps=10)``) with its targets one after
another and ``batched=True``: image-forwards are counted by a hook (the sequential run drops samples an earlier
target broke, the batched one attacks every sample towards every target), so the table gives the time per
image-forward and the whole call's time, batched over sequential.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import advfeat as af


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    af.allocator.tune()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = af.models.SmallCNN().to(dev).eval()
    x, y = torch.rand(128, 1, 28, 28, device=dev), torch.randint(0, 10, (128,), device=dev)
    steps = 10
    seen = [0]  # image-forwards, counted by a hook
    model.register_forward_hook(lambda m, a, out: seen.__setitem__(0, seen[0] + a[0].shape[0]))

    def compare(make: Callable[[bool], af.Attack]) -> tuple[dict[bool, float], dict[bool, int]]:
        """Median seconds per call and image-forwards, sequential (False) and batched (True), interleaved."""
        times: dict[bool, list[float]] = {False: [], True: []}
        forwards: dict[bool, int] = {}
        results = {}
        for _ in range(args.repeats):
            for batched in (False, True):
                attack, seen[0] = make(batched), 0
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                results[batched] = attack(model, x, y, generator=torch.Generator(dev).manual_seed(1))
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[batched].append(time.perf_counter() - t0)
                forwards[batched] = seen[0]
        assert torch.allclose(results[False], results[True], atol=1e-4)
        return {b: statistics.median(t) for b, t in times.items()}, forwards

    print("| n | sequential us / image-pass | batched us / image-pass | batched / sequential |")
    print("|---|---|---|---|")
    for n in (2, 5, 10):
        call, _ = compare(lambda b, n=n: af.Restarts(af.L2PGD(0.5, steps=steps, random_start=True), n, batched=b))
        per = {b: 1e6 * t / (n * steps * len(x)) for b, t in call.items()}
        print(f"| {n} | {per[False]:.2f} | {per[True]:.2f} | {per[True] / per[False]:.2f} |")
    print()
    print("| APGD-T targets | sequential us / image-forward | batched us / image-forward | batched / sequential "
          "per forward | image-forwards batched / sequential | call time batched / sequential |")
    print("|---|---|---|---|---|---|")
    for k in (3, 9):
        call, forwards = compare(lambda b, k=k: af.APGD(0.5, norm="l2", loss=af.dlr, n_target_classes=k, steps=steps,
                                                        batched=b))
        per = {b: 1e6 * call[b] / forwards[b] for b in call}
        print(f"| {k} | {per[False]:.2f} | {per[True]:.2f} | {per[True] / per[False]:.2f} | "
              f"{forwards[True] / forwards[False]:.2f} | {call[True] / call[False]:.2f} |")

if __name__ == "__main__":
    main()
