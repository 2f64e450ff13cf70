"""A map of when non-robust features generalise: D_rand and D_det real-test accuracy against the axes that the
public record says matter, with the critics' leakage probe in every cell.

The paper shows one point of this map (CIFAR-10, eps 0.5, 50,000 images, ResNet-50); its critics argue that the
effect depends on the attack's budget, the source size, the learner, how long the source model was trained, the
attack's step rule and how long the learner trains. A **cell** fixes every axis:

* ``mode`` (``rand`` / ``det``), ``eps`` (the L2 budget), ``n`` (the first N training images),
* ``learner`` (``cnn``: the SmallCNN, ``mlp``: a 1024-unit MLP, ``resnet``: a SmallResNet),
* ``source_epochs``: how long the standard source model trains (``0``: the ``--from`` run's own standard model),
* ``rule``: the construction (``rules()``: ``default`` is nonrobustify's default, ``fixed`` 50 constant steps of
  0.2, ``kumano`` Kumano et al.'s 100 constant steps of eps/5 keeping the best iterate, ``quarter`` 50 constant
  steps of eps/4, nonrobustify's default; ``default`` is 25 cosine steps from eps, a name the sweeps' caches
  use),
* ``learner_epochs``, and ``seed`` (the source model, the targets, the learner and the probe).

Two designs: ``grid`` (every combination of the ``--vary`` values) and ``axes`` (the ``--base`` point, then
each ``--vary`` axis moved alone from it). Two ways to get the models:

    # on a finished replicate run: its standard model is the source, its robust model the probe's
    advfeat replicate --dataset fashion-mnist --scale full --out runs/fmnist_full
    advfeat map --from runs/fmnist_full --out runs/fmnist_map --vary eps=1,2,3
    # self-contained: sources trained here for each source_epochs, a robust model trained for the probe
    advfeat map --dataset fashion-mnist --out runs/fmnist_axes --design axes \\
        --base n=20000 eps=3 rule=fixed source_epochs=5 --vary source_epochs=1,3,15 rule=default,kumano

For each (mode, eps, source, rule, seed) one relabelled set is built from the largest ``n`` that uses it; smaller
sizes are its prefixes (sample ``i`` depends only on the seed and ``i``). Each learner trains on the prefix as
``replicate`` trains its rows 5 and 6 (the run's learning rates) and is scored on the real test set. Every model,
set and cell is cached in ``--out`` (a rerun resumes; one run per folder). Each cell records ``test_accuracy``,
``targets_reached``, ``fit`` (accuracy on the set's own labels: "never fit" told apart from "did not generalise"),
``predicts_shift`` (D_det: the share of test images predicted ``y + 1``, the shifted robust features),
``leakage`` (``advfeat.controls.leakage_probe`` with the robust model on the same prefix: what robust features
alone teach), ``curve`` (the learner's real-test accuracy after every epoch, measured without touching its
training's random streams), ``passes`` (the attack's passes per image) and ``seconds``. ``--measure`` adds
``split``, ``poison`` and ``transfer`` (``map_report.MEASURES``), each a cached stage of its own with its
time as ``<measure>_seconds``. Writes
``map.json`` and ``map.md`` after every cell (``"complete": false`` until the last), and ``map.png``,
``curves.png`` and (with ``transfer``) ``teaching.png`` at the end.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import IO, Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .. import models, steps
from .._io import atomic_write, load_tensors
from .._lock import exclusive, folder_lock
from ..attacks import L2PGD
from ..construct import ConstructedDataset, nonrobustify
from ..construct.controls import leakage_probe
from ..evaluate import shifted_accuracy
from ..train import adversarial_train
from . import settings as rep
from .map_report import MAP_AXES, MEASURES, render, write_figures
from .stages import Run, Stage, curve_of, learning_curve

__all__ = ["build_cells", "build_map", "design", "choose", "rules", "learners", "same_recipe", "render",
           "cell_stages", "Relabelled", "LEARNERS", "AXES", "DEFAULT_BASE", "MEASUREMENTS", "SET_KEY"]

LEARNERS = ("cnn", "mlp", "resnet")
AXES = MAP_AXES


def rules(settings: rep.Settings) -> dict[str, Callable[[float], dict[str, Any]]]:
    """The constructions by name: each gives ``nonrobustify``'s keyword arguments for a budget ``eps``, as
    ``replicate`` would with those ``Settings.nonrobust_*`` fields (``default``: 25 cosine steps from eps, an
    earlier default of nonrobustify (CHANGELOG.md); ``fixed``: 50 constant steps of 0.2; ``kumano``: 100 constant
    steps of eps/5, keeping the best; ``quarter``: 50 constant steps of eps/4, the planted benchmark's choice and
    nonrobustify's default)."""
    def recipe(step: float | None, steps: int, keep_best: bool = False) -> dict[str, Any]:
        return replace(settings, nonrobust_step=step, nonrobust_steps=steps,
                       nonrobust_keep_best=keep_best).nonrobust_kwargs()

    return {  # "default": 25 cosine steps from eps, the rule the cached sweeps' folders are named by
        "default": lambda e: dict(rule=steps.Cosine(), step_size=e, steps=25, keep_best=False),
        "fixed": lambda e: recipe(0.2, 50),
        "kumano": lambda e: recipe(e / 5, 100, keep_best=True),
        "quarter": lambda e: recipe(e / 4, 50),  # the planted rule benchmark's choice (docs/benchmarks.md)
    }


def same_recipe(config: Mapping[str, Any], eps: float, kwargs: Mapping[str, Any]) -> bool:
    """Whether a relabelled set's recorded ``config`` is what ``nonrobustify(eps=eps, **kwargs)`` builds: the
    map reuses a ``--from`` run's own D_rand / D_det only for a cell of that very recipe (the run's sets follow
    its settings and nonrobustify's default of its day, which a cell's ``rule`` may not be)."""
    return (config.get("eps") == eps and config.get("rule") == repr(kwargs["rule"])  # every rule() names both
            and config.get("step_size") == kwargs["step_size"] and config.get("steps") == kwargs["steps"]
            and bool(config.get("keep_best")) == kwargs["keep_best"])


def learners(shape: Sequence[int]) -> dict[str, Callable[[], nn.Module]]:
    c, h = shape[0], shape[1]
    return {
        "cnn": lambda: models.SmallCNN(in_channels=c, size=h),
        "mlp": lambda: models.PlantedNet(shape, hidden=1024),
        "resnet": lambda: models.SmallResNet(in_channels=c),
    }


def design(kind: str, base: Mapping[str, Any], vary: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cells of a ``grid`` (every combination of ``vary``'s values, the rest from ``base``) or of ``axes``
    (``base``, then each axis of ``vary`` moved alone), in order, without repeats."""
    if kind not in ("grid", "axes"):
        raise ValueError(f"--design must be 'grid' or 'axes', got {kind!r}")
    unknown = [k for k in [*base, *vary] if k not in AXES]
    if unknown:
        raise ValueError(f"unknown axes {unknown}: the axes are {', '.join(AXES)}")
    cells: list[dict[str, Any]] = []
    if kind == "grid":
        keys = list(vary)
        for values in itertools.product(*(vary[k] for k in keys)):
            cells.append({**base, **dict(zip(keys, values, strict=True))})
    else:
        cells.append(dict(base))
        for k, options in vary.items():
            cells.extend({**base, k: v} for v in options)
    unique: list[dict[str, Any]] = []
    for c in cells:
        if c not in unique:
            unique.append(c)
    return unique


DEFAULT_BASE: dict[str, Any] = {"mode": "det", "eps": 2.0, "n": 60000, "learner": "cnn", "source_epochs": 0,
                                "rule": "default", "learner_epochs": None, "seed": -1}
"""Axes not given: ``source_epochs`` 0 is the ``--from`` run's standard model, ``learner_epochs`` the run's
``constructed_epochs``, ``seed`` -1 the run's seed (0 without ``--from``)."""


def _check_cell(c: Mapping[str, Any]) -> None:
    """A cell's numbers, checked before any work: a finite eps > 0, at least one image and one learner epoch, a
    source trained 0 (the ``--from`` run's) or more epochs, a seed -1 (the run's) or more."""
    e = c["eps"]
    if isinstance(e, bool) or not isinstance(e, int | float) or not (math.isfinite(e) and e > 0):
        raise ValueError(f"cell {dict(c)}: eps must be a finite number > 0, got {e!r}")
    for axis, least in (("n", 1), ("learner_epochs", 1), ("source_epochs", 0), ("seed", -1)):
        v = c[axis]
        if axis == "learner_epochs" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"cell {dict(c)}: {axis} must be >= {least}, got {v!r}"
                             + (" (leave it out for the run's constructed_epochs)" if axis == "learner_epochs"
                                else ""))


def build_cells(out: str | Path, cells: Sequence[Mapping[str, Any]], *, source: str | Path | None = None,
                dataset: str = "fashion-mnist", scale: str = "full", root: str | None = None,
                progress: bool = True, log: Callable[[str], None] = print,
                measures: Sequence[str] = ()) -> dict[str, Any]:
    """Fill the map's ``cells`` (mappings of the axes; missing axes from ``DEFAULT_BASE``) in ``out``; returns
    what ``map.json`` holds. With ``source`` (a finished ``advfeat replicate --out``) its settings, standard and
    robust models are used; else the settings of ``dataset`` and ``scale`` and models trained here.
    ``measures`` (``map_report.MEASURES``): measurements added to every cell, each a stage of its own (so a
    finished cell keeps its result and gains the measurement); ``poison`` only in D_det cells.

    A cell is a list of ``Stage``s (``cell_stages``: the cell, then each measurement, ``MEASUREMENTS``) run by
    the replication's ``stages.Run``, every result cached as ``stages/<name>.json``."""
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise ValueError(f"measures must be among {', '.join(MEASURES)}; got {', '.join(unknown)}")
    outdir = Path(out)
    src, s, run_seed = _source(source, dataset, scale)
    full = [{**DEFAULT_BASE, **c} for c in cells]
    for c in full:
        _check_cell(c)
        c["seed"] = run_seed if c["seed"] < 0 else c["seed"]
        c["learner_epochs"] = c["learner_epochs"] or s.constructed_epochs
        if c["mode"] not in ("rand", "det"):
            raise ValueError(f"mode must be 'rand' or 'det', got {c['mode']!r}")
        if c["learner"] not in LEARNERS:
            raise ValueError(f"learner must be among {', '.join(LEARNERS)}; got {c['learner']!r}")
        if c["rule"] not in rules(s):
            raise ValueError(f"rule must be among {', '.join(rules(s))}; got {c['rule']!r}")
        if c["source_epochs"] == 0 and src is None:
            raise ValueError("source_epochs 0 means the --from run's standard model: give --from, or source_epochs")
    cache = _Data(s, root)
    for c in full:  # every cell's images exist, before any work
        size = len(cast(Sized, cache(c["seed"])[0]))
        if c["n"] > size:
            raise ValueError(f"cell {c}: n must be at most the {size:,} training images of {s.dataset}, got {c['n']}")
    t_start = time.perf_counter()
    with exclusive(folder_lock(outdir), f"--out {str(outdir)!r}"):
        m = _Map(s, outdir, src, run_seed, cache, full, progress, log)
        results = []
        for c in full:
            name = "_".join(f"{a}{c[a]:g}" if isinstance(c[a], float) else f"{a}{c[a]}" for a in AXES)
            passes = rules(s)[c["rule"]](c["eps"])["steps"]  # forward+backward passes per image of the attack
            done = m.run.stages(cell_stages(m, c, name, measures))
            found = {**c, **done[name], "passes": passes}
            for key in done:  # each measurement's results, its time beside the cell's
                if key != name:
                    measure = key[len(name) + 1:]
                    found.update({f"{measure}_{k}" if k == "seconds" else k: v for k, v in done[key].items()})
            results.append(found)
            result: dict[str, Any] = {
                "from": None if src is None else str(src), "dataset": s.dataset, "settings": rep.settings_record(s),
                "n_test": len(cast(Sized, cache(full[0]["seed"])[1])), "cells": results,
                "complete": len(results) == len(full), "total_seconds": round(time.perf_counter() - t_start, 2)}
            # after every cell, so a sweep of hours can be read (and published) while it runs
            for file, text in (("map.json", json.dumps(result, indent=1)), ("map.md", render(result))):
                atomic_write(outdir / file, partial(_write, text.encode()))
        write_figures(outdir, results)
        log(render(result))
        return result


def _source(source: str | Path | None, dataset: str, scale: str) -> tuple[Path | None, rep.Settings, int]:
    """The ``--from`` run's folder, settings and seed (checked), or the settings of ``dataset`` and ``scale``."""
    if source is None:
        return None, rep.settings_for(dataset, scale), 0
    src = Path(source)
    if not (src / "settings.json").exists() or not (src / "models" / "standard.pt").exists():
        raise ValueError(f"--from {str(src)!r} is not a replicate run with a trained standard model "
                         "(settings.json and models/standard.pt): run `advfeat replicate --out` there first")
    where = f"--from {str(src)!r}: {src / 'settings.json'}"
    try:
        record = json.loads((src / "settings.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is damaged ({type(e).__name__}): is this a replicate run?") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict) or "seed" not in record:
        raise ValueError(f"{where} holds no 'settings' and 'seed': it is not a replicate run's record")
    fields = set(rep.Settings.__dataclass_fields__)
    given: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in record["settings"].items()
                             if k in fields}
    try:
        return src, rep.Settings(**given), int(record["seed"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} holds settings this version cannot read ({e})") from None


class _Data:
    """The settings' training and test sets by seed, each loaded once."""

    def __init__(self, s: rep.Settings, root: str | None) -> None:
        self.s, self.root = s, root
        self.loaded: dict[int, tuple[Dataset[Any], Dataset[Any]]] = {}

    def __call__(self, seed: int) -> tuple[Dataset[Any], Dataset[Any]]:
        if seed not in self.loaded:
            self.loaded[seed] = rep.load_data(self.s, self.root, seed)[:2]
        return self.loaded[seed]


class _Map:
    """What a map's cells share: the replication's ``Run`` over ``out`` (stages cached as ``stages/<name>.json``),
    the data, the models (trained once, checkpointed every epoch, read back; the ``--from`` run's read through the
    checked reader), the relabelled sets (each built once, for the largest ``n`` that uses it), and the learners'
    per-epoch curves."""

    def __init__(self, s: rep.Settings, out: Path, src: Path | None, run_seed: int, data: _Data,
                 full: list[dict[str, Any]], progress: bool, log: Callable[[str], None]) -> None:
        self.s, self.out, self.src, self.run_seed, self.data, self.progress = s, out, src, run_seed, data, progress
        self.run = Run(s, out, torch.device("cpu"), run_seed, progress, log)
        self.curves: dict[str, list[float]] = {}  # a learner's real-test accuracy after every epoch, by name
        self.sizes: dict[tuple[Any, ...], int] = {}
        for c in full:
            k = tuple(c[a] for a in SET_KEY)
            self.sizes[k] = max(self.sizes.get(k, 0), c["n"])
        self.make = learners(tuple(data(full[0]["seed"])[0][0][0].shape))
        self.other_arch = "cnn" if s.model == "SmallResNet" else "mlp"  # planted: a 1024-wide MLP beside its own

    def stage(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        return self.run.stages([Stage(name, fn)])[name]

    def trained(self, name: str, train: Dataset[Any], make: Callable[[], nn.Module], method: str, epochs: int,
                lr: float, seed: int, curve_on: Dataset[Any] | None = None) -> nn.Module:
        """A model trained once (checkpointed every epoch, resumed), then read back from its checkpoint; with
        ``curve_on``, its accuracy there after every epoch (``curves[name]``; the weights are those of a run
        without it)."""
        s = self.s
        torch.manual_seed(seed)
        model = make()
        history = adversarial_train(
            model, DataLoader(train, batch_size=s.batch_size, shuffle=True), method=method,
            attack=L2PGD(s.eps, steps=s.train_steps), epochs=epochs, lr=lr, progress=self.progress,
            checkpoint=self.out / "checkpoints" / f"{name}.pt", resume=True,
            callbacks=[learning_curve(curve_on)] if curve_on is not None else [])
        if curve_on is not None:
            self.curves[name] = curve_of(history)
        return model.eval()

    def from_run(self, name: str) -> nn.Module:
        """The ``--from`` run's model ``name``, through the checked reader (no code from the file runs)."""
        assert self.src is not None
        m = rep.make_model(self.s)
        m.load_state_dict(load_tensors(self.src / "models" / f"{name}.pt", f"the {name} model of the run",
                                       "run advfeat replicate on that folder again to rebuild it", argument="--from"))
        return m.eval()

    def source_model(self, epochs: int, seed: int) -> nn.Module:
        if epochs == 0:
            return self.from_run("standard")
        name = f"source_e{epochs}_s{seed}"
        self.stage(name, lambda: {"epochs": epochs})
        return self.trained(name, self.data(seed)[0], lambda: rep.make_model(self.s), "standard", epochs, self.s.lr,
                            seed)

    def robust_model(self, seed: int) -> nn.Module:
        s = self.s
        if self.src is not None and seed == self.run_seed:
            return self.from_run("robust")
        self.stage(f"robust_s{seed}", lambda: {"epochs": s.robust_epochs, "method": s.robust_method})
        return self.trained(f"robust_s{seed}", self.data(seed)[0], lambda: rep.make_model(s), s.robust_method,
                            s.robust_epochs, s.lr, seed)

    def cell_set(self, c: Mapping[str, Any]) -> ConstructedDataset:
        """The relabelled set a cell trains on: built once, for the largest ``n`` that uses it (a ``--from`` run's
        own finished D_rand / D_det when it is of this very recipe)."""
        s, src = self.s, self.src
        n_max = self.sizes[tuple(c[a] for a in SET_KEY)]
        mode, e, seed = c["mode"], c["eps"], c["seed"]
        if (src is not None and c["source_epochs"] == 0 and s.nonrobust_source_epochs is None
                and seed == self.run_seed and (src / "stages" / f"build_d_{mode}.json").exists()):
            ds = ConstructedDataset.load(src / "datasets" / f"d_{mode}")  # the run's own, finished: reused
            if len(ds) >= n_max and same_recipe(ds.config, e, rules(s)[c["rule"]](e)):  # when built alike
                return ds
        name = f"{mode}_eps{e:g}_src{c['source_epochs']}_{c['rule']}_s{seed}"
        if c["source_epochs"] == 0 and c["rule"] == "default" and seed == self.run_seed:
            name = f"{mode}_eps{e:g}"  # the earlier map's folder names
        folder = self.out / "datasets" / f"{name}_n{n_max}"

        def build() -> dict[str, Any]:
            ds = nonrobustify(self.source_model(c["source_epochs"], seed), Subset(self.data(seed)[0], range(n_max)),
                              mode=mode, eps=e, seed=seed, batch_size=s.batch_size, shard_size=1024,
                              progress=self.progress, out=folder, **rules(s)[c["rule"]](e))
            return {"n": len(ds), "targets_reached": float(ds.meta["target_reached"].double().mean())}

        self.stage(f"build_{name}_n{n_max}", build)
        return ConstructedDataset.load(folder)

    def learner(self, c: Mapping[str, Any], name: str, train: Dataset[Any], lr: float | None = None,
                curve_on: Dataset[Any] | None = None) -> nn.Module:
        """The cell's learner trained on ``train`` (the cell's mode's learning rate unless ``lr``)."""
        rate = lr if lr is not None else (self.s.lr_nr if c["mode"] == "rand" else self.s.lr)
        return self.trained(name, train, self.make[c["learner"]], "standard", c["learner_epochs"], rate, c["seed"],
                            curve_on=curve_on)

    def independent(self, seed: int) -> dict[str, nn.Module]:
        """Standard models the sources never saw, trained here as row 1 is: two of the settings' architecture
        (seeds ``seed`` + 1001, + 1002) and one of another (``other_arch``, + 1003)."""
        s, found = self.s, {}
        for k, arch in ((1, "same"), (2, "same"), (3, self.other_arch)):
            name = f"independent_{arch}{k}_s{seed}"
            build = (lambda: rep.make_model(s)) if arch == "same" else self.make[arch]
            self.stage(name, partial(dict, epochs=s.std_epochs, architecture=arch, seed=seed + 1000 + k))
            found[name] = self.trained(name, self.data(seed)[0], build, "standard", s.std_epochs, s.lr,
                                       seed + 1000 + k)
        return found


SET_KEY = ("mode", "eps", "source_epochs", "rule", "seed")
"""The axes that decide a cell's relabelled set (the other axes share it)."""


def _cell(m: _Map, c: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The cell: its learner on the first ``n`` images of its set, scored on the real test set, its fit, the share
    predicted ``y + 1`` (D_det), its targets reached, the leakage probe and the learner's per-epoch curve."""
    n, seed, ds = c["n"], c["seed"], m.cell_set(c)
    if len(ds) < n:
        raise ValueError(f"--sizes: {n} is more than the {len(ds)} images of the training set")
    prefix: Dataset[Any] = Subset(ds, range(n))
    test = m.data(seed)[1]
    t0 = time.perf_counter()
    model = m.learner(c, name, prefix, curve_on=test)
    train_s = time.perf_counter() - t0
    return {"test_accuracy": shifted_accuracy(model, test), "fit": shifted_accuracy(model, prefix),
            "curve": m.curves[name],
            "predicts_shift": shifted_accuracy(model, test, shift=1) if c["mode"] == "det" else None,
            "targets_reached": float(ds.meta["target_reached"][:n].double().mean()),
            "leakage": leakage_probe(m.robust_model(seed), prefix, test, seed=seed),
            "train_seconds": round(train_s, 2)}


def _split(m: _Map, c: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Learners on the reached and the unreached parts apart (equal sizes) and on the unperturbed images with the
    set's labels (the same size)."""
    n, seed, ds = c["n"], c["seed"], m.cell_set(c)
    reached = ds.meta["target_reached"][:n].bool()
    parts = {"reached": reached.nonzero().squeeze(1), "unreached": (~reached).nonzero().squeeze(1)}
    size = min(len(v) for v in parts.values())
    out: dict[str, Any] = {"split_size": size, "reached_teaches": None, "unreached_teaches": None,
                           "random_labels_teach": None}
    if size == 0:
        return out
    g = torch.Generator().manual_seed(seed)
    chosen = {k: v[torch.randperm(len(v), generator=g)[:size]].sort().values.tolist() for k, v in parts.items()}
    chosen["random_labels"] = torch.randperm(n, generator=g)[:size].sort().values.tolist()
    for part, idx in chosen.items():
        train: Dataset[Any] = (Subset(ds, idx) if part != "random_labels" else
                               Relabelled(Subset(m.data(seed)[0], idx), ds.labels[idx]))
        model = m.learner(c, f"{name}_{part}", train)
        out[f"{part}_teaches" if part != "random_labels" else "random_labels_teach"] = \
            shifted_accuracy(model, m.data(seed)[1])
    return out


def _poison(m: _Map, c: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A learner on D_det's images with their true labels, and one on the clean images with theirs."""
    n, seed, ds = c["n"], c["seed"], m.cell_set(c)
    poisoned = Relabelled(Subset(ds, range(n)), ds.meta["original_label"][:n].long())
    model = m.learner(c, f"{name}_poison", poisoned, lr=m.s.lr)
    clean_name = f"clean_n{n}_{c['learner']}_e{c['learner_epochs']}_s{seed}"
    clean = m.learner(c, clean_name, Subset(m.data(seed)[0], range(n)), lr=m.s.lr)
    return {"poison_accuracy": shifted_accuracy(model, m.data(seed)[1]),
            "clean_accuracy": shifted_accuracy(clean, m.data(seed)[1])}


def _transfer(m: _Map, c: Mapping[str, Any], name: str) -> dict[str, Any]:
    """How often independently trained models classify the set's images (those whose label moved) as the set's
    label: its perturbations' transfer, beside the same for the unperturbed images (the control)."""
    n, seed, ds = c["n"], c["seed"], m.cell_set(c)
    x, t = ds.tensors()
    moved = (t[:n] != ds.meta["original_label"][:n]).nonzero().squeeze(1)
    clean = torch.stack([m.data(seed)[0][int(i)][0] for i in moved]) if len(moved) else x[:0]
    rates = {k: (shifted_accuracy(model, TensorDataset(x[moved], t[moved])),
                 shifted_accuracy(model, TensorDataset(clean, t[moved])))
             for k, model in m.independent(seed).items()}
    same = [v for k, v in rates.items() if "_same" in k]
    other = [v for k, v in rates.items() if "_same" not in k]
    return {"transfer_same": sum(r for r, _ in same) / len(same), "transfer_other": other[0][0],
            "transfer_clean": sum(r for _, r in same) / len(same), "transfer_other_arch": m.other_arch,
            "transfer_n": len(moved)}


MEASUREMENTS: dict[str, Callable[[_Map, Mapping[str, Any], str], dict[str, Any]]] = {
    "split": _split, "poison": _poison, "transfer": _transfer}
"""The measurements ``--measure`` adds to a cell, in the order they run: each a stage factory's function."""


def cell_stages(m: _Map, c: Mapping[str, Any], name: str, measures: Sequence[str]) -> list[Stage]:
    """A cell as a list of stages: the cell itself (``name``), then each measurement of ``measures`` that applies
    (``poison`` to D_det cells only) as ``<name>_<measurement>``, each needing the cell."""
    stages = [Stage(name, partial(_cell, m, c, name))]
    for measure, fn in MEASUREMENTS.items():
        if measure in measures and (measure != "poison" or c["mode"] == "det"):
            stages.append(Stage(f"{name}_{measure}", partial(fn, m, c, name), (name,)))
    return stages


class Relabelled(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``base``'s images with the labels ``labels`` (one per sample, in order)."""

    def __init__(self, base: Dataset[Any], labels: torch.Tensor) -> None:
        self.base, self.labels = base, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base[i][0], self.labels[i]


def build_map(source: str | Path, out: str | Path, *, eps: Sequence[float] = (1.0, 2.0, 3.0),
              sizes: Sequence[int] = (5000, 20000, 60000), learner_names: Sequence[str] = LEARNERS,
              epochs: int | None = None, root: str | None = None, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """The first map's grid on the ``advfeat replicate`` run in ``source``: both modes x ``eps`` x ``sizes`` x
    ``learner_names`` through the run's standard model and default rule; returns what ``map.json`` holds."""
    cells = design("grid", {"learner_epochs": epochs} if epochs else {},
                   {"eps": list(eps), "mode": ["rand", "det"], "n": list(sizes), "learner": list(learner_names)})
    return build_cells(out, cells, source=source, root=root, progress=progress, log=log)


def choose(cells: Sequence[Mapping[str, Any]], *, n: int = 20000, seed: int = 0, leakage_max: float = 0.12,
           targets_min: float = 0.90, tie: float = 0.01) -> tuple[Mapping[str, Any] | None, str]:
    """The protocol of docs/replication.md, applied to a map's cells: among the D_det cells of ``n`` images and
    ``seed`` whose leakage probe is at most ``leakage_max`` and whose targets reached is at least ``targets_min``
    (admissible), the highest real-test accuracy; a cell within ``tie`` of it with fewer attack passes per image
    wins (the fewest passes, then the higher accuracy). Returns the chosen cell (None when no cell is admissible)
    and the reading, a line per candidate."""
    pool = [c for c in cells if c["mode"] == "det" and c["n"] == n and c["seed"] == seed]
    admissible = [c for c in pool if c["leakage"] <= leakage_max and c["targets_reached"] >= targets_min]
    def setting(c: Mapping[str, Any]) -> str:
        return ", ".join(f"{a} {c[a]}" for a in AXES if a not in ("mode", "n", "seed"))

    lines = []
    for c in pool:
        why = [f"leakage {100 * c['leakage']:.1f}% > {100 * leakage_max:.1f}%"] if c["leakage"] > leakage_max else []
        if c["targets_reached"] < targets_min:
            why.append(f"targets {100 * c['targets_reached']:.1f}% < {100 * targets_min:.0f}%")
        lines.append(f"- {setting(c)}: {100 * c['test_accuracy']:.1f}%, "
                     + ("admissible" if not why else "not admissible (" + "; ".join(why) + ")"))
    if not admissible:
        return None, "\n".join(lines + ["no admissible cell"])
    best = max(c["test_accuracy"] for c in admissible)
    near = [c for c in admissible if c["test_accuracy"] >= best - tie]
    chosen = min(near, key=lambda c: (c.get("passes", 0), -c["test_accuracy"]))
    return chosen, "\n".join(lines + [f"chosen: {setting(chosen)} ({100 * chosen['test_accuracy']:.1f}%; "
                                      f"{len(admissible)} of {len(pool)} cells admissible)"])


def _write(data: bytes, f: IO[bytes]) -> None:
    f.write(data)
