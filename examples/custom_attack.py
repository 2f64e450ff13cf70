"""Write your own attack: subclass af.Attack as a frozen dataclass and implement run().

    python examples/custom_attack.py [--small]

The base class validates inputs, runs the model in eval mode with frozen parameters and restores its
state afterwards; the attack composes with Restarts and WorstOf and works in evaluate().
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import advfeat as af


@dataclass(frozen=True)
class RandomSearch(af.Attack):
    """Try ``tries`` random points on the L2 sphere of radius ``eps``; keep the first that fools the model."""

    eps: float = 1.0
    tries: int = 8

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        best = x.clone()
        for _ in range(self.tries):
            d = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            cand = (x + self.eps * d / d.flatten(1).norm(dim=1).view(-1, *[1] * (x.ndim - 1))).clamp(0, 1)
            fooled = model(cand).argmax(1) != y
            still = model(best).argmax(1) == y
            best = torch.where((fooled & still).view(-1, *[1] * (x.ndim - 1)), cand, best)
        return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # label each point with the model's own prediction: 100% clean accuracy
    ours = RandomSearch(eps=0.5)
    print(ours)
    x_adv = ours(model, x, y, generator=torch.Generator().manual_seed(0))  # validated, model state guarded
    print(f"fooled by random search: {(model(x_adv).argmax(1) != y).float().mean():.2%}")
    both = af.WorstOf(ours, af.L2PGD(0.5, steps=5))
    result = af.evaluate(model, [(x, y)], {"random search": ours, "worst of both": both}, progress=False,
                         generator=torch.Generator().manual_seed(0))
    print(result)


if __name__ == "__main__":
    main()
