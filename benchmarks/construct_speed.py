"""Constructor throughput: image-steps per second of robustify and nonrobustify over the floor, in one run.

Run:  python benchmarks/construct_speed.py [--repeats 5] [--steps 100] [--n 512] [--threads T] [--device cpu|cuda]

The floor is the same number of forward + backward-to-input passes through the same model on the same
batches, with nothing else: for robustify the relative representation distance, for nonrobustify the
cross-entropy. Ratios are medians over ``--repeats`` interleaved runs. Target: at most 1.05 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import advfeat as af


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def floor(model: nn.Module, data: TensorDataset, steps: int, batch: int, kind: str, device: torch.device) -> None:
    x_all, y_all = data.tensors
    for p in model.parameters():
        p.requires_grad_(False)
    head = af.models.last_linear(model)
    grab: list[torch.Tensor] = []
    h = head.register_forward_pre_hook(lambda _m, a: grab.append(a[0]))
    try:
        for i in range(0, len(x_all), batch):
            x, y = x_all[i:i + batch].to(device), y_all[i:i + batch].to(device)
            with torch.no_grad():
                grab.clear()
                model(x)
                target = grab[-1].flatten(1)
            z = x.clone().requires_grad_(True)
            for _ in range(steps):
                grab.clear()
                out = model(z)
                if kind == "robustify":
                    loss = ((grab[-1].flatten(1) - target).norm(dim=1) / target.norm(dim=1)).sum()
                else:
                    loss = F.cross_entropy(out, y, reduction="none").sum()
                torch.autograd.grad(loss, z)
    finally:
        h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    setups = [("SmallCNN 1x28x28", af.models.SmallCNN(), (1, 28, 28)),
              ("PlantedNet 1x16x16", af.models.PlantedNet(), (1, 16, 16))]
    batch = 128
    print(f"{args.n} images x {args.steps} steps, batch {batch}, {torch.get_num_threads()} threads, {device}")
    print("\n| model | constructor | image-steps/s | floor image-steps/s | ratio |\n|---|---|---|---|---|")
    for name, model, shape in setups:
        model = model.to(device).eval()
        data = TensorDataset(torch.rand(args.n, *shape), torch.randint(0, 10, (args.n,)))
        runs: dict[str, Callable[[], object]] = {
            "robustify": lambda m=model, d=data: af.robustify(m, d, steps=args.steps, batch_size=batch,
                                                              device=device, progress=False),
            "robustify floor": lambda m=model, d=data: floor(m, d, args.steps, batch, "robustify", device),
            "nonrobustify": lambda m=model, d=data: af.nonrobustify(m, d, steps=args.steps, batch_size=batch,
                                                                    device=device, progress=False),
            "nonrobustify floor": lambda m=model, d=data: floor(m, d, args.steps, batch, "nonrobustify", device),
        }
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[k].append(time.perf_counter() - t0)
        for kind in ("robustify", "nonrobustify"):
            t, f = statistics.median(times[kind]), statistics.median(times[f"{kind} floor"])
            work = args.n * args.steps
            print(f"| {name} | {kind} | {work / t:,.0f} | {work / f:,.0f} | {t / f:.3f} |")


if __name__ == "__main__":
    main()
