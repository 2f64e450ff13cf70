"""A map of when non-robust features generalise: D_rand and D_det test accuracy against the attack's budget,
the source size and the learner.

The paper shows one point of this map (CIFAR-10, eps 0.5, 50,000 images, ResNet-50); its critics argue that
the effect depends on all three. This script fills in the grid on a finished ``advfeat replicate`` run:

    advfeat replicate --dataset fashion-mnist --scale full --out runs/fmnist_full
    python scripts/generalisation_map.py --from runs/fmnist_full --out runs/fmnist_map

For each budget ``--eps`` and mode (rand, det) it builds one relabelled set from the ``max(--sizes)`` first
training images through the run's standard model, with the run's settings (``nonrobustify``'s default rule,
its steps, seed and batch size); the smaller sizes are its prefixes (sample ``i`` depends only on the seed and
``i``), and the run's own D_rand / D_det is reused at its budget. For each size and ``--learners`` (``cnn``: the
SmallCNN, ``mlp``: a 1024-unit MLP, ``resnet``: a SmallResNet) a fresh model is trained on the prefix as
``replicate`` trains its rows 5 and 6 (``--epochs``, the run's learning rates) and scored on the run's real test
set. Every build and training is cached in ``--out`` (a rerun resumes; one run per folder). Writes
``map.json`` (one cell per mode, eps, size and learner: ``test_accuracy``, ``targets_reached`` over the
prefix, ``fit``: the model's accuracy on the relabelled prefix's own labels, so a cell near chance can be told
apart from a learner that never fit its set, ``seconds``: the training's), ``map.md`` and ``map.png``
(``advfeat.figures.generalisation_map``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import advfeat as af
from advfeat import figures, models
from advfeat import replicate as rep
from advfeat._io import atomic_write
from advfeat._lock import exclusive, folder_lock

LEARNERS = ("cnn", "mlp", "resnet")


def learners(shape: Sequence[int]) -> dict[str, Callable[[], nn.Module]]:
    c, h = shape[0], shape[1]
    return {
        "cnn": lambda: models.SmallCNN(in_channels=c, size=h),
        "mlp": lambda: models.PlantedNet(shape, hidden=1024),
        "resnet": lambda: models.SmallResNet(in_channels=c),
    }


def build_map(source: str | Path, out: str | Path, *, eps: Sequence[float] = (1.0, 2.0, 3.0),
              sizes: Sequence[int] = (5000, 20000, 60000), learner_names: Sequence[str] = LEARNERS,
              epochs: int | None = None, root: str | None = None, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fill the map from the ``advfeat replicate`` run in ``source``; returns what ``map.json`` holds."""
    src, outdir = Path(source), Path(out)
    if not (src / "settings.json").exists() or not (src / "models" / "standard.pt").exists():
        raise ValueError(f"--from {str(src)!r} is not a replicate run with a trained standard model "
                         "(settings.json and models/standard.pt): run `advfeat replicate --out` there first")
    unknown = [n for n in learner_names if n not in LEARNERS]
    if unknown or not learner_names:
        raise ValueError(f"--learners must be among {', '.join(LEARNERS)}; got {list(learner_names)!r}")
    if not eps or min(eps) <= 0:
        raise ValueError(f"--eps must be positive budgets; got {list(eps)!r}")
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"--sizes must be positive; got {list(sizes)!r}")
    record = json.loads((src / "settings.json").read_text())
    fields = {f for f in rep.Settings.__dataclass_fields__}
    kept: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in record["settings"].items()
                            if k in fields}
    s = rep.Settings(**kept)
    seed = int(record["seed"])
    train, test, _ = rep._load(s, root, seed)
    n_max = max(sizes)
    if n_max > len(train):  # type: ignore[arg-type]
        raise ValueError(f"--sizes: {n_max} is more than the run's {len(train)} training images")  # type: ignore[arg-type]
    epochs = epochs or s.constructed_epochs
    shape = tuple(train[0][0].shape)
    make = learners(shape)
    standard = rep._model(s)
    standard.load_state_dict(torch.load(src / "models" / "standard.pt", map_location="cpu", weights_only=True))
    standard.eval()
    t_start = time.perf_counter()
    with exclusive(folder_lock(outdir), f"--out {str(outdir)!r}"):
        for sub in ("stages", "datasets", "checkpoints"):
            (outdir / sub).mkdir(parents=True, exist_ok=True)

        def stage(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
            return rep.cached_stage(outdir / "stages", name, fn, log)

        def relabelled(mode: str, e: float) -> tuple[af.ConstructedDataset, float]:
            reused = src / "datasets" / f"d_{mode}"
            if e == s.nonrobust_eps and (src / "stages" / f"build_d_{mode}.json").exists():  # a finished build
                ds = af.ConstructedDataset.load(reused)
                if len(ds) >= n_max:
                    return ds, 0.0
            t0 = time.perf_counter()
            sub = Subset(train, range(n_max))
            ds = af.nonrobustify(standard, sub, mode=mode, eps=e, steps=s.nonrobust_steps, seed=seed,
                                 batch_size=s.batch_size, shard_size=1024, progress=progress,
                                 out=outdir / "datasets" / f"{mode}_eps{e:g}")
            return ds, time.perf_counter() - t0

        def trained(name: str, data: Dataset[Any], learner: str, lr: float) -> nn.Module:
            """The cell's model: trained once, then read back from its finished checkpoint."""
            torch.manual_seed(seed)
            model = make[learner]()
            af.adversarial_train(model, DataLoader(data, batch_size=s.batch_size, shuffle=True), method="standard",
                                 epochs=epochs, lr=lr, checkpoint=outdir / "checkpoints" / f"{name}.pt", resume=True,
                                 progress=progress)
            return model

        def accuracy(model: nn.Module, data: Dataset[Any]) -> float:
            return af.evaluate(model, DataLoader(data, batch_size=500), progress=False).clean_accuracy

        cells = []
        for e in eps:
            for mode in ("rand", "det"):
                ds, build_s = relabelled(mode, e)
                stage(f"build_{mode}_eps{e:g}", dict(build_seconds=round(build_s, 2)).copy)
                lr = s.lr_nr if mode == "rand" else s.lr
                for n in sizes:
                    reached = float(ds.meta["target_reached"][:n].double().mean())
                    for learner in learner_names:
                        name = f"{mode}_eps{e:g}_n{n}_{learner}"
                        data: Dataset[Any] = Subset(ds, range(n))

                        def cell(name: str = name, data: Dataset[Any] = data, learner: str = learner,
                                 lr: float = lr) -> dict[str, Any]:
                            return {"test_accuracy": accuracy(trained(name, data, learner, lr), test)}

                        def fit(name: str = name, data: Dataset[Any] = data, learner: str = learner,
                                lr: float = lr) -> dict[str, Any]:
                            return {"fit": accuracy(trained(name, data, learner, lr), data)}

                        r = stage(name, cell)
                        cells.append({"mode": f"D_{mode}", "eps": e, "n": n, "learner": learner,
                                      "test_accuracy": r["test_accuracy"], "targets_reached": reached,
                                      "fit": stage(f"{name}_fit", fit)["fit"], "seconds": r["seconds"]})
        result = {"from": str(src), "settings": record["settings"], "seed": seed, "epochs": epochs,
                  "n_test": len(test), "cells": cells,  # type: ignore[arg-type]
                  "total_seconds": round(time.perf_counter() - t_start, 2)}
        atomic_write(outdir / "map.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
        markdown = render(result)
        atomic_write(outdir / "map.md", lambda f: f.write(markdown.encode()))
        figures.save(figures.generalisation_map(cells), outdir / "map.png")
        log(markdown)
        return result


def render(result: dict[str, Any]) -> str:
    """The map as Markdown: one row per learner and size, one column per mode and budget; a first table of real
    test accuracy (targets reached), a second of how well each learner fit its relabelled set."""
    cells = result["cells"]
    eps = sorted({c["eps"] for c in cells})
    modes = list(dict.fromkeys(c["mode"] for c in cells))
    rows = list(dict.fromkeys((c["learner"], c["n"]) for c in cells))
    at = {(c["mode"], c["eps"], c["learner"], c["n"]): c for c in cells}

    def table(show: Callable[[dict[str, Any]], str]) -> list[str]:
        lines = ["| learner | source size | " + " | ".join(f"{m} eps {e:g}" for m in modes for e in eps) + " |",
                 "|---|---|" + "---|" * (len(modes) * len(eps))]
        for learner, n in rows:
            vals = [at.get((m, e, learner, n)) for m in modes for e in eps]
            lines.append(f"| {learner} | {n:,} | " + " | ".join("-" if c is None else show(c) for c in vals) + " |")
        return lines

    return "\n".join([
        f"Real test accuracy % ({result['n_test']:,} test images) after training on the relabelled set "
        f"(targets reached %), from the standard model of `{result['from']}`; {result['epochs']} epochs.", "",
        *table(lambda c: f"{100 * c['test_accuracy']:.1f} ({100 * c['targets_reached']:.0f})"), "",
        "Accuracy % on the relabelled training set's own labels (how well each learner fit it):", "",
        *table(lambda c: f"{100 * c['fit']:.1f}")]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", required=True, help="a finished `advfeat replicate --out` folder")
    ap.add_argument("--out", required=True, help="where the map's sets, models and outputs are cached")
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 2.0, 3.0], help="L2 budgets (default 1 2 3)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 60000],
                    help="source sizes: the first N training images (default 5000 20000 60000)")
    ap.add_argument("--learners", nargs="+", default=list(LEARNERS), help="cnn, mlp and/or resnet")
    ap.add_argument("--epochs", type=int, default=None, help="default: the run's constructed_epochs")
    ap.add_argument("--root", default=None, help="the dataset's folder, as given to replicate")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    af.allocator.tune()
    try:
        build_map(args.source, args.out, eps=args.eps, sizes=args.sizes, learner_names=args.learners,
                  epochs=args.epochs, root=args.root, progress=not args.no_progress)
    except (ValueError, af.InUseError) as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
