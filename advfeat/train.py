"""Robust training: the trainer. How a batch becomes a loss is a method object (``advfeat.methods``).

``af.adversarial_train(model, loader, method=af.TRADES(af.L2PGD(0.5, steps=7), beta=6))``. The trainer owns the
loop, devices, mixed precision, DDP, the optimiser and its schedule, checkpoints and resume, evaluation, history,
progress and bad-input checks; it names no method. The strings ``"standard"``, ``"pgd"``, ``"fgsm-rs"``,
``"free"``, ``"trades"`` and ``"mart"`` are shorthands for each method's defaults (``advfeat.methods.from_name``,
with ``attack=``, and ``beta``, ``replays``, ``guard`` where they apply).

Examples:
    Seconds on a CPU:

    >>> import torch, advfeat as af
    >>> from torch.utils.data import DataLoader
    >>> data = af.data.planted(512, 256, seed=0)
    >>> model = af.models.PlantedNet()
    >>> history = af.adversarial_train(
    ...     model, DataLoader(data.train, batch_size=128, shuffle=True), method=af.PGDTraining(af.L2PGD(0.5, steps=3)),
    ...     epochs=2, lr=0.05, progress=False, eval_loader=DataLoader(data.test, batch_size=256))
    >>> [sorted(h) for h in history][0]  # doctest: +NORMALIZE_WHITESPACE
    ['clean_accuracy', 'epoch', 'lr', 'robust_accuracy', 'seconds', 'train_accuracy', 'train_loss']

Choices (documented, switchable):

* BatchNorm during the attack: eval mode (``attack_eval_mode=True``), so that crafting an example does not
  depend on, or change, batch statistics; ``False`` runs the attack in train mode (running statistics are
  still restored afterwards by ``advfeat.frozen_model``).
* Optimiser: SGD, momentum 0.9, weight decay 5e-4 at ``lr``, with a one-cycle schedule stepped per batch
  (``schedule="onecycle"``), or ``"piecewise"`` (x0.1 at 50% and 75% of training) or ``"constant"``;
  or pass your own ``optimizer`` and ``scheduler`` (stepped once per optimiser step).
* Checkpoints (``checkpoint=path``) are written atomically at the end of every epoch and hold the model,
  optimiser, scheduler, grad scaler, epoch, RNG states and history; their fingerprint holds the method's repr.
  ``resume=True`` continues from it; a crash costs at most the epoch in progress, and the resumed run ends with
  the same weights as an uninterrupted one under deterministic settings.
* A method's guard (``advfeat.TrainingMethod.guard_attack``, on for FGSM-RS): after every epoch the guard
  attack's accuracy on a held batch (the first of ``eval_loader``, else of ``loader``); training ends with the
  weights of the best epoch (among the epochs this process runs).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import time
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._checks import check_batch, check_device, check_labels, check_logits, check_positive_float, check_positive_int
from ._digest import content_digest
from ._dist import barrier, rank_world
from ._io import TMP_SUFFIX, append_text, atomic_write
from ._lock import exclusive_for_job, file_lock
from .adapters import batch_xy, check_keys, classifier
from .attacks import Attack
from .evaluate import evaluate
from .guard import frozen_model
from .methods import DEFAULT_METHOD, NAMES, TrainContext, TrainingMethod, from_name
from .progress import interrupted, progress_bar

__all__ = ["AdversarialTrainer", "adversarial_train", "METHODS"]

METHODS = NAMES
"""The method names the trainer takes as shorthands for each method's defaults."""

Batches = Iterable[Any]


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (attacks need no gradient sync)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) and type(model).__name__.endswith("DataParallel") else model


def _rank() -> int:
    return rank_world()[0]


class AdversarialTrainer:
    """Train ``model`` on ``loader`` with a training method; ``fit`` runs the epochs.

    Args:
        model: any classifier ``nn.Module`` (or one wrapped in ``DistributedDataParallel``).
        loader: an iterable of ``(x, y)`` batches, pixels in the method's attack's box; with a ``DistributedSampler``
            its ``set_epoch`` is called every epoch.
        method: a ``advfeat.TrainingMethod`` (``af.PGDTraining(attack)``, ``af.TRADES(attack, beta=6)``, yours),
            or a name for a method's defaults: ``"standard"``, ``"pgd"``, ``"fgsm-rs"``, ``"free"``, ``"trades"``,
            ``"mart"`` (see ``advfeat.methods``).
        attack, options: with a method *name* only: its attack (any ``advfeat.Attack`` for "pgd" and
            "mart"; a PGD configuration, whose ball, steps and step size the others use) and its options by
            keyword (``beta=`` for TRADES and MART, ``replays=`` for free training, ``guard=`` for FGSM-RS; defaults:
            the method's). A method object carries its own.
        epochs: number of epochs.
        lr, momentum, weight_decay, schedule: the default optimiser and schedule (see the module docs).
        optimizer, scheduler: your own, instead (an optimiser over ``model``'s parameters; a scheduler stepped
            once per optimiser step).
        eval_loader, eval_attack: after every epoch, clean and robust accuracy on ``eval_loader`` under
            ``eval_attack`` (default: the method's ``attack``).
        checkpoint, resume: see the module docs. A checkpoint of another model or configuration is refused.
        history_file: a JSONL file that gets one line per epoch.
        amp: None, ``"bf16"`` or ``"fp16"``: ``torch.autocast`` for the training forward passes (and the
            attacks); fp16 on CUDA uses a gradient scaler.
        attack_eval_mode: run attacks with the model in eval mode (default) or in train mode.
        device: where to train (default: where the model's parameters are).
        progress: show a tqdm bar per epoch.
        keys: ``(image key, label key)`` of mapping batches, when not among the common names
            (``advfeat.adapters``).
    """

    def __init__(
        self,
        model: nn.Module,
        loader: Batches,
        *,
        method: str | TrainingMethod = DEFAULT_METHOD,
        attack: Attack | None = None,
        epochs: int = 10,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        schedule: str = "onecycle",
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        eval_loader: Batches | None = None,
        eval_attack: Attack | None = None,
        checkpoint: str | Path | None = None,
        resume: bool = False,
        history_file: str | Path | None = None,
        amp: str | None = None,
        attack_eval_mode: bool = True,
        device: str | torch.device | None = None,
        progress: bool = True,
        keys: tuple[str, str] | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.method = _method(method, attack, options)
        self.epochs = check_positive_int("epochs", epochs)
        self.model = model
        self.keys = check_keys(keys)
        self.loader = loader
        if eval_attack is not None and not isinstance(eval_attack, Attack):
            raise TypeError(f"eval_attack must be an advfeat Attack or None, got {eval_attack!r}")
        default_eval = attack if attack is not None else getattr(self.method, "attack", None)  # "standard" too
        self.eval_attack: Attack | None = eval_attack if eval_attack is not None else default_eval
        self.eval_loader = eval_loader
        if amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16'; got {amp!r}")
        self.amp = amp
        self.attack_eval_mode = bool(attack_eval_mode)
        self.progress = progress
        params = list(model.parameters())
        if not params:
            raise ValueError("model has no parameters to train")
        self.device = check_device("device", device) if device is not None else params[0].device
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.history_file = Path(history_file) if history_file is not None else None
        self.resume = bool(resume)

        if optimizer is None:
            check_positive_float("lr", lr)
            optimizer = torch.optim.SGD(
                [p for p in params if p.requires_grad], lr=lr, momentum=momentum, weight_decay=weight_decay)
        elif not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        per_epoch = self._steps_per_epoch()
        if scheduler is None:
            scheduler = self._default_schedule(schedule, per_epoch)
        self.scheduler = scheduler
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16" and self.device.type == "cuda")
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self._held: tuple[Tensor, Tensor] | None = None  # the guard's batch, from the first epoch
        self._best: tuple[float, dict[str, Tensor]] | None = None  # the guard's best accuracy and weights
        self._per_epoch = per_epoch
        self._classes: int | None = None  # known after the first step

    # -- configuration ------------------------------------------------------------------------------------

    def _steps_per_epoch(self) -> int | None:
        try:
            n = len(self.loader)  # type: ignore[arg-type]
        except TypeError:
            return None
        return n * self.method.steps_per_batch

    def _default_schedule(self, schedule: str, per_epoch: int | None) -> Any:
        opt = self.optimizer
        if schedule == "constant":
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        if schedule not in ("onecycle", "piecewise"):
            raise ValueError(f"schedule must be 'onecycle', 'piecewise' or 'constant'; got {schedule!r}")
        if per_epoch is None or per_epoch == 0:
            raise ValueError(f"schedule={schedule!r} needs len(loader); pass schedule='constant' or a scheduler")
        total = per_epoch * self.epochs
        if schedule == "onecycle":
            peak = [g["lr"] for g in opt.param_groups]
            return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak, total_steps=total)
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[total // 2, (3 * total) // 4], gamma=0.1)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: the model's architecture and the training config."""
        inner = _unwrap(self.model)
        return {
            "model": type(inner).__name__,
            "parameters": [[k, list(v.shape)] for k, v in inner.state_dict().items()],
            "method": repr(self.method),
            "epochs": self.epochs,
            "optimizer": type(self.optimizer).__name__,
            "scheduler": type(self.scheduler).__name__,
            "amp": self.amp,
        }

    # -- state --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything ``fit`` needs to continue: weights, optimiser, scheduler, scaler, epoch, RNGs."""
        return {
            "fingerprint": self.fingerprint(),
            "epoch": self.epoch,
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if hasattr(self.scheduler, "state_dict") else None,
            "scaler": self.scaler.state_dict(),
            "history": json.dumps(self.history),
            "rng": _rng_state(self.loader),
            "guard": {"held": None if self._held is None else [t.detach().cpu() for t in self._held],
                      "best_accuracy": None if self._best is None else self._best[0],
                      "best_model": None if self._best is None else self._best[1]},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine, theirs = self.fingerprint(), state.get("fingerprint", {})
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            shown = "; ".join(f"{k}: checkpoint {theirs.get(k)!r} vs now {mine.get(k)!r}" for k in diff)
            raise ValueError(f"checkpoint was written for another model or configuration ({shown}); "
                             "use another checkpoint path or the original settings")
        _unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scheduler"] is not None and hasattr(self.scheduler, "load_state_dict"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.history = json.loads(state["history"])
        _set_rng_state(state["rng"], self.loader)
        guard = state.get("guard") or {}
        held = guard.get("held")
        self._held = None if held is None else (held[0].to(self.device), held[1].to(self.device))
        best = guard.get("best_model")
        self._best = None if best is None else (float(guard["best_accuracy"]), dict(best))

    def save(self, path: str | Path) -> None:
        """Write ``state_dict`` to ``path`` atomically (temporary file, fsync, rename), with a checksum of its
        content; the checkpoint it replaces is kept as ``<path>.prev`` (a damaged latest one costs one epoch)."""
        state = self.state_dict()
        bad = [k for k, v in state["model"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise FloatingPointError(f"refusing to save a checkpoint with non-finite weights ({', '.join(bad[:3])}); "
                                     f"the last good one ({path}) is kept")
        p = Path(path)
        signed = {"advfeat_checkpoint": 1, "sha256": content_digest(state), "state": state}
        buffer = io.BytesIO()  # serialised first: its size is known before the disk is touched
        torch.save(signed, buffer)
        data = buffer.getbuffer()
        rotated = p.is_file() and not p.is_symlink()
        if rotated:
            os.replace(p, _previous(p))
        try:
            atomic_write(p, lambda f: f.write(data), size=len(data))
        except OSError:
            if rotated:  # the last good checkpoint stays where a resume looks for it
                os.replace(_previous(p), p)
            raise

    def load(self, path: str | Path) -> None:
        """Read a checkpoint ``save`` wrote, verifying its checksum; a damaged or foreign file is refused."""
        self.load_state_dict(read_checkpoint(path, self.device))

    # -- training -----------------------------------------------------------------------------------------

    def fit(self) -> list[dict[str, Any]]:
        """Run the remaining epochs; returns the history (one dict per epoch).

        With a ``checkpoint``, this job holds it while it trains: a second trainer on the same checkpoint stops
        at once with ``advfeat.InUseError`` naming the holder (ranks of one job share it).
        """
        if self.checkpoint is None:
            history: list[dict[str, Any]] = interrupted(
                "training interrupted; no checkpoint= was given, so nothing was kept", self._fit)
            return history
        with exclusive_for_job(file_lock(self.checkpoint), f"checkpoint={str(self.checkpoint)!r}"):
            history = interrupted(f"training interrupted; the checkpoint {self.checkpoint} holds every finished "
                                  "epoch: call again with resume=True to continue", self._fit)
            return history

    def _fit(self) -> list[dict[str, Any]]:
        if self.checkpoint is not None and _rank() == 0:  # our own temporaries, left by a write killed half-way
            for tmp in self.checkpoint.parent.glob(f".{self.checkpoint.name}.*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)
        if (self.checkpoint is not None and self.resume and not self.checkpoint.exists()
                and _previous(self.checkpoint).is_file()):  # killed between keeping the previous and the new
            os.replace(_previous(self.checkpoint), self.checkpoint)
        if self.checkpoint is not None and self.checkpoint.exists():
            if not self.resume:
                raise FileExistsError(f"checkpoint {self.checkpoint} exists; pass resume=True to continue from it "
                                      "or choose another path")
            self.load(self.checkpoint)
            if self.history_file is not None and _rank() == 0:
                lines = "".join(json.dumps(h) + "\n" for h in self.history)
                atomic_write(self.history_file, lambda f: f.write(lines.encode()))
        guard = self.method.guard_attack()
        while self.epoch < self.epochs:
            record = self._train_epoch(guard is not None)
            if guard is not None:
                acc = self._guard_accuracy(guard)
                record["guard_accuracy"] = acc
                if self._best is None or acc >= self._best[0]:
                    self._best = (acc, {k: v.detach().clone() for k, v in _unwrap(self.model).state_dict().items()})
            if self.eval_loader is not None:
                res = evaluate(_unwrap(self.model), self.eval_loader,
                               {"robust": self.eval_attack} if self.eval_attack is not None else {},
                               device=self.device, progress=False)
                record["clean_accuracy"] = res.clean_accuracy
                record["robust_accuracy"] = res.robust_accuracy("robust") if self.eval_attack is not None else None
            self.epoch += 1
            self.history.append(record)
            if _rank() == 0:
                if self.checkpoint is not None:
                    self.save(self.checkpoint)
                if self.history_file is not None:
                    self.history_file.parent.mkdir(parents=True, exist_ok=True)
                    append_text(self.history_file, json.dumps(record) + "\n")  # never through a link
            barrier()
        best = self._best
        if best is not None and self.history and self.history[-1].get("guard_accuracy", math.inf) < best[0]:
            _unwrap(self.model).load_state_dict(best[1])
            self.history[-1]["restored_best"] = True
            if self.checkpoint is not None and _rank() == 0:
                self.save(self.checkpoint)  # a later resume of this finished run returns the same weights
            barrier()
        return self.history

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.amp is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

    def _batch(self, batch: Any, where: str) -> tuple[Tensor, Tensor]:
        x, y = batch_xy(batch, self.keys, f"loader, {where}")
        lower, upper = self.method.box
        try:
            x, y = check_batch(x, y, lower, upper)  # on the loader's CPU copy: no device sync
            if self._classes is not None:
                check_labels(y, self._classes, "y")
        except (TypeError, ValueError) as e:
            raise type(e)(f"loader, {where}: {e}") from None
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _train_epoch(self, hold: bool) -> dict[str, Any]:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)  # type: ignore[union-attr]
        model = self.model
        ctx = TrainContext(classifier(model), classifier(_unwrap(model)), self.attack_eval_mode, {}, self.epoch)
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        seen = 0
        first_bad = torch.full((), -1, device=self.device, dtype=torch.int64)  # first non-finite batch
        expected = self._per_epoch // self.method.steps_per_batch if self._per_epoch is not None else None
        desc = f"{type(self.method).__name__} epoch {self.epoch + 1}/{self.epochs}"
        with progress_bar(self.loader, desc=desc, enabled=self.progress and _rank() == 0, unit="batch") as bar:
            for b, batch in enumerate(bar):
                where = f"epoch {self.epoch + 1}, batch {b + 1}"
                if expected is not None and b >= expected:
                    raise ValueError(f"loader yielded more batches in epoch {self.epoch + 1} than its len() = "
                                     f"{expected} said when training started (the schedule is set by it): a loader "
                                     "must yield the same number of batches every epoch")
                x, y = self._batch(batch, where)
                if hold and self._held is None:
                    self._held = (x[:256].clone(), y[:256].clone())
                loss, logits = self._optimise(x, y, ctx, where)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), b + 1, first_bad)
                n = y.shape[0]
                seen += n
                loss_sum += loss.detach().double() * n
                correct += (logits.detach().argmax(1) == y).sum()
        if seen == 0:
            raise ValueError(f"loader yielded no batches in epoch {self.epoch + 1}")
        bad = int(first_bad)  # the epoch's one host sync for it, where the loop syncs anyway
        if bad > 0:
            last = f"; the last good checkpoint ({self.checkpoint}) is kept" if self.checkpoint is not None else ""
            raise FloatingPointError(f"non-finite training loss at epoch {self.epoch + 1}, batch {bad} (first); "
                                     f"training stopped at the epoch's end{last}")
        if expected is not None and b + 1 < expected:
            raise ValueError(f"loader yielded {b + 1} batches in epoch {self.epoch + 1}, {expected - b - 1} fewer "
                             f"than its len() = {expected} said when training started (the schedule is set by it): "
                             "a loader must yield the same number of batches every epoch")
        return {
            "epoch": self.epoch + 1,
            "train_loss": float(loss_sum) / seen,
            "train_accuracy": int(correct) / seen,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "seconds": time.perf_counter() - start,
        }

    def _optimise(self, x: Tensor, y: Tensor, ctx: TrainContext, where: str) -> tuple[Tensor, Tensor]:
        """Every optimiser step the method asks for on this batch; returns the last step's loss and logits."""
        steps = self.method.batch(ctx.model, x, y, ctx)
        last: tuple[Tensor, Tensor] | None = None
        while True:
            self.model.train()
            try:
                with self._autocast():
                    loss, logits = next(steps)
            except StopIteration:
                break
            except (RuntimeError, ValueError, IndexError):
                if self.epoch == 0 and self.optimizer.state == {}:
                    self._explain(x, y)  # a clear message when the model's output is what went wrong
                raise
            if self._classes is None:
                self._classes = check_logits(logits, y)  # once: later batches are checked on the CPU copy
            self._step(loss, where)
            last = (loss, logits)
        if last is None:
            raise RuntimeError(f"{type(self.method).__name__}.batch yielded no loss at {where}")
        return last

    def _explain(self, x: Tensor, y: Tensor) -> None:
        inner = classifier(_unwrap(self.model))
        with torch.no_grad(), frozen_model(inner):
            check_logits(inner(x), y)

    def _step(self, loss: Tensor, where: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def _guard_accuracy(self, attack: Attack) -> float:
        if self.eval_loader is not None:
            first = next(iter(self.eval_loader))
            x, y = self._batch(first, "eval_loader, first batch")
        else:
            assert self._held is not None
            x, y = self._held
        inner = classifier(_unwrap(self.model))
        x_adv = attack(inner, x, y)
        with torch.no_grad(), frozen_model(inner):
            return float((inner(x_adv).argmax(1) == y).double().mean())


def _method(method: str | TrainingMethod, attack: Attack | None, options: dict[str, Any]) -> TrainingMethod:
    """The trainer's ``method``: a TrainingMethod as it is, or a name with its options (only for names)."""
    if isinstance(method, TrainingMethod):
        given = sorted(options) + (["attack"] if attack is not None else [])
        if given:
            raise ValueError(f"{', '.join(sorted(given))}: set {'these' if len(given) > 1 else 'it'} on the method "
                             f"object ({method!r}), not on the trainer")
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a TrainingMethod or one of {', '.join(map(repr, METHODS))}; got "
                        f"{type(method).__name__}")
    return from_name(method, attack, **options)


def adversarial_train(model: nn.Module, loader: Batches, **kwargs: Any) -> list[dict[str, Any]]:
    """Train ``model`` in place; returns the history. Keyword arguments: see ``AdversarialTrainer``."""
    return AdversarialTrainer(model, loader, **kwargs).fit()


def _rng_state(loader: Any) -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": [str(np_state[0]), torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    for name, g in _loader_generators(loader):
        state[f"generator:{name}"] = g.get_state()
    return state


def _set_rng_state(state: Mapping[str, Any], loader: Any) -> None:
    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in _loader_generators(loader):
        if f"generator:{name}" in state:
            g.set_state(state[f"generator:{name}"])


def _loader_generators(loader: Any) -> list[tuple[str, torch.Generator]]:
    found: list[tuple[str, torch.Generator]] = []
    for name, owner in (("loader", loader), ("sampler", getattr(loader, "sampler", None)),
                        ("batch_sampler", getattr(getattr(loader, "batch_sampler", None), "sampler", None))):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for _, h in found):
            found.append((name, g))
    return found



def _previous(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state in a checkpoint the trainer wrote, its checksum verified. Loading never runs code
    (``weights_only=True``); a damaged, truncated or foreign file gets an error naming it and what to do."""
    p = Path(path)
    prev = _previous(p)
    keep = (f"; the previous epoch's checkpoint is kept as {prev}: rename it to {p.name} to resume from it"
            if prev.is_file() else "")
    what = f"checkpoint {p} is damaged (truncated or changed) or is not a checkpoint advfeat wrote"
    try:
        signed = torch.load(p, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint: no file at {p}") from None
    except Exception as e:  # truncated, empty, random bytes, a pickle with code: all are "not ours"
        raise ValueError(f"{what} ({type(e).__name__}); delete it to start afresh{keep}") from None
    if isinstance(signed, dict) and {"fingerprint", "epoch", "model", "rng"} <= set(signed):
        legacy: dict[str, Any] = signed  # an unsigned checkpoint (no checksum field): read as it is
        return legacy
    if not isinstance(signed, dict) or "state" not in signed or "sha256" not in signed:
        raise ValueError(f"{what} (no advfeat checksum: written by another program); delete it to start "
                         f"afresh{keep}")
    if content_digest(signed["state"]) != signed["sha256"]:
        raise ValueError(f"{what}: its content does not match its checksum; delete it to start afresh{keep}")
    state: dict[str, Any] = signed["state"]
    return state
