"""``replicate``: the six experiments and the critics' controls as lists of declared stages, and the report."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sized
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .. import figures, models, report
from .._checks import check_device, describe_differences
from .._io import atomic_write
from .._lock import exclusive, folder_lock
from ..attacks import L2PGD
from ..construct import ConstructedDataset, nonrobustify, robustify
from ..construct.controls import leakage_probe, shortcut, wrong_labels
from ..evaluate import shifted_accuracy
from ..steps import Cosine
from ..transfer import transfer_rates
from . import claims, spread
from .settings import Settings, load_data, make_model, settings_for, settings_record
from .stages import Run, Stage

__all__ = ["replicate", "CONSTRUCTED"]


def replicate(
    dataset: str = "planted",
    *,
    root: str | None = None,
    out: str | Path = "replication",
    scale: str = "quick",
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    transfer: bool = False,
    controls: bool = False,
    log: Callable[[str], None] = print,
    standard_model: str | Path | None = None,
    robust_model: str | Path | None = None,
    checkpoint_arch: str = "resnet50",
    checkpoint_width: int = 64,
) -> dict[str, Any]:
    """Run the replication; returns what ``results.json`` holds. See the module docs.

    ``transfer=True`` adds the paper's Figure 3: several architectures trained on D_det, each one's test
    accuracy beside the rate at which the standard model's adversarial examples transfer to it.

    ``controls=True`` adds the critics' controls (``advfeat.controls``) after the six experiments: rows
    ``d_det_bugs``, ``leakage_rand``, ``leakage_det``, ``shortcut_rand``, ``shortcut_det`` and ``distill_wrong``.

    ``standard_model`` / ``robust_model`` (CIFAR-10 only): robustness-library checkpoints (the paper's own
    ``cifar_nat.pt``, ``cifar_l2_0_5.pt``, of architecture ``checkpoint_arch`` and ``checkpoint_width``; read by
    ``advfeat.models.from_robustness``) used instead of training rows 1 and 2; the constructions run through
    them. A cached stage is not redone: use a fresh ``out`` for other checkpoints.

    One run at a time per ``out``: a second one stops at once with ``advfeat.InUseError`` naming the
    process that holds the folder (the lock dies with that process, so a killed run blocks nothing).
    """
    s = settings_for(dataset, scale)
    figures.require()  # the report's figures: fail before hours of work, naming the extra
    outdir = Path(out)
    paths = {k: Path(v) for k, v in (("standard", standard_model), ("robust", robust_model)) if v is not None}
    if paths and s.dataset != "cifar10":
        raise ValueError("--standard-model / --robust-model take the robustness library's CIFAR-10 checkpoints: "
                         f"use them with --dataset cifar10, not {s.dataset!r}")
    dev = check_device("device", device)
    given = {k: models.from_robustness(v, arch=checkpoint_arch, width=checkpoint_width, map_location=dev)
             for k, v in paths.items()}  # read (and checked) before anything is written
    with exclusive(folder_lock(outdir), f"--out {str(outdir)!r}"):
        record = _same_settings(outdir, {"settings": settings_record(s), "seed": seed,
                                         "sources": {k: str(v) for k, v in paths.items()}})
        run = Run(s, outdir, dev, seed, progress, log)
        run.given = given
        run.started = record
        return _replicate(run, root, transfer, controls, {k: str(v) for k, v in paths.items()})



def _same_settings(out: Path, record: dict[str, Any]) -> Callable[[], None]:
    """A cached stage is only reused by a run with the same settings: ``out/settings.json`` records them, and a
    run with other settings stops before it mixes its results with the cache's."""
    f = out / "settings.json"
    if f.exists() or f.is_symlink():
        if not f.is_file():
            raise ValueError(f"--out {str(out)!r}: {f} is not a regular file (a FIFO, a folder or a broken link); "
                             "remove it, or use another --out")
        try:
            before = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"--out {str(out)!r}: {f} is damaged ({type(e).__name__}); delete the folder to start "
                             "afresh, or use another --out") from None
        if not isinstance(before, dict):
            raise ValueError(f"--out {str(out)!r}: {f} does not hold a settings record; delete the folder to start "
                             "afresh, or use another --out")
        if before != record:
            diff = [describe_differences(before.get("settings", {}), record["settings"]),
                    describe_differences({k: before.get(k) for k in ("seed", "sources")},
                                         {k: record[k] for k in ("seed", "sources")})]
            raise ValueError(f"--out {str(out)!r} holds the stages of a run with other settings ("
                             + "; ".join(d for d in diff if d) + "): use another --out, or delete this one to "
                             "start afresh")
        return lambda: None

    def write() -> None:  # called once the run has started work: a run that fails on its data leaves no record
        if not f.exists():
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(f, lambda fh: fh.write(json.dumps(record, indent=1).encode()))

    return write


CONSTRUCTED = ("d_r", "d_nr", "d_rand", "d_det")
"""The constructed sets of the six experiments, in the order they are built and learned."""


def _experiment_stages(run: Run, train: Dataset[Any], test: Dataset[Any], source: Dataset[Any],
                       planted: Any, sources: dict[str, str]) -> list[Stage]:
    """The six experiments and the control, in run order."""
    s = run.s
    stages = [Stage(name, partial(_given, run, run.given[name], test, sources[name])) if name in run.given
              else Stage(name, partial(run.train, name, train, test, method, epochs, square=True))
              for name, method, epochs in (("standard", "standard", s.std_epochs),
                                           ("robust", s.robust_method, s.robust_epochs))]
    if s.nonrobust_source_epochs is not None:  # a standard model of that length: the one the attacks relabel by
        stages.append(Stage("source", partial(run.train, "source", train, test, "standard",
                                              s.nonrobust_source_epochs)))
    for name in CONSTRUCTED:
        model = ("robust" if name == "d_r" else "standard") if name in ("d_r", "d_nr") else run.source
        lr = s.lr_nr if name in ("d_nr", "d_rand") else s.lr
        stages += [Stage(f"build_{name}", partial(_construct, run, name, model, source, planted), (model,)),
                   Stage(name, partial(_learn, run, name, test, lr), (f"build_{name}",))]
    stages.append(Stage("d_det_shift", partial(_shift, run, test), ("d_det",)))
    if not _control_is_row_1(run, train):
        stages.append(Stage("control", partial(run.train, "control", source, test, "standard",
                                               s.constructed_epochs, square=True)))
    return stages


def _control_stages(run: Run, train: Dataset[Any], test: Dataset[Any], source: Dataset[Any]) -> list[Stage]:
    """The critics' controls (``advfeat.controls``), in run order. The cheap ones come first (Goh's leakage probes
    take seconds; the shortcuts and Wallace's distillation one model each), so a long run shows them early; the
    bugs set, whose ensemble of standard models is most of the cost, comes last."""
    s, seed = run.s, run.seed
    stages = [Stage(f"leakage_{mode}", partial(_leakage, run, mode, test), ("robust", f"build_d_{mode}"))
              for mode in ("rand", "det")]
    for mode in ("rand", "det"):
        lr = s.lr_nr if mode == "rand" else s.lr
        stages += [Stage(f"build_shortcut_{mode}", partial(_build_shortcut, run, mode, source), (run.source,)),
                   Stage(f"shortcut_{mode}", partial(_learn, run, f"shortcut_{mode}", test, lr),
                         (f"build_shortcut_{mode}",))]
    stages += [Stage("weak", partial(run.train, "weak", train, test, "standard", s.weak_epochs, seed=seed + 100)),
               Stage("distill_wrong", partial(_distill, run, train, test), ("weak",))]
    # independently trained standard models: the ones the bugs must not fool (seeds seed+1, seed+2, ...), and a fresh
    # one to measure transfer, whose seed no ensemble member can take whatever the ensemble's size
    members = _ensemble(run)
    stages += [Stage(name, partial(run.train, name, train, test, "standard", s.std_epochs, seed=model_seed,
                                   robust=False)) for name, model_seed in members.items()]
    stages += [Stage("build_d_det_bugs", partial(_build_bugs, run, source), (run.source, *members)),
               Stage("d_det_bugs", partial(_learn, run, "d_det_bugs", test, s.lr), ("build_d_det_bugs",)),
               Stage("d_det_transfer", partial(_transfer_rate, run, "d_det"), ("build_d_det", "transfer_probe"))]
    return stages


def _replicate(run: Run, root: str | None, transfer: bool, controls: bool, sources: dict[str, str]
               ) -> dict[str, Any]:
    s, outdir, seed, log = run.s, run.out, run.seed, run.log
    t_start = time.perf_counter()
    train, test, planted = load_data(s, root, seed)
    run.started()
    source: Dataset[Any] = Subset(train, range(_construct_count(s, train)))
    done = run.stages(_experiment_stages(run, train, test, source, planted, sources))
    results = {name: _row(done, name) for name in ("standard", "robust", *CONSTRUCTED)}
    results["d_det"]["predicts_y_plus_1"] = done["d_det_shift"]["value"]
    results["control"] = done["control"] if "control" in done else {**done["standard"], "seconds": 0.0,
                                                                      "same_as": "standard"}
    extra: dict[str, Any] = {"source": done["source"]} if "source" in done else {}  # results.json beside the rows
    if controls:
        c = run.stages(_control_stages(run, train, test, source))
        results |= {name: _row(c, name) for name in ("leakage_rand", "leakage_det", "shortcut_rand", "shortcut_det",
                                                     "distill_wrong", "d_det_bugs")}
        results["d_det"]["transfer_rate"] = c["d_det_transfer"]["value"]
    built = {name: ConstructedDataset.load(outdir / "datasets" / name) for name in CONSTRUCTED}
    summary: dict[str, Any] = {"settings": settings_record(s), "seed": seed, "device": str(run.device),
                               "rows": results, "labels": {k: report.SHORT[k] for k in results}, "paper": report.PAPER,
                               **extra}
    if transfer:
        summary["transfer"] = list(run.stages(
            [Stage(f"transfer_{arch}", partial(_transfer, run, arch, make, test), ("build_d_det", run.source))
             for arch, make in _architectures(s).items()]).values())
        t = list(summary["transfer"])
        if "d_det_bugs" in results:  # the bugs set as a point (the authors' reply: it sits near the origin)
            b = results["d_det_bugs"]
            t.append({"architecture": "bugs (same as source)", "test_accuracy": b["clean"],
                      "transfer_rate": b["transfer_rate"]})
        figures.save(figures.transfer_scatter([r["transfer_rate"] for r in t], [r["test_accuracy"] for r in t],
                                              [r["architecture"] for r in t]), outdir / "grids" / "transfer.png")
    published = spread.published(summary)
    report.draw(outdir, summary, train, built, spread.ranges(summary, published))
    summary["total_seconds"] = round(time.perf_counter() - t_start, 2)
    results_json = json.dumps(summary, indent=1).encode()
    atomic_write(outdir / "results.json", lambda f: f.write(results_json))
    section = "" if published is None else spread.placement(summary, published) + "\n" + claims.section(summary)
    markdown = report.render_report(summary, section)
    atomic_write(outdir / "report.md", lambda f: f.write(markdown.encode()))
    log(markdown)
    return summary


def _row(done: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """A row of the results: its stage's record, with its set's construction (``build_<name>``) when it has one
    and the time of both."""
    r, c = done[name], done.get(f"build_{name}")
    return dict(r) if c is None else {**r, **c, "seconds": r["seconds"] + c["seconds"]}


def _construct_count(s: Settings, train: Dataset[Any]) -> int:
    """How many training images the constructed sets come from (the first ``n_construct``; all by default)."""
    n = len(cast(Sized, train))
    return n if s.n_construct is None else min(s.n_construct, n)


def _control_is_row_1(run: Run, train: Dataset[Any]) -> bool:
    """Whether the same-size control would train row 1 again: the sets come from all of D, learned as row 1 is
    (same data, order, lr and epochs) by a model the run trains itself."""
    s = run.s
    return (_construct_count(s, train) == len(cast(Sized, train)) and s.constructed_epochs == s.std_epochs
            and "standard" not in run.given)


def _construct(run: Run, name: str, model: str, source: Dataset[Any], planted: Any) -> dict[str, Any]:
    """Build one of the four sets from ``source`` through the run's model ``model``."""
    s = run.s
    common: dict[str, Any] = dict(out=run.out / "datasets" / name, device=run.device, progress=run.progress,
                                  seed=run.seed, batch_size=s.batch_size, shard_size=1024)
    if name in ("d_r", "d_nr"):
        ds = robustify(run.load_model(model), source, steps=s.robustify_steps, step_size=s.robustify_step, **common)
        d = ds.meta["rel_distance"]
        info = {"rel_distance_median": float(d.median()), "rel_distance_p90": float(d.quantile(0.9))}
    else:
        ds = nonrobustify(run.load_model(model), source, mode=name[2:], eps=s.nonrobust_eps, **s.nonrobust_kwargs(),
                          **common)
        info = {"targets_reached": float(ds.meta["target_reached"].double().mean())}
    if planted is not None:
        x, _ = ds.tensors()
        fa, fb = planted.features(x)
        y = ds.meta["original_label"] if "original_label" in ds.meta else ds.labels
        info["robust_feature_says_y"] = float((fa.argmax(1) == y).double().mean())
        info["nonrobust_feature_says_y"] = float((fb.argmax(1) == y).double().mean())
        info["nonrobust_feature_says_label"] = float((fb.argmax(1) == ds.labels).double().mean())
    return {"construction": info, "n": len(ds)}


def _learn(run: Run, name: str, test: Dataset[Any], lr: float) -> dict[str, Any]:
    """A fresh standard model trained on the built set ``datasets/<name>`` and evaluated; D_rand's and D_det's
    learners with their per-epoch real-test curve."""
    built = ConstructedDataset.load(run.out / "datasets" / name)
    return run.train(name, built, test, "standard", run.s.constructed_epochs, lr, curve=name in ("d_rand", "d_det"),
                     square=name in ("d_r", "d_nr"))


def _given(run: Run, model: nn.Module, test: Dataset[Any], source: str) -> dict[str, Any]:
    """A stage of an authors' checkpoint: evaluated, not trained, with where it came from."""
    return {**run.evaluate(model, test), "source": source}


def _leakage(run: Run, mode: str, test: Dataset[Any]) -> dict[str, Any]:
    """Goh's probe on D_<mode>: a linear classifier on the robust model's logits, scored on the real test set."""
    ds = ConstructedDataset.load(run.out / "datasets" / f"d_{mode}")
    return {"clean": leakage_probe(run.load_model("robust"), ds, test, device=run.device, seed=run.seed),
            "n": len(ds), "features": "logits"}


def _build_shortcut(run: Run, mode: str, source: Dataset[Any]) -> dict[str, Any]:
    """Jordan's class-keyed shortcut control in place of D_<mode>'s perturbations."""
    s = run.s
    ds = shortcut(run.load_model(run.source), source, mode=mode, eps=s.nonrobust_eps, seed=run.seed,
                  device=run.device, out=run.out / "datasets" / f"shortcut_{mode}", progress=run.progress,
                  batch_size=s.batch_size, shard_size=1024)
    return {"targets_reached": float(ds.meta["target_reached"].double().mean()), "n": len(ds)}


def _distill(run: Run, train: Dataset[Any], test: Dataset[Any]) -> dict[str, Any]:
    """Wallace's distillation: a fresh model learns the weak model's wrong labels alone."""
    wrong = wrong_labels(run.load_model("weak"), train, device=run.device, progress=run.progress)
    r = run.train("distill_wrong", wrong, test, "standard", run.s.constructed_epochs)
    return {**r, "n": len(wrong), "teacher_accuracy": run.done["weak"]["clean"]}


def _ensemble(run: Run) -> dict[str, int]:
    """The bugs' ensemble members and the fresh transfer probe, with their seeds."""
    seed = run.seed
    return {f"ensemble_{i}": seed + 1 + i for i in range(run.s.controls_ensemble)} | {"transfer_probe": seed + 10_000}


def _transfer_rate(run: Run, name: str) -> dict[str, Any]:
    """The share of the relabelled set ``datasets/<name>`` that the fresh model classifies as the new label."""
    x, t = ConstructedDataset.load(run.out / "datasets" / name).tensors()
    return {"value": shifted_accuracy(run.load_model("transfer_probe"), TensorDataset(x, t), device=run.device)}


def _build_bugs(run: Run, source: Dataset[Any]) -> dict[str, Any]:
    """Nakkiran's bugs: D_det's targets reached while the independently trained ensemble stays right."""
    s = run.s
    ensemble = [run.load_model(n) for n in _ensemble(run) if n.startswith("ensemble_")]
    ds = nonrobustify(run.load_model(run.source), source, mode="det", eps=s.controls_eps, rule=Cosine(),
                      step_size=s.controls_eps, steps=s.controls_steps, keep_correct=ensemble,
                      out=run.out / "datasets" / "d_det_bugs", device=run.device, progress=run.progress,
                      seed=run.seed, batch_size=s.batch_size, shard_size=1024)
    return {"targets_reached": float(ds.meta["target_reached"].double().mean()),
            "transfer_rate": _transfer_rate(run, "d_det_bugs")["value"], "n": len(ds)}


def _architectures(s: Settings) -> dict[str, Callable[[], nn.Module]]:
    """The architectures trained on D_det for the transfer experiment."""
    if s.dataset == "planted":
        shape, size = (1, 16, 16), 16
    elif s.dataset == "cifar10":
        shape, size = (3, 32, 32), 32
    else:
        shape, size = (1, 28, 28), 28
    d = shape[0] * shape[1] * shape[2]
    return {
        "linear": lambda: nn.Sequential(nn.Flatten(), nn.Linear(d, 10)),
        "mlp-64": lambda: models.PlantedNet(shape, hidden=64),
        "mlp-1024": lambda: models.PlantedNet(shape, hidden=1024),
        "cnn": lambda: models.SmallCNN(in_channels=shape[0], size=size),
        "same as source": lambda: make_model(s),
    }


def _transfer(run: Run, arch: str, make: Callable[[], nn.Module], test: Dataset[Any]) -> dict[str, Any]:
    """Figure 3's point for ``arch``: its test accuracy after learning D_det, and the rate at which the source's
    adversarial examples transfer to it."""
    s = run.s
    name = f"transfer_{arch.replace(' ', '_')}"
    d_det = ConstructedDataset.load(run.out / "datasets" / "d_det")
    acc = run.train(name, d_det, test, "standard", s.constructed_epochs, s.lr, make=make)["clean"]
    target = run.load_model(name, make)
    torch.manual_seed(run.seed)
    rate = transfer_rates(run.load_model(run.source), {arch: target}, DataLoader(test, batch_size=500),
                          L2PGD(s.eps, steps=s.eval_steps, rel_step_size=0.2), device=run.device)[arch]
    return {"architecture": arch, "test_accuracy": acc, "transfer_rate": rate}


def _shift(run: Run, test: Dataset[Any]) -> dict[str, Any]:
    """How often the D_det model predicts y + 1 on the real test set (the shifted robust features)."""
    return {"value": shifted_accuracy(run.load_model("d_det"), test, shift=1, device=run.device)}
