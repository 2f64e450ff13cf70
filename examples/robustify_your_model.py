"""Build D_R / D_NR and D_det from your own model and loader, stream them to disk, and train on them.

    python examples/robustify_your_model.py            # about 30 s on a 2-core CPU
    python examples/robustify_your_model.py --small    # seconds (used by the tests)

Replace ``MyNet`` and ``my_data`` with yours: any classifier whose last layer is an ``nn.Linear`` (or pass
``representation=callable``) and any non-shuffling DataLoader (or Dataset) of (x, y) with x in [0, 1].
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import advfeat as af


class MyNet(nn.Module):
    """A user's own model: normalisation inside, the penultimate representation is fc2's input."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = af.Normalize([0.5], [0.25])
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(256, 128), nn.ReLU())
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.body(self.norm(x)))


def my_data(n_train: int) -> tuple[Dataset, Dataset]:
    p = af.data.planted(n_train, 1000, seed=0)
    return p.train, p.test


def train(model: nn.Module, data: Dataset, method: str, epochs: int, lr: float = 0.1) -> nn.Module:
    af.adversarial_train(model, DataLoader(data, batch_size=128, shuffle=True), method=method,
                         attack=af.L2PGD(0.5, steps=5), epochs=epochs, lr=lr, progress=False)
    return model.eval()


def report(name: str, model: nn.Module, test: Dataset) -> None:
    r = af.evaluate(model, DataLoader(test, batch_size=500), {"l2": af.L2PGD(0.5, steps=20)}, progress=False)
    print(f"{name:28s} clean {r.clean_accuracy:6.1%}   L2 eps 0.5 {r.robust_accuracy('l2'):6.1%}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    n_train, n_build, epochs, steps = (1000, 200, 4, 20) if args.small else (8000, 3000, 30, 200)
    train_set, test_set = my_data(n_train)
    torch.manual_seed(0)
    standard = train(MyNet(), train_set, "standard", epochs)
    torch.manual_seed(0)
    robust = train(MyNet(), train_set, "pgd", max(2, epochs // 3))
    report("standard model", standard, test_set)
    report("robust model", robust, test_set)

    source = DataLoader(torch.utils.data.Subset(train_set, range(n_build)), batch_size=128)  # no shuffling
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # streamed to disk shard by shard; calling again with the same settings resumes
        d_r = af.robustify(robust, source, steps=steps, out=out / "d_r", shard_size=1024)
        d_det = af.nonrobustify(standard, source, mode="det", eps=0.5, steps=50, out=out / "d_det")
        d_r = af.ConstructedDataset.load(out / "d_r")  # safe loading: checksums, no pickle
        print(d_r, f"median relative distance {float(d_r.meta['rel_distance'].median()):.3f}")
        print(d_det, f"targets reached {float(d_det.meta['target_reached'].double().mean()):.1%}")
        torch.manual_seed(0)
        report("standard training on D_R", train(MyNet(), d_r, "standard", epochs), test_set)
        torch.manual_seed(0)
        report("standard training on D_det", train(MyNet(), d_det, "standard", epochs), test_set)


if __name__ == "__main__":
    main()
