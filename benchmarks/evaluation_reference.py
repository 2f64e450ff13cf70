"""advfeat's evaluation attacks against a reference port on the same models, batch and budget, in one run.

    python benchmarks/evaluation_reference.py [--n 500] [--queries 5000] [--threads 1] [--fashion-root DIR]

For each model (a standard and a PGD-trained planted MLP; a standard and a PGD-trained Fashion-MNIST SmallCNN
when the IDX files are there) and each norm, robust accuracy (%) of ``af.Square`` and of torchattacks 3.5.1's
``Square`` (``pip install --no-deps torchattacks==3.5.1 scipy requests``) on the same ``--n`` test images with the
same query budget, and each one's time per image. "No weaker" means advfeat's robust accuracy is at most the
reference's + 0.5 points. Prints a Markdown table (docs/benchmarks.md records it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

import advfeat as af


def _models(fashion_root: Path | None) -> dict[str, tuple[nn.Module, Tensor, Tensor, float, float]]:
    """name -> (model, x, y, linf eps, l2 eps)."""
    out: dict[str, tuple[nn.Module, Tensor, Tensor, float, float]] = {}
    data = af.data.planted(4000, 1000, seed=0)
    for method in ("standard", "pgd"):
        torch.manual_seed(0)
        m = af.models.PlantedNet()
        af.adversarial_train(m, DataLoader(data.train, batch_size=128, shuffle=True), method=method,
                             attack=af.L2PGD(0.5, steps=5), epochs=10, lr=0.1, progress=False)
        x, y = data.test.tensors()
        out[f"planted {method}"] = (m.eval(), x, y, 0.05, 0.5)
    if fashion_root is not None and (fashion_root / "t10k-images-idx3-ubyte.gz").exists():
        train = Subset(af.data.fashion_mnist(fashion_root, train=True), range(20000))
        test = af.data.fashion_mnist(fashion_root, train=False)
        for method in ("standard", "pgd"):
            torch.manual_seed(0)
            m = af.models.SmallCNN()
            af.adversarial_train(m, DataLoader(train, batch_size=128, shuffle=True), method=method,
                                 attack=af.L2PGD(1.0, steps=5), epochs=3, lr=0.05, progress=False)
            x, y = test.tensors()
            out[f"fashion-mnist {method}"] = (m.eval(), x, y, 0.1, 1.0)
    return out


def _row(name: str, model: nn.Module, x: Tensor, y: Tensor, norm: str, eps: float, queries: int) -> str:
    import torchattacks

    def acc(z: Tensor) -> float:
        with torch.no_grad():
            return 100 * float((model(z).argmax(1) == y).double().mean())

    t0 = time.perf_counter()
    ours = af.Square(eps, norm=norm, queries=queries, seed=0)(model, x, y)
    t_ours = time.perf_counter() - t0
    ref = torchattacks.Square(model, norm="Linf" if norm == "linf" else "L2", eps=eps, n_queries=queries, seed=0)
    t0 = time.perf_counter()
    theirs = ref(x, y)
    t_ref = time.perf_counter() - t0
    a, b = acc(ours), acc(theirs)
    return (f"| {name} | {norm} | {eps:g} | {acc(x):.1f} | {a:.1f} | {b:.1f} | {a - b:+.1f} | "
            f"{1000 * t_ours / len(x):.2f} | {1000 * t_ref / len(x):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fashion-root", type=Path, default=af.data.FASHION_MNIST_ROOT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | norm | eps | clean | advfeat Square | torchattacks Square | difference | advfeat ms/image | "
          "torchattacks ms/image |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (model, x, y, linf, l2) in _models(args.fashion_root).items():
        for norm, eps in (("linf", linf), ("l2", l2)):
            print(_row(name, model, x[:args.n], y[:args.n], norm, eps, args.queries), flush=True)


if __name__ == "__main__":
    main()
