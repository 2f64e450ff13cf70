"""Training speed and robustness of each method, in one run.

Run:  python benchmarks/train_speed.py [--dataset fashion-mnist|planted] [--epochs E] [--eps EPS]
                                       [--n-train N] [--n-test M] [--threads T] [--device cpu|cuda]

For "standard", "pgd" (7 steps), "fgsm-rs" (1 step, 1.25 eps, random start), "free" (m = 4 replays,
epochs / 4 so that it costs as many passes as standard training times 4), "trades" (beta 6, 7 steps) and
"mart" (beta 6, 7-step PGD examples) -- each name the shorthand of its method object's defaults:
wall time, time over PGD's time, clean accuracy and accuracy under L2 PGD (20 steps, step eps / 5, best
iterate) on the test set. The target: fgsm-rs and free within 3 points of pgd's robust accuracy in at most a
third of its time. Fashion-MNIST (SmallCNN) when installed, else planted (PlantedNet).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, Subset

import advfeat as af


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["fashion-mnist", "planted"], default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--eps", type=float, default=None)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                    help="tuned: advfeat.allocator.tune() first (as advfeat replicate does); default: glibc as it is")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="standard,pgd,fgsm-rs,free,trades,mart")
    args = ap.parse_args()
    malloc_tuned = args.malloc == "tuned" and af.allocator.tune()
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = args.dataset
    if dataset is None:
        try:
            af.data.fashion_mnist()
            dataset = "fashion-mnist"
        except FileNotFoundError:
            dataset = "planted"
    if dataset == "fashion-mnist":
        train, test = af.data.fashion_mnist(train=True), af.data.fashion_mnist(train=False)
        make = lambda: af.models.SmallCNN()  # noqa: E731
        epochs, eps, lr = args.epochs or 4, args.eps or 1.0, 0.05
    else:
        p = af.data.planted(args.n_train or 10000, args.n_test, seed=0)
        train, test = p.train, p.test
        make = lambda: af.models.PlantedNet()  # noqa: E731
        epochs, eps, lr = args.epochs or 12, args.eps or 0.5, 0.1
    if args.n_train:
        train = Subset(train, range(args.n_train))
    test = Subset(test, range(min(args.n_test, len(test))))
    device = torch.device(args.device)
    loader = DataLoader(train, batch_size=128, shuffle=True)
    ev = af.L2PGD(eps, steps=20, rel_step_size=0.2)
    attack = af.L2PGD(eps, steps=7)
    print(f"{dataset}: {len(train)} train / {len(test)} test images, L2 eps {eps}, {epochs} epochs, "
          f"{torch.get_num_threads()} threads, {device}, malloc {'tuned' if malloc_tuned else 'as is'}")
    rows = []
    for method in args.methods.split(","):
        torch.manual_seed(0)
        model = make().to(device)
        e = max(1, epochs // 4) if method == "free" else epochs
        t0 = time.perf_counter()
        af.adversarial_train(model, loader, method=method, attack=attack, epochs=e, lr=lr, device=device,
                             progress=False)
        seconds = time.perf_counter() - t0
        r = af.evaluate(model, DataLoader(test, batch_size=500), {"l2": ev}, device=device, progress=False)
        rows.append((method, e, seconds, r.clean_accuracy, r.robust_accuracy("l2")))
        print(f"  {method}: {seconds:.1f}s", flush=True)
    pgd = next((r for r in rows if r[0] == "pgd"), None)
    print("\n| method | epochs | time (s) | time / pgd | clean | L2 PGD-20 |")
    print("|---|---|---|---|---|---|")
    for m, e, s, c, rob in rows:
        ratio = f"{s / pgd[2]:.2f}" if pgd else "-"
        print(f"| {m} | {e} | {s:.1f} | {ratio} | {100 * c:.1f} | {100 * rob:.1f} |")


if __name__ == "__main__":
    main()
