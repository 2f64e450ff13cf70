"""The fifteen-minute GPU check, ready before a GPU is lent: one command that measures what only a GPU can.

    python benchmarks/gpu_check.py --out gpu_out                 # on the GPU machine: at most --budget-s (480 s)
    python benchmarks/gpu_check.py --out /tmp/g --device cpu --tiny   # the same code end to end on a CPU, seconds

Parts, each time-boxed (a part stops starting new measurements once its share of the budget is spent, and says so
in the table, so the whole check ends in time whatever the GPU):

1. ``cuda tests``: ``pytest -m cuda`` (CUDA equals CPU within tolerance, autocast, AMP training, resume, NCCL).
2. ``attacks``: time of one L2 PGD step over the floor of one forward + backward pass of the same model and batch
   (the ratio is what the library adds; 1.0 is free), for SmallCNN (28x28), SmallResNet and a ResNet-18 (32x32),
   at batch 128 and 1024, fp32 and bf16 autocast, eager and ``torch.compile``d; beside torchattacks 3.5.1's
   ``PGDL2`` where it is installed.
3. ``batched``: ``Restarts(L2PGD, 5)`` and APGD-T (9 targets) with ``batched=True`` against one after another:
   the call's time, batched over sequential.
4. ``constructors``: robustify and nonrobustify throughput (images per second, 25 steps) on random images.
5. ``trainer``: one epoch of each training method with AMP (bf16), images per second.

Writes ``gpu_check.md`` (one markdown table per part, headed by the device's name, ready to paste into
docs/benchmarks.md) and ``gpu_check.json``. Sizing (published figures, none ours): a small CIFAR-10 net trains at
about 130,000 image forward + backward passes per second on one A100; a PGD-10 epoch of a ResNet-18 on CIFAR-10
takes about 65-70 s on a current GPU. At the default sizes every measurement is well under a second on such a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import advfeat as af

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, after one warm-up (compilation, cuDNN autotuning)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Budget:
    """Seconds left for a part; ``ok()`` is False once they are spent."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def ok(self) -> bool:
        return time.perf_counter() < self.end


def models(tiny: bool) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]]:
    return {
        "SmallCNN": (lambda: af.models.SmallCNN(), (1, 28, 28)),
        "SmallResNet": (lambda: af.models.SmallResNet(), (3, 32, 32)),
        "ResNet-18": (lambda: af.models.CifarResNet((2, 2, 2, 2), bottleneck=False, width=4 if tiny else 64),
                      (3, 32, 32)),
    }


def part_attacks(device: torch.device, tiny: bool, budget: Budget) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    steps = 2 if tiny else 10
    batches = (8,) if tiny else (128, 1024)
    try:
        import torchattacks  # type: ignore[import-not-found]
    except ImportError:
        torchattacks = None
    for name, (make, shape) in models(tiny).items():
        for batch in batches:
            for precision in ("fp32", "bf16"):
                for mode in ("eager", "compiled"):
                    if not budget.ok():
                        rows.append({"model": name, "batch": batch, "precision": precision, "mode": mode,
                                     "note": "skipped: time box"})
                        continue
                    if mode == "compiled" and device.type != "cuda":
                        continue  # compiling on a CPU takes minutes and says nothing about a GPU
                    torch.manual_seed(0)
                    model = make().to(device).eval()
                    if mode == "compiled":
                        model = torch.compile(model)  # type: ignore[assignment]
                    x = torch.rand(batch, *shape, device=device)
                    y = torch.randint(0, 10, (batch,), device=device)
                    bf16 = precision == "bf16"

                    def amp(bf16: bool = bf16) -> Any:
                        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

                    def floor(model: nn.Module = model, x: torch.Tensor = x, y: torch.Tensor = y) -> None:
                        z = x.clone().requires_grad_(True)
                        with amp():
                            loss = nn.functional.cross_entropy(model(z).float(), y)
                        torch.autograd.grad(loss, z)

                    def ours(model: nn.Module = model, x: torch.Tensor = x, y: torch.Tensor = y) -> None:
                        with amp():
                            af.L2PGD(0.5, steps=steps)(model, x, y, validate=False)

                    repeats = 1 if tiny else 5
                    t_floor = timed(floor, device, repeats)
                    t_ours = timed(ours, device, repeats) / steps
                    row = {"model": name, "batch": batch, "precision": precision, "mode": mode,
                           "floor_ms": 1000 * t_floor, "ours_ratio": t_ours / t_floor}
                    if torchattacks is not None and mode == "eager" and precision == "fp32":
                        theirs = torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=steps, random_start=False)
                        t_theirs = timed(lambda t=theirs, x=x, y=y: t(x, y), device, repeats) / steps
                        row["torchattacks_ratio"] = t_theirs / t_floor
                    rows.append(row)
    return rows


def part_batched(device: torch.device, tiny: bool, budget: Budget) -> list[dict[str, Any]]:
    """Restarts and APGD-T's targets one after another against ``batched=True`` (one large batch), on the
    SmallResNet: the call's time, batched over sequential (below 1: the batch pays off on this device)."""
    rows: list[dict[str, Any]] = []
    make, shape = models(tiny)["SmallResNet"]
    torch.manual_seed(0)
    model = make().to(device).eval()
    b, steps = (8, 2) if tiny else (128, 10)
    x, y = torch.rand(b, *shape, device=device), torch.randint(0, 10, (b,), device=device)
    cases: dict[str, Callable[[bool], af.Attack]] = {
        "Restarts(L2PGD, 5)": lambda batched: af.Restarts(af.L2PGD(0.5, steps=steps, random_start=True), 5,
                                                          batched=batched),
        "APGD-T, 9 targets": lambda batched: af.APGD(0.5, norm="l2", loss=af.dlr, n_target_classes=9, steps=steps,
                                                     batched=batched),
    }
    for name, make_attack in cases.items():
        if not budget.ok():
            rows.append({"attack": name, "note": "skipped: time box"})
            continue
        seconds = {}
        for batched in (False, True):
            attack = make_attack(batched)
            seconds[batched] = timed(lambda a=attack: a(model, x, y, generator=torch.Generator(device).manual_seed(0)),
                                     device, 1 if tiny else 3)
        rows.append({"attack": name, "batch": b, "sequential_s": seconds[False], "batched_s": seconds[True],
                     "batched_over_sequential": seconds[True] / seconds[False]})
    return rows


def part_constructors(device: torch.device, tiny: bool, budget: Budget) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    n = 16 if tiny else 4096
    for name, (make, shape) in models(tiny).items():
        torch.manual_seed(0)
        model = make().to(device).eval()
        data = TensorDataset(torch.rand(n, *shape), torch.randint(0, 10, (n,)))
        for build in ("robustify", "nonrobustify"):
            if not budget.ok():
                rows.append({"model": name, "construction": build, "note": "skipped: time box"})
                continue
            fn = getattr(af, build)
            t0 = time.perf_counter()
            fn(model, data, steps=2 if tiny else 25, batch_size=16 if tiny else 512, device=device, progress=False)
            sync(device)
            rows.append({"model": name, "construction": build, "images": n,
                         "images_per_s": n / (time.perf_counter() - t0)})
    return rows


def part_trainer(device: torch.device, tiny: bool, budget: Budget) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    n = 16 if tiny else 8192
    make, shape = models(tiny)["SmallResNet"]
    data = TensorDataset(torch.rand(n, *shape), torch.randint(0, 10, (n,)))
    for method in ("standard", "pgd", "fgsm-rs", "free", "trades", "mart"):
        if not budget.ok():
            rows.append({"method": method, "note": "skipped: time box"})
            continue
        torch.manual_seed(0)
        model = make().to(device)
        loader = DataLoader(data, batch_size=8 if tiny else 256, shuffle=True, pin_memory=device.type == "cuda")
        t0 = time.perf_counter()
        af.adversarial_train(model, loader, method=method, attack=None if method == "standard" else
                             af.L2PGD(0.5, steps=2 if tiny else 7), epochs=1, device=device, progress=False,
                             amp="bf16" if device.type == "cuda" else None)
        sync(device)
        rows.append({"method": method, "images": n, "amp": "bf16" if device.type == "cuda" else "none",
                     "images_per_s": n / (time.perf_counter() - t0)})
    return rows


def part_cuda_tests(device: torch.device, budget_s: float) -> dict[str, Any]:
    if device.type != "cuda":
        return {"note": "skipped: not a CUDA device"}
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"],
                           cwd=ROOT, capture_output=True, text=True, timeout=budget_s)
        last = (r.stdout.strip().splitlines() or [""])[-1]
        return {"returncode": r.returncode, "summary": last, "tail": r.stdout[-4000:] + r.stderr[-2000:]}
    except subprocess.TimeoutExpired:
        return {"note": f"stopped at its time box ({budget_s:.0f} s)"}


def table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(nothing measured)"]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        out.append("| " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole check's seconds (default 480)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: the CPU run that proves the script works")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    af.allocator.tune()
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    shares = {"cuda tests": 0.3, "attacks": 0.3, "batched": 0.05, "constructors": 0.15, "trainer": 0.2}
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "tiny": args.tiny}
    result["cuda tests"] = part_cuda_tests(device, args.budget_s * shares["cuda tests"])
    for part, fn in (("attacks", part_attacks), ("batched", part_batched), ("constructors", part_constructors),
                     ("trainer", part_trainer)):
        left = args.budget_s - (time.perf_counter() - start)
        share = shares[part] / sum(shares[p] for p in shares if p not in result)
        result[part] = fn(device, args.tiny, Budget(max(0.0, left * share)))
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    tests = result["cuda tests"]
    md = [f"## GPU check: {name} (torch {torch.__version__}{', tiny sizes' if args.tiny else ''}), "
          f"{result['seconds']} s", "",
          f"CUDA tests: {tests.get('summary') or tests.get('note')}", "",
          "Attacks: one L2 PGD step over the floor of one forward + backward pass (`ours_ratio`; torchattacks' "
          "PGDL2 beside it where installed):", "", *table(result["attacks"]), "",
          "Restarts and APGD-T's targets in one batch (`batched=True`) against one after another, SmallResNet:", "",
          *table(result["batched"]), "",
          f"Constructors ({2 if args.tiny else 25} steps), images per second:", "", *table(result["constructors"]), "",
          "Trainer, one epoch per method (SmallResNet, PGD-7 where it attacks), images per second:", "",
          *table(result["trainer"]), ""]
    (args.out / "gpu_check.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
