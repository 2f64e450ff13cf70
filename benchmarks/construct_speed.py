"""Constructor throughput: image-steps per second of robustify and nonrobustify over the floor, in one run.

Run:  python benchmarks/construct_speed.py [--repeats 5] [--steps 100] [--n 512] [--threads T] [--device cpu|cuda]

The floor is the same forward + backward-to-input passes through the same model, on the same inputs, with
nothing else. An untimed run of each constructor records every input its model sees (a forward pre-hook);
the floor replays them: the no-grad forward of the reference representations (robustify), then, per step,
a forward, the same per-sample loss (the relative representation distance, or the targeted cross-entropy)
and a backward to the input. Replaying the very iterates matters on CPU: the time of a convolution depends
on the values it is given (denormal floats are slow), so a floor that stood still at ``x`` or at the start
image would measure different arithmetic, not the constructor's overhead.

Ratios are medians over ``--repeats`` interleaved runs. Target: at most 1.05 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import advfeat as af


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def record_step_inputs(model: nn.Module, build: Callable[[], object]) -> list[Tensor]:
    """The inputs of every forward that ``build()`` runs with a gradient to its input, in order."""
    seen: list[Tensor] = []

    def hook(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
        if torch.is_grad_enabled() and args[0].requires_grad:
            seen.append(args[0].detach().clone())

    h = model.register_forward_pre_hook(hook)
    try:
        build()
    finally:
        h.remove()
    return seen


def floor(model: nn.Module, data: TensorDataset, steps: list[Tensor], per_batch: int, batch: int, kind: str,
          device: torch.device) -> None:
    """Replay ``steps`` (``per_batch`` per source batch of ``batch`` images): forward, loss, backward to input."""
    x_all, y_all = data.tensors
    n_batches = -(-len(x_all) // batch)
    if len(steps) != n_batches * per_batch:
        raise RuntimeError(f"recorded {len(steps)} step inputs, expected {n_batches} x {per_batch}")
    for p in model.parameters():
        p.requires_grad_(False)
    head = af.models.last_linear(model)
    grab: list[Tensor] = []
    h = head.register_forward_pre_hook(lambda _m, a: grab.append(a[0]))
    try:
        for b in range(n_batches):
            x, y = x_all[b * batch:(b + 1) * batch].to(device), y_all[b * batch:(b + 1) * batch].to(device)
            if kind == "robustify":
                with torch.no_grad():
                    grab.clear()
                    model(x)
                    target = grab[-1].flatten(1).float()
                scale = target.norm(dim=1)
            for z in steps[b * per_batch:(b + 1) * per_batch]:
                z = z.requires_grad_(True)
                grab.clear()
                out = model(z)
                if kind == "robustify":
                    loss = (grab[-1].flatten(1).float() - target).norm(dim=1) / scale
                else:
                    loss = F.cross_entropy(out, (y + 1) % out.shape[1], reduction="none")
                torch.autograd.grad(loss.sum(), z)
    finally:
        h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                    help="tuned: advfeat.allocator.tune() first (as advfeat replicate does); default: glibc as it is")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    malloc_tuned = args.malloc == "tuned" and af.allocator.tune()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    setups = [("SmallCNN 1x28x28", af.models.SmallCNN(), (1, 28, 28)),
              ("PlantedNet 1x16x16", af.models.PlantedNet(), (1, 16, 16))]
    batch = 128
    print(f"{args.n} images x {args.steps} steps, batch {batch}, {torch.get_num_threads()} threads, {device}, "
          f"malloc {'tuned' if malloc_tuned else 'as is'}")
    print("\n| model | constructor | image-steps/s | floor image-steps/s | ratio |\n|---|---|---|---|---|")
    for name, model, shape in setups:
        model = model.to(device).eval()
        data = TensorDataset(torch.rand(args.n, *shape), torch.randint(0, 10, (args.n,)))
        build: dict[str, Callable[[], object]] = {
            "robustify": lambda m=model, d=data: af.robustify(m, d, steps=args.steps, batch_size=batch,
                                                              device=device, progress=False),
            "nonrobustify": lambda m=model, d=data: af.nonrobustify(m, d, mode="det", steps=args.steps,
                                                                    batch_size=batch, device=device,
                                                                    progress=False),
        }
        runs: dict[str, Callable[[], object]] = {}
        for kind, fn in build.items():
            recorded = record_step_inputs(model, fn)
            runs[kind] = fn
            runs[f"{kind} floor"] = (lambda m=model, d=data, r=recorded, k=kind:
                                     floor(m, d, r, args.steps, batch, k, device))
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[k].append(time.perf_counter() - t0)
        for kind in build:
            t, f = statistics.median(times[kind]), statistics.median(times[f"{kind} floor"])
            work = args.n * args.steps
            print(f"| {name} | {kind} | {work / t:,.0f} | {work / f:,.0f} | {t / f:.3f} |")


if __name__ == "__main__":
    main()
