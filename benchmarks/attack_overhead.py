"""Attack overhead: time of a 10-step PGD attack over 10 x (forward + backward to the input).

Run:  python benchmarks/attack_overhead.py [--repeats 7] [--threads N] [--device cpu|cuda]

For L2 and Linf PGD at batch 128 on a small CNN (1x28x28) and a small ResNet (3x32x32), all timed in one
run and interleaved, median of ``--repeats``. The floor is what any gradient attack must pay: the same
model, batch and number of forward + backward-to-input passes, with no projection or bookkeeping.
If ``torchattacks`` is installed (``pip install --no-deps torchattacks``) its PGD / PGDL2 are timed in
the same run. Also: early-stopped evaluation over full evaluation of a standard model (target < 0.3 with
the same accuracy), on Fashion-MNIST when installed, else on a synthetic task.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import advfeat as af


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def floor(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    z = x.clone().requires_grad_(True)  # one leaf reused: the floor pays for no allocation of its own
    for _ in range(steps):
        loss = F.cross_entropy(model(z), y, reduction="none").sum()
        torch.autograd.grad(loss, z)


def overhead(device: torch.device, repeats: int) -> list[tuple[str, str, float]]:
    try:
        import torchattacks  # type: ignore[import-not-found]
    except ImportError:
        torchattacks = None
    torch.manual_seed(0)
    rows = []
    setups = [
        ("SmallCNN 1x28x28", af.models.SmallCNN(), (1, 28, 28)),
        ("SmallResNet 3x32x32", af.models.SmallResNet(), (3, 32, 32)),
    ]
    for name, model, shape in setups:
        model = model.to(device).eval()
        x = torch.rand(128, *shape, device=device)
        y = torch.randint(0, 10, (128,), device=device)
        cands: dict[str, Callable[[], object]] = {
            "floor": lambda m=model, x=x, y=y: floor(m, x, y, 10),
            "advfeat L2PGD": lambda m=model, x=x, y=y: af.L2PGD(0.5, steps=10)(m, x, y),
            "advfeat LinfPGD": lambda m=model, x=x, y=y: af.LinfPGD(8 / 255, steps=10)(m, x, y),
        }
        if torchattacks is not None:
            ta_l2 = torchattacks.PGDL2(model, eps=0.5, alpha=0.125, steps=10, random_start=False)
            ta_linf = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=False)
            cands["torchattacks PGDL2"] = lambda a=ta_l2, x=x, y=y: a(x, y)
            cands["torchattacks PGD (Linf)"] = lambda a=ta_linf, x=x, y=y: a(x, y)
        for fn in cands.values():  # warm up
            fn()
        times: dict[str, list[float]] = {k: [] for k in cands}
        keys = list(cands)
        for r in range(repeats):  # interleaved, in a rotating order so no candidate always runs first
            for k in keys[r % len(keys):] + keys[: r % len(keys)]:
                times[k].append(timed(cands[k], device))
        base = statistics.median(times["floor"])
        for k in cands:
            if k != "floor":
                rows.append((name, k, statistics.median(times[k]) / base))
        rows.append((name, "floor (10 fwd+bwd) ms", base * 1e3))
    return rows


def standard_model(device: torch.device) -> tuple[nn.Module, DataLoader[tuple[torch.Tensor, ...]], str]:
    """A quickly trained standard SmallCNN and a test loader: Fashion-MNIST if installed, else synthetic."""
    root = Path("/usr/share/datasets/fashion-mnist")
    torch.manual_seed(0)
    try:
        import gzip

        import numpy as np

        def idx(name: str) -> np.ndarray:
            for p in (root / name, root / f"{name}.gz"):
                if p.exists():
                    raw = gzip.open(p).read() if p.suffix == ".gz" else p.read_bytes()
                    ndim = raw[3]
                    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
            raise FileNotFoundError(name)

        xtr = torch.tensor(idx("train-images-idx3-ubyte")).float().div(255).reshape(-1, 1, 28, 28)
        ytr = torch.tensor(idx("train-labels-idx1-ubyte")).long()
        xte = torch.tensor(idx("t10k-images-idx3-ubyte")).float().div(255).reshape(-1, 1, 28, 28)[:1024]
        yte = torch.tensor(idx("t10k-labels-idx1-ubyte")).long()[:1024]
        data = "Fashion-MNIST (2 epochs of Adam), 1024 test images"
    except FileNotFoundError:
        protos = torch.rand(10, 1, 28, 28)
        ytr = torch.randint(0, 10, (20000,))
        xtr = (protos[ytr] * 0.5 + 0.5 * torch.rand(20000, 1, 28, 28)).clamp(0, 1)
        yte = torch.randint(0, 10, (1024,))
        xte = (protos[yte] * 0.5 + 0.5 * torch.rand(1024, 1, 28, 28)).clamp(0, 1)
        data = "synthetic prototypes (Fashion-MNIST not installed)"
    model = af.models.SmallCNN().to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(2):
        for xb, yb in DataLoader(TensorDataset(xtr, ytr), batch_size=128, shuffle=True):
            opt.zero_grad()
            F.cross_entropy(model(xb.to(device)), yb.to(device)).backward()
            opt.step()
    return model.eval(), DataLoader(TensorDataset(xte, yte), batch_size=256), data


def early_stop(device: torch.device, repeats: int) -> tuple[str, list[tuple[float, float, float, float]]]:
    """Per eps: (eps, time early / time full, robust accuracy early, robust accuracy full)."""
    model, loader, data = standard_model(device)
    rows = []
    for eps in (0.5, 1.0, 1.5):
        attack = {"l2": af.L2PGD(eps, steps=20)}
        t_fast, t_full, fast, full = [], [], None, None
        for _ in range(repeats):
            t0 = time.perf_counter()
            fast = af.evaluate(model, loader, attack, early_stop=True, progress=False)
            sync(device)
            t_fast.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            full = af.evaluate(model, loader, attack, early_stop=False, progress=False)
            sync(device)
            t_full.append(time.perf_counter() - t0)
        assert fast is not None and full is not None
        rows.append((eps, statistics.median(t_fast) / statistics.median(t_full),
                     fast.robust_accuracy("l2"), full.robust_accuracy("l2")))
    return data, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                    help="tuned: advfeat.allocator.tune() first (as advfeat replicate does); default: glibc as it is")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-eval", action="store_true", help="skip the early-stopping comparison")
    ap.add_argument("--skip-overhead", action="store_true", help="only the early-stopping comparison")
    args = ap.parse_args()
    malloc_tuned = args.malloc == "tuned" and af.allocator.tune()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; malloc {'tuned' if malloc_tuned else 'as is'}")
    if not args.skip_overhead:
        print("| model | attack | time / floor |")
        print("|---|---|---|")
        for model, attack, ratio in overhead(device, args.repeats):
            print(f"| {model} | {attack} | {ratio:.3f} |")
    if not args.skip_eval:
        data, rows = early_stop(device, max(1, args.repeats // 3))
        print(f"\nearly-stopped / full evaluation, L2 PGD 20 steps, standard SmallCNN, {data}")
        print("| eps | time early / full | robust acc (early stop) | robust acc (every step) |")
        print("|---|---|---|---|")
        for eps, ratio, acc_fast, acc_full in rows:
            print(f"| {eps} | {ratio:.3f} | {acc_fast:.4f} | {acc_full:.4f} |")


if __name__ == "__main__":
    main()
