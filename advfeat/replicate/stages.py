"""A replication run's machinery: stages declared as data (``Stage``), each computed once and cached
(``cached_stage``), and the run they share (``Run``: its settings, folder, device and seed; training, evaluation
and reading back its models)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import models
from .._io import atomic_write, load_tensors
from ..attacks import L2PGD, AutoAttack, Square
from ..evaluate import evaluate
from ..train import Callback, EpochEvaluation, adversarial_train
from .settings import Settings, make_model

__all__ = ["Stage", "Run", "cached_stage", "learning_curve", "curve_of", "cascade_budget", "SQUARE_QUERIES",
           "SQUARE_SAMPLES"]

SQUARE_QUERIES = 1000
"""The Square Attack's queries in the replication's gradient-free check (the reference's default is 5,000; this
budget keeps the check to seconds per row at the quick scale)."""
SQUARE_SAMPLES = 1000
"""The most test images (the first; a quarter of the test set when that is fewer) the gradient-free check
attacks."""


def cascade_budget(s: Settings) -> tuple[int, int]:
    """The AutoAttack cascade's ``(steps, queries)`` in the gradient-free check: the reference's (100 steps of
    APGD, APGD-T and FAB-T, 5,000 Square queries) at the full scale; the run's ``eval_steps`` and
    ``SQUARE_QUERIES`` at the quick scale, which keeps the check to seconds per row."""
    return (100, 5000) if s.scale == "full" else (s.eval_steps, SQUARE_QUERIES)


def cached_stage(folder: Path, name: str, fn: Callable[[], dict[str, Any]],
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """``fn()``'s result, computed once: cached as ``folder/<name>.json`` with its ``seconds``; a later call
    (another run on the same folder) reads it back and logs that it skipped the stage."""
    f = folder / f"{name}.json"
    if f.exists():
        log(f"[{name}] done earlier: skipped")
        done: dict[str, Any] = json.loads(f.read_text())
        return done
    log(f"[{name}] running")
    t0 = time.perf_counter()
    result = fn()
    result["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write(f, lambda fh: fh.write(json.dumps(result, indent=1).encode()))
    log(f"[{name}] {result['seconds']:.1f}s")
    return result



@dataclass(frozen=True)
class Stage:
    """One cached step of a run, declared as data: its ``name`` (the cache file ``stages/<name>.json`` and, for a
    trained model, ``models/<name>.pt``), the stages whose outputs it reads (``needs``: run before it, by the
    run's order) and the function that computes its record."""

    name: str
    compute: Callable[[], dict[str, Any]]
    needs: tuple[str, ...] = ()


def learning_curve(test: Dataset[Any]) -> Callback:
    """The callback that records a learner's real-test accuracy after every epoch (``test_clean_accuracy``),
    without drawing from the training's random streams."""
    return EpochEvaluation(DataLoader(test, batch_size=500), prefix="test_", isolate_rng=True)


def curve_of(history: list[dict[str, Any]]) -> list[float]:
    """The per-epoch real-test accuracies that ``learning_curve`` recorded in a trainer's history."""
    return [float(h["test_clean_accuracy"]) for h in history]


class Run:
    """What the stages of one run share: its settings, folder, device, seed, progress and log, the records of
    the stages run so far (``done``), and the models read from the authors' checkpoints (``given``)."""

    def __init__(self, s: Settings, out: Path, device: torch.device, seed: int, progress: bool,
                 log: Callable[[str], None]) -> None:
        self.s, self.out, self.device, self.seed, self.progress, self.log = s, out, device, seed, progress, log
        self.given: dict[str, nn.Module] = {}  # models read from the authors' checkpoints instead of trained
        self.started: Callable[[], None] = lambda: None  # records the settings once the data is loaded
        self.done: dict[str, dict[str, Any]] = {}  # the records of the stages run so far, by name
        for sub in ("models", "datasets", "stages", "checkpoints", "grids"):
            (out / sub).mkdir(parents=True, exist_ok=True)

    @property
    def source(self) -> str:
        """The model that nonrobustify (D_rand, D_det, the bugs, the shortcut control) and the transfer rates
        attack: row 1's, or the ``source`` stage's when the settings give ``nonrobust_source_epochs``."""
        return "standard" if self.s.nonrobust_source_epochs is None else "source"

    def stages(self, stages: list[Stage]) -> dict[str, dict[str, Any]]:
        """Run ``stages`` in order, each computed once (``cached_stage``); returns their records by name. A stage
        whose ``needs`` have not run (here or earlier in this run) is a declaration error."""
        for st in stages:
            missing = [n for n in st.needs if n not in self.done]
            if missing:
                raise RuntimeError(f"stage {st.name!r} needs {missing} to run before it")
            self.done[st.name] = cached_stage(self.out / "stages", st.name, st.compute, self.log)
        return {st.name: self.done[st.name] for st in stages}

    def train(self, name: str, data: Dataset[Any], test: Dataset[Any], method: str, epochs: int,
              lr: float | None = None, make: Callable[[], nn.Module] | None = None,
              seed: int | None = None, robust: bool = True, curve: bool = False,
              square: bool = False) -> dict[str, Any]:
        """Train ``name`` and evaluate it: clean, and under L2 PGD at every ``eval_eps`` unless ``robust`` is off
        (the controls' ensemble, whose robustness nothing reads: the attacks would cost 40% of its training).
        ``curve``: also its real-test accuracy after every epoch (``curve``), measured without touching the
        training's random streams (the weights are those of a run without it). ``square``: also the gradient-free
        check (``gradient_free``)."""
        s = self.s
        torch.manual_seed(self.seed if seed is None else seed)
        model = (make or (lambda: make_model(s)))().to(self.device)
        loader = DataLoader(data, batch_size=s.batch_size, shuffle=True)
        attack = L2PGD(s.eps, steps=s.train_steps)
        callbacks = [learning_curve(test)] if curve else []
        history = adversarial_train(model, loader, method=method, attack=attack, epochs=epochs, lr=lr or s.lr,
                                    device=self.device, checkpoint=self.out / "checkpoints" / f"{name}.pt",
                                    resume=True, progress=self.progress, callbacks=callbacks,
                                    history_file=self.out / "checkpoints" / f"{name}.jsonl")
        atomic_write(self.out / "models" / f"{name}.pt", lambda f: torch.save(model.state_dict(), f))
        models.save_safetensors(model, self.out / "models" / f"{name}.safetensors",
                                {"advfeat_model": type(model).__name__, "dataset": s.dataset, "stage": name})
        extra: dict[str, Any] = {"curve": curve_of(history)} if curve else {}
        if square:
            extra["gradient_free"] = self.gradient_free(model, test)
        return {**self.evaluate(model, test, robust), **extra}

    def gradient_free(self, model: nn.Module, test: Dataset[Any]) -> dict[str, Any]:
        """Robust accuracy at the run's ``eps`` on the first test images (``SQUARE_SAMPLES``) under L2 PGD (the
        table's attack), under the gradient-free Square Attack (``SQUARE_QUERIES`` queries) and under AutoAttack's
        standard cascade (``cascade_budget``), each with its 95% interval: a model robust to PGD but not to Square
        has its gradients masked; the cascade is the number a reviewer asks for. Also each attack's passes per image
        and the best-known accuracy (per sample, the worst of the three)."""
        s = self.s
        n = min(SQUARE_SAMPLES, max(1, len(cast(Sized, test)) // 4))
        steps, queries = cascade_budget(s)
        attacks = {"pgd": L2PGD(s.eps, steps=s.eval_steps, rel_step_size=0.2),
                   "square": Square(s.eps, norm="l2", queries=SQUARE_QUERIES, seed=self.seed),
                   "autoattack": AutoAttack("l2", s.eps, steps=steps, queries=queries, seed=self.seed)}
        torch.manual_seed(self.seed)
        r = evaluate(model, DataLoader(Subset(test, range(n)), batch_size=500), attacks, device=self.device,
                     progress=False)
        return {"n": n, "eps": s.eps, "queries": SQUARE_QUERIES, "cascade": {"steps": steps, "queries": queries},
                **{k: {"accuracy": r.robust_accuracy(k), "interval_95": list(r.interval(k)),
                       "passes_per_image": r.passes_per_image(k)} for k in attacks},
                "best_known": {"accuracy": r.worst_accuracy, "interval_95": list(r.interval("worst"))}}

    def evaluate(self, model: nn.Module, test: Dataset[Any], robust: bool = True) -> dict[str, Any]:
        s = self.s
        attacks = {f"{e:g}": L2PGD(e, steps=s.eval_steps, rel_step_size=0.2) for e in s.eval_eps if robust}
        torch.manual_seed(self.seed)
        r = evaluate(model, DataLoader(test, batch_size=500), attacks, device=self.device, progress=False)
        return {"clean": r.clean_accuracy, "robust": {k: r.robust_accuracy(k) for k in attacks}, "n_test": r.total}

    def load_model(self, name: str, make: Callable[[], nn.Module] | None = None) -> nn.Module:
        if name in self.given:
            return self.given[name]
        m = (make or (lambda: make_model(self.s)))()
        m.load_state_dict(load_tensors(self.out / "models" / f"{name}.pt", f"the {name} model of this run",
                                       f"delete it and stages/{name}.json in {self.out} to train it again",
                                       argument="--out"))
        return m.to(self.device).eval()

