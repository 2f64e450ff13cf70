"""One epoch of training: the loader's batches checked and moved to the device, the method's optimiser steps on
each, and the epoch's loss and accuracy summed on the device with one host sync at the end. The functions take the
trainer (``AdversarialTrainer``) whose configuration and state they use."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._checks import check_logits
from .._dist import rank_world
from ..adapters import classifier
from ..guard import frozen_model
from ..methods import TrainContext
from ..progress import progress_bar

if TYPE_CHECKING:
    from .trainer import AdversarialTrainer

__all__ = ["train_epoch"]


def train_epoch(self: AdversarialTrainer) -> dict[str, Any]:
    """Train ``self`` (the trainer) for its current epoch; returns the epoch's history record."""
    sampler = getattr(self.loader, "sampler", None)
    set_epoch = getattr(sampler, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(self.epoch)
    ctx = TrainContext(classifier(self.model), classifier(self.module), self.attack_eval_mode, {}, self.epoch)
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
    correct = torch.zeros((), device=self.device, dtype=torch.int64)
    seen = 0
    first_bad = torch.full((), -1, device=self.device, dtype=torch.int64)  # first non-finite batch
    expected = self._per_epoch // self.method.steps_per_batch if self._per_epoch is not None else None
    said = f"len() = {expected} said when training started (the schedule is set by it): a loader must yield " \
           "the same number of batches every epoch"
    desc = f"{type(self.method).__name__} epoch {self.epoch + 1}/{self.epochs}"
    with progress_bar(self.loader, desc=desc, enabled=self.progress and rank_world()[0] == 0,
                      unit="batch") as bar:
        for b, batch in enumerate(bar):
            where = f"epoch {self.epoch + 1}, batch {b + 1}"
            if expected is not None and b >= expected:
                raise ValueError(f"loader yielded more batches in epoch {self.epoch + 1} than its {said}")
            x, y = self.batch_on_device(batch, where)
            for cb in self.callbacks:
                cb.on_batch(self, x, y)
            loss, logits, finite = _optimise(self, x, y, ctx, where)
            first_bad = torch.where((first_bad < 0) & ~finite, b + 1, first_bad)
            seen += y.shape[0]
            loss_sum += loss.detach().double() * y.shape[0]
            correct += (logits.detach().argmax(1) == y).sum()
    if seen == 0:
        raise ValueError(f"loader yielded no batches in epoch {self.epoch + 1}")
    bad = int(first_bad)  # the epoch's one host sync for it, where the loop syncs anyway
    if bad > 0:
        last = f"; the last good checkpoint ({self.checkpoint}) is kept" if self.checkpoint is not None else ""
        raise FloatingPointError(f"non-finite training loss or logits at epoch {self.epoch + 1}, batch {bad} "
                                 f"(first); training stopped at the epoch's end{last}")
    if expected is not None and b + 1 < expected:
        raise ValueError(f"loader yielded {b + 1} batches in epoch {self.epoch + 1}, {expected - b - 1} fewer "
                         f"than its {said}")
    return {"epoch": self.epoch + 1, "train_loss": float(loss_sum) / seen, "train_accuracy": int(correct) / seen,
            "lr": float(self.optimizer.param_groups[0]["lr"]), "seconds": time.perf_counter() - start}


def _optimise(self: AdversarialTrainer, x: Tensor, y: Tensor, ctx: TrainContext, where: str
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Every optimiser step the method asks for on this batch (at most its ``steps_per_batch``); returns the last
    step's loss and logits, and a device flag: every step's loss and logits were finite (no host sync)."""
    method = self.method
    steps = method.batch(ctx.model, x, y, ctx)
    last: tuple[Tensor, Tensor] | None = None
    finite = torch.ones((), dtype=torch.bool, device=self.device)
    taken = 0
    while True:
        self.model.train()
        try:
            with _autocast(self):
                loss, logits = _pair(method, next(steps))
        except StopIteration:
            break
        except (RuntimeError, ValueError, IndexError):
            if self.epoch == 0 and self.optimizer.state == {}:
                _explain(self, x, y)  # a clear message when the model's output is what went wrong
            raise
        taken += 1
        if taken > method.steps_per_batch:
            raise ValueError(f"{type(method).__name__}.batch yielded more than its steps_per_batch = "
                             f"{method.steps_per_batch} losses at {where}: set steps_per_batch to the optimiser "
                             "steps it takes per batch (the schedule's length is set by it)")
        if self._classes is None:
            self._classes = check_logits(logits, y)  # once: later batches are checked on the CPU copy
        elif logits.shape != (y.shape[0], self._classes):  # shapes only: no host sync
            raise ValueError(f"{type(method).__name__}.batch yielded logits of shape {tuple(logits.shape)} at "
                             f"{where}; expected ({y.shape[0]}, {self._classes}) as on the first step")
        finite &= torch.isfinite(loss.detach()) & torch.isfinite(logits.detach()).all()
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(self.scaler.scale(loss))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        last = (loss, logits)
    if last is None:
        raise RuntimeError(f"{type(method).__name__}.batch yielded no loss at {where}")
    return (*last, finite)


def _pair(method: Any, step: Any) -> tuple[Tensor, Tensor]:
    """What a method yielded, checked: ``(loss, logits)``, the loss a scalar floating tensor."""
    said = f"{type(method).__name__}.loss must return (a scalar loss tensor, logits)"
    if not isinstance(step, tuple) or len(step) != 2:
        raise TypeError(f"{said}; it returned a {type(step).__name__}")
    loss, logits = step
    if not isinstance(loss, Tensor):
        raise TypeError(f"{said}; its loss is a {type(loss).__name__}")
    if loss.ndim != 0 or not loss.is_floating_point():
        raise TypeError(f"{said}; its loss has shape {tuple(loss.shape)} and dtype {loss.dtype} (reduce it: "
                        "loss.mean())" if loss.ndim else f"{said}; its loss has dtype {loss.dtype}")
    if not isinstance(logits, Tensor):
        raise TypeError(f"{said}; its logits are a {type(logits).__name__}")
    return loss, logits


def _autocast(self: AdversarialTrainer) -> AbstractContextManager[Any]:
    if self.amp is None:
        return nullcontext()
    return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)


def _explain(self: AdversarialTrainer, x: Tensor, y: Tensor) -> None:
    inner = classifier(self.module)
    with torch.no_grad(), frozen_model(inner):
        check_logits(inner(x), y)
