"""Quickstart: train a small model, attack it, and measure clean and robust accuracy.

    python examples/quickstart.py            # a few seconds on a CPU
    python examples/quickstart.py --small    # the smallest setting (used by the tests)

The data are synthetic: ten classes, each a fixed random 1x16x16 pattern under noise.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import advfeat as af


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (n,), generator=g)
    x = (0.5 * patterns[y] + 0.5 * torch.rand(n, 1, 16, 16, generator=g)).clamp(0, 1)
    return TensorDataset(x, y)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="tiny sizes for a smoke test")
    args = ap.parse_args()
    n_train, epochs = (512, 2) if args.small else (4096, 3)
    torch.manual_seed(0)

    model = nn.Sequential(af.Normalize([0.5], [0.25]), af.models.SmallCNN(size=16))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    train = DataLoader(make_data(n_train, seed=1), batch_size=128, shuffle=True)
    for _ in range(epochs):
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    test = DataLoader(make_data(512, seed=2), batch_size=256)
    attacks = {
        "L2 PGD eps=1.0": af.L2PGD(1.0, steps=10),
        "Linf PGD eps=0.05": af.LinfPGD(0.05, steps=10, random_start=True),
    }
    result = af.evaluate(model, test, attacks, progress=False)
    print(result)

    x, y = next(iter(test))
    x_adv = af.L2PGD(1.0, steps=10)(model, x, y)  # the model's state is left exactly as it was
    print(f"mean L2 perturbation: {(x_adv - x).flatten(1).norm(dim=1).mean():.3f}")


if __name__ == "__main__":
    main()
