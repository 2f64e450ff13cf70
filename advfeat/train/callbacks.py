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
``load_state_dict``: the checkpoint holds that state under the key. Each callback needs a key of its own, not one
of the trainer's own entries (``RESERVED``), and a state a checkpoint can read back without running code: tensors,
numbers, strings, None, and lists, tuples and dicts of them. What a callback adds to an epoch's record must be
JSON (finite numbers, strings, None, lists and dicts of them): the history is JSON. The trainer checks all three,
the keys when it is made, a state before it is written, a record as the callback returns it, and names the
callback.

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
from ..tally import checked_batches

if TYPE_CHECKING:
    from .trainer import AdversarialTrainer

__all__ = ["Callback", "Guard", "EpochEvaluation", "HistoryFile", "RESERVED", "check_callbacks", "check_state",
           "check_record"]

RESERVED = ("fingerprint", "epoch", "model", "optimizer", "scheduler", "scaler", "history", "rng")
"""The trainer's own checkpoint entries: no callback may save its state under one of these keys."""


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
        with frozen_model(inner):  # the held batch checked as evaluate checks one, the model's state untouched
            [(_, xs, ys, _)] = checked_batches([(x, y)], inner, box=self.attack.box, device=trainer.device,
                                               what="the guard's held batch")
        x_adv = self.attack(inner, xs, ys)
        with torch.no_grad(), frozen_model(inner):
            acc = float((inner(x_adv).argmax(1) == ys).double().mean())
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
            lines = "".join(json.dumps(h, allow_nan=False) + "\n" for h in trainer.history)
            atomic_write(self.path, lambda f: f.write(lines.encode()))

    def on_epoch_saved(self, trainer: AdversarialTrainer, record: dict[str, Any]) -> None:
        if rank_world()[0] == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_text(self.path, json.dumps(record, allow_nan=False) + "\n")


def check_callbacks(callbacks: Any) -> tuple[Callback, ...]:
    """``callbacks`` as a tuple (None: none), each a ``Callback``, each ``state_key`` a name of its own."""
    if callbacks is None:
        return ()
    if isinstance(callbacks, Callback) or not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks must be a list of advfeat.train.Callback objects (or None), got "
                        f"{type(callbacks).__name__}")
    bad = [c for c in callbacks if not isinstance(c, Callback)]
    if bad:
        raise TypeError(f"callbacks must be advfeat.train.Callback objects; got {type(bad[0]).__name__}")
    owners: dict[str, Callback] = {}
    for cb in callbacks:
        key = cb.state_key
        if key is None:
            continue
        if not isinstance(key, str) or not key:
            raise TypeError(f"callbacks: {type(cb).__name__}.state_key must be a non-empty string or None, got "
                            f"{key!r}")
        if key in RESERVED:
            raise ValueError(f"callbacks: state_key {key!r} of {type(cb).__name__} is one of the trainer's own "
                             f"checkpoint entries ({', '.join(RESERVED)}): choose another key")
        if key in owners:
            raise ValueError(f"callbacks: {type(cb).__name__} and {type(owners[key]).__name__} both save their state "
                             f"under {key!r}: each callback needs a state_key of its own")
        owners[key] = cb
    return tuple(callbacks)


def _kind(value: Any) -> str:
    """A value's type as an error names it: ``nan`` / ``inf`` for those floats, ``numpy.float32``, ``set``."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    t = type(value)
    top = t.__module__.split(".")[0]
    return f"{top}.{t.__name__}" if top in ("numpy", "torch") else t.__name__


def check_state(cb: Callback, state: Any) -> None:
    """Refuse a callback's state that a checkpoint could not read back (``weights_only``): anything but tensors,
    numbers, strings, None, and lists, tuples and dicts of them."""

    def walk(v: Any, where: str) -> None:
        if v is None or type(v) in (bool, int, float, str) or isinstance(v, Tensor):  # numpy's float64 is a float
            return
        if isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                walk(item, f"{where}[{i}]")
            return
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, (str, int)):
                    raise TypeError(f"{type(cb).__name__} (state_key {cb.state_key!r}).state_dict(){where} has a key "
                                    f"of type {_kind(k)}: a checkpoint's dict keys are strings or whole numbers")
                walk(item, f"{where}[{k!r}]")
            return
        raise TypeError(f"{type(cb).__name__} (state_key {cb.state_key!r}).state_dict(){where} is a {_kind(v)}: a "
                        "checkpoint reads back tensors, numbers, strings, None and lists, tuples and dicts of them "
                        "(without running code), so this state could not be resumed; store it as one of those")

    if not isinstance(state, dict):
        raise TypeError(f"{type(cb).__name__}.state_dict() must return a dict, got {_kind(state)}")
    walk(state, "")


def check_record(cb: Callback, record: dict[str, Any]) -> None:
    """Refuse a value in an epoch's record that the JSON history cannot hold exactly, naming the callback that put
    it there: finite numbers, strings, None, and lists and dicts (string keys) of them."""

    def ok(v: Any) -> bool:
        if v is None or isinstance(v, (bool, int, str)):
            return True
        if isinstance(v, float):
            return math.isfinite(v)
        if isinstance(v, list):
            return all(ok(item) for item in v)
        if isinstance(v, dict):
            return all(isinstance(k, str) and ok(item) for k, item in v.items())
        return False

    for key, value in record.items():
        if not ok(value):
            bad = value if not isinstance(value, (list, dict)) else next(
                (v for v in (value if isinstance(value, list) else value.values()) if not ok(v)), value)
            raise (ValueError if isinstance(bad, float) else TypeError)(
                f"{type(cb).__name__} put {_kind(bad)} in the epoch's record as {key!r}: the history is JSON "
                "(finite numbers, strings, lists and dicts of them; None for no value); convert it (float(...), "
                "tensor.tolist()) before recording it")
