"""D_det on Fashion-MNIST: which standard model and how many source images let it generalise.

The numbers in docs/results.md ("D_det on Fashion-MNIST: settings tried") come from this script:

    python scripts/ddet_fashion_mnist.py --standard replication/models/standard.pt --n 20000
    python scripts/ddet_fashion_mnist.py --standard long --epochs 15 --n 5000

``--standard PATH`` loads the standard SmallCNN of a ``advfeat replicate --dataset fashion-mnist`` run;
``--standard long`` trains one here (``--epochs``, no weight decay). D_det is built from the first ``--n``
training images with targeted L2 PGD (``--eps``, ``--steps`` of ``--step-size``), a fresh SmallCNN is trained
on it (10 epochs, lr 0.05) and scored on the first 2,000 test images. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader, Subset

import advfeat as af


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--standard", required=True, help="a standard model's state_dict, or 'long'")
    ap.add_argument("--epochs", type=int, default=15, help="with --standard long")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--eps", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--step-size", type=float, default=0.1)
    ap.add_argument("--root", default=None)
    args = ap.parse_args()
    af.allocator.tune()
    root = args.root or af.data.FASHION_MNIST_ROOT
    train = af.data.fashion_mnist(root, train=True)
    test = Subset(af.data.fashion_mnist(root, train=False), range(2000))
    torch.manual_seed(0)
    std = af.models.SmallCNN()
    if args.standard == "long":
        af.adversarial_train(std, DataLoader(train, batch_size=128, shuffle=True), method="standard",
                             epochs=args.epochs, lr=0.05, weight_decay=0.0, progress=False)
    else:
        std.load_state_dict(torch.load(args.standard, weights_only=True))
    std.eval()
    std_eval = af.evaluate(std, DataLoader(test, batch_size=500), {"l2_1.0": af.L2PGD(1.0, steps=20)},
                           progress=False)
    t0 = time.time()
    d_det = af.nonrobustify(std, Subset(train, range(args.n)), mode="det", eps=args.eps, steps=args.steps,
                            step_size=args.step_size, batch_size=128, progress=False)
    build_s = time.time() - t0
    torch.manual_seed(0)
    model = af.models.SmallCNN()
    af.adversarial_train(model, DataLoader(d_det, batch_size=128, shuffle=True), method="standard", epochs=10,
                         lr=0.05, progress=False)
    model.eval()
    right = plus_one = 0
    with torch.no_grad():
        for x, y in DataLoader(test, batch_size=500):
            p = model(x).argmax(1)
            right += int((p == y).sum())
            plus_one += int((p == (y + 1) % 10).sum())
    print(json.dumps({
        "standard": args.standard, "n": args.n, "eps": args.eps, "steps": args.steps,
        "standard_clean": std_eval.clean_accuracy, "standard_l2_1.0": std_eval.robust_accuracy("l2_1.0"),
        "targets_reached": float(d_det.meta["target_reached"].double().mean()),
        "test_accuracy": right / len(test), "predicts_y_plus_1": plus_one / len(test),
        "build_s": round(build_s), "total_s": round(time.time() - t0)}))


if __name__ == "__main__":
    main()
