"""The caller's loader feeds the constructions: images per second with 0 and 2 workers on a dataset that decodes.

    python benchmarks/loader_workers.py [--device cpu|cuda] [--n 2048] [--decode-ms 1.0] [--repeats 3]

The dataset stores each 3x64x64 image zlib-compressed and decodes it on every read, plus a fixed amount of
numpy work per image standing in for JPEG decoding (``--decode-ms`` on this machine, calibrated at start).
``nonrobustify(model, DataLoader(ds, batch_size=128, num_workers=w), steps=2)`` is timed for w = 0 and 2,
interleaved, in one run; the sets are checked bitwise equal. The model is a linear classifier by default (the
attack cheap next to the decoding, as a GPU makes it) or ``--model resnet`` (a SmallResNet: on a CPU the attack
then dominates and the workers compete with it for the same cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
import zlib

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import advfeat as af


class Compressed(Dataset[tuple[torch.Tensor, int]]):
    """zlib-compressed uint8 images, decoded (and ``work`` rounds of numpy filtering) on every read."""

    def __init__(self, n: int, work: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.blobs = [zlib.compress(rng.integers(0, 256, (3, 64, 64), dtype=np.uint8).tobytes()) for _ in range(n)]
        self.labels = rng.integers(0, 10, n)
        self.work = work

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = np.frombuffer(zlib.decompress(self.blobs[i]), dtype=np.uint8).reshape(3, 64, 64).astype(np.float32)
        for _ in range(self.work):  # a separable box blur, then undone in effect by the clip: a decoder's cost
            img = np.clip((img + np.roll(img, 1, 1) + np.roll(img, 1, 2)) / 3.0, 0, 255)
        return torch.from_numpy(img / 255.0), int(self.labels[i])


def calibrate(ms: float) -> int:
    """Rounds of filtering that take about ``ms`` milliseconds per image here."""
    ds = Compressed(64, 1)
    t = time.perf_counter()
    for i in range(64):
        ds[i]
    per_round = (time.perf_counter() - t) / 64 * 1000
    return max(1, round(ms / per_round))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--decode-ms", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", choices=("linear", "resnet"), default="linear")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the main process (default 1: the "
                    "attack on one core, as a GPU host's feeding process leaves the other cores to the workers)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    work = calibrate(args.decode_ms)
    ds = Compressed(args.n, work)
    torch.manual_seed(0)
    model = (af.models.SmallResNet(in_channels=3) if args.model == "resnet"
             else torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 10))).to(dev).eval()
    warnings.simplefilter("ignore", af.construct.LowTargetsWarning)  # 2 steps: the reading is measured
    times: dict[int, list[float]] = {0: [], 2: []}
    built: dict[int, af.ConstructedDataset] = {}
    for _ in range(args.repeats):
        for w in (0, 2):
            loader = DataLoader(ds, batch_size=128, num_workers=w, pin_memory=dev.type == "cuda")
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            built[w] = af.nonrobustify(model, loader, mode="det", eps=2.0, steps=2, progress=False)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[w].append(time.perf_counter() - t)
    same = all(torch.equal(a, b) for a, b in zip(built[0].tensors(), built[2].tensors(), strict=True))
    rate = {w: args.n / statistics.median(ts) for w, ts in times.items()}
    print(f"device {dev}, {torch.get_num_threads()} threads, {args.n} images 3x64x64, decode ~{args.decode_ms} ms "
          f"per image ({work} rounds), nonrobustify steps=2 on a {args.model} model, median of {args.repeats}")
    print("| workers | images / s | vs 0 workers |")
    print("|---|---|---|")
    for w in (0, 2):
        print(f"| {w} | {rate[w]:.0f} | {rate[w] / rate[0]:.2f} |")
    print(f"bitwise the same set with 0 and 2 workers: {same}")
    if not same:
        raise SystemExit("the sets differ")


if __name__ == "__main__":
    main()
