"""Where Square's time goes on a robust model, for advfeat's Square and torchattacks 3.5.1's on the same model,
images and budget, in one run: the images each forwards, the time inside the model and the time per query outside
it.

    python benchmarks/square_queries.py [--n 50] [--queries 5000] [--threads 1] [--repeats 1] [--fashion-root DIR]

The model is ``evaluation_reference.py``'s PGD-trained Fashion-MNIST SmallCNN (the same seed and recipe). Each
attack's model is wrapped to count the images it forwards and to time its forward passes, so the time outside the
model (the search's own work) is measured, not inferred from the total. ``--repeats`` runs each pair again, in
turns. Prints a Markdown table (docs/benchmarks.md records it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from evaluation_reference import _models, _pair, _timed
from torch import Tensor, nn

import advfeat as af


class _Counted(nn.Module):
    """``model``, counting the images and calls it forwards and the seconds its forward passes take."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.images, self.calls, self.seconds = model, 0, 0, 0.0

    def forward(self, x: Tensor) -> Tensor:
        self.images += x.shape[0]
        self.calls += 1
        t0 = time.perf_counter()
        out: Tensor = self.model(x)
        self.seconds += time.perf_counter() - t0
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--fashion-root", type=Path, default=af.data.FASHION_MNIST_ROOT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, x, y, linf, l2 = _models(args.fashion_root, ["fashion-mnist pgd"])["fashion-mnist pgd"]
    x, y = x[:args.n], y[:args.n]
    print("| norm | attack | robust accuracy | images forwarded | calls | seconds | in the model | "
          "ms per forwarded image in the model | ms per call outside the model |\n" + "|---" * 9 + "|")
    for norm, eps in (("linf", linf), ("l2", l2)):
        for _ in range(args.repeats):
            for label, which in (("advfeat", 0), ("torchattacks", 1)):
                counted = _Counted(model).eval()
                adv, seconds = _timed(_pair("square", counted, x, y, norm, eps, args.queries)[which])
                with torch.no_grad():
                    acc = 100 * float((model(adv).argmax(1) == y).double().mean())
                print(f"| {norm} | {label} | {acc:.1f} | {counted.images} | {counted.calls} | {seconds:.1f} | "
                      f"{counted.seconds:.1f} | {1000 * counted.seconds / counted.images:.3f} | "
                      f"{1000 * (seconds - counted.seconds) / counted.calls:.3f} |", flush=True)


if __name__ == "__main__":
    main()
