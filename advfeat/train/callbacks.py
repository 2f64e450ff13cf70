"""Callbacks: the pieces of the training loop beside the optimisation, and the hooks a user adds to.

The trainer calls every callback's hooks in order (its own first: the method's guard, the per-epoch evaluation;
then the user's; the history file last), each a no-op by default:

* ``on_fit_start(trainer)``: before the first epoch this process runs (after a resume loaded the checkpoint);
* ``on_batch(trainer, x, y)``: every training batch, on the device, before the method's steps;
* ``on_epoch_end(trainer, record)``: after an epoch's training (``trainer.epoch`` is still its 0-based index);
  add fields to ``record``, the epoch's entry of the history;
* ``on_epoch_saved(trainer, record)``: once the record joined ``trainer.history`` and the checkpoint is written,
  on every rank (``advfeat._dist.rank_world`` tells which);
* ``on_fit_end(trainer)``: after the last epoch.

A callback whose memory must survive a resume names a ``state_key`` and implements ``state_dict`` and
``load_state_dict``: the checkpoint holds that state under the key.

Examples:
    Stop reading the loss of every epoch by hand:

    >>> import torch, advfeat as af
    >>> from torch.utils.data import DataLoader
    >>> class Losses(af.train.Callback):
    ...     def __init__(self): self.seen = []
    ...     def on_epoch_end(self, trainer, record): self.seen.append(round(record["train_loss"], 1) >= 0)
    >>> data = af.data.planted(128, 64, seed=0)
    >>> losses = Losses()
    >>> _ = af.adversarial_train(af.models.PlantedNet(), DataLoader(data.train, batch_size=64), method="standard",
    ...                          epochs=2, progress=False, callbacks=[losses])
    >>> losses.seen
    [True, True]
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .._dist import rank_world
from .._io import append_text, atomic_write
from ..adapters import classifier
from ..attacks import Attack
from ..evaluate import evaluate
from ..guard import frozen_model

if TYPE_CHECKING:
    from .trainer import AdversarialTrainer

__all__ = ["Callback", "Guard", "EpochEvaluation", "HistoryFile"]


class Callback:
    """A hook into the training loop; override the hooks you need (see the module docs)."""

    state_key: ClassVar[str | None] = None
    """The checkpoint key of this callback's state, or None (no state to resume)."""

    def on_fit_start(self, trainer: AdversarialTrainer) -> None:
        """Before the first epoch this process runs."""

    def on_batch(self, trainer: AdversarialTrainer, x: Tensor, y: Tensor) -> None:
        """Every training batch, on the device, before the method's steps."""

    def on_epoch_end(self, trainer: AdversarialTrainer, record: dict[str, Any]) -> None:
        """After an epoch's training: add fields to ``record``."""

    def on_epoch_saved(self, trainer: AdversarialTrainer, record: dict[str, Any]) -> None:
        """After the record joined the history and the checkpoint was written (every rank)."""

    def on_fit_end(self, trainer: AdversarialTrainer) -> None:
        """After the last epoch."""

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs (with a ``state_key``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


class Guard(Callback):
    """A method's guard (``TrainingMethod.guard_attack``, on for FGSM-RS): after every epoch, ``attack``'s accuracy
    on a held batch (the first of the trainer's ``eval_loader``, else the first 256 samples of the first training
    batch) as ``guard_accuracy``; training ends with the weights of the best epoch (among those this process ran)."""

    state_key = "guard"

    def __init__(self, attack: Attack) -> None:
        self.attack = attack
        self.held: tuple[Tensor, Tensor] | None = None
        self.best: tuple[float, dict[str, Tensor]] | None = None  # the best accuracy and its weights

    def on_batch(self, trainer: AdversarialTrainer, x: Tensor, y: Tensor) -> None:
        if self.held is None:
            self.held = (x[:256].clone(), y[:256].clone())

    def on_epoch_end(self, trainer: AdversarialTrainer, record: dict[str, Any]) -> None:
        if trainer.eval_loader is not None:
            x, y = trainer.batch_on_device(next(iter(trainer.eval_loader)), "eval_loader, first batch")
        else:
            assert self.held is not None
            x, y = (t.to(trainer.device) for t in self.held)
        inner = classifier(trainer.module)
        x_adv = self.attack(inner, x, y)
        with torch.no_grad(), frozen_model(inner):
            acc = float((inner(x_adv).argmax(1) == y).double().mean())
        record["guard_accuracy"] = acc
        if self.best is None or acc >= self.best[0]:
            self.best = (acc, {k: v.detach().clone() for k, v in trainer.module.state_dict().items()})

    def on_fit_end(self, trainer: AdversarialTrainer) -> None:
        best, history = self.best, trainer.history
        if best is not None and history and history[-1].get("guard_accuracy", math.inf) < best[0]:
            trainer.module.load_state_dict(best[1])
            history[-1]["restored_best"] = True
            trainer.save_checkpoint()  # a later resume of this finished run returns the same weights

    def state_dict(self) -> dict[str, Any]:
        return {"held": None if self.held is None else [t.detach().cpu() for t in self.held],
                "best_accuracy": None if self.best is None else self.best[0],
                "best_model": None if self.best is None else self.best[1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        held, best = state.get("held"), state.get("best_model")
        self.held = None if held is None else (held[0], held[1])
        self.best = None if best is None else (float(state["best_accuracy"]), dict(best))


class EpochEvaluation(Callback):
    """After every epoch, clean accuracy on ``loader`` (``<prefix>clean_accuracy``) and, with an ``attack``,
    accuracy under it (``<prefix>robust_accuracy``; None without one).

    ``isolate_rng``: evaluate without drawing from the training's random streams (a loader's iterator draws its
    seed from torch's generator), so that a run with this callback trains bitwise as one without it: a learning
    curve that does not change what it measures. Off by default, as the trainer's ``eval_loader=`` has always run.
    """

    def __init__(self, loader: Any, attack: Attack | None = None, *, prefix: str = "",
                 isolate_rng: bool = False) -> None:
        self.loader, self.attack, self.prefix, self.isolate_rng = loader, attack, prefix, isolate_rng

    def on_epoch_end(self, trainer: AdversarialTrainer, record: dict[str, Any]) -> None:
        attacks = {"robust": self.attack} if self.attack is not None else {}
        devices = [trainer.device] if self.isolate_rng and trainer.device.type == "cuda" else []
        with torch.random.fork_rng(devices, enabled=self.isolate_rng):
            res = evaluate(trainer.module, self.loader, attacks, device=trainer.device, progress=False)
        record[f"{self.prefix}clean_accuracy"] = res.clean_accuracy
        record[f"{self.prefix}robust_accuracy"] = res.robust_accuracy("robust") if self.attack is not None else None


class HistoryFile(Callback):
    """A JSONL file with one line per epoch, appended on rank 0 (never through a link); a resumed run first
    rewrites it from the checkpoint's history, so it never holds an epoch the checkpoint does not."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_fit_start(self, trainer: AdversarialTrainer) -> None:
        if trainer.history and rank_world()[0] == 0:
            lines = "".join(json.dumps(h) + "\n" for h in trainer.history)
            atomic_write(self.path, lambda f: f.write(lines.encode()))

    def on_epoch_saved(self, trainer: AdversarialTrainer, record: dict[str, Any]) -> None:
        if rank_world()[0] == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_text(self.path, json.dumps(record) + "\n")
