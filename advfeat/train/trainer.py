"""The training loop: ``AdversarialTrainer`` runs epochs of a training method; the optimiser and its schedule,
checkpoints (``advfeat.train.checkpoint``) and the callbacks (``advfeat.train.callbacks``) are its parts."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence, Sized
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from .._checks import (
    check_batch,
    check_device,
    check_labels,
    check_positive_float,
    check_positive_int,
    describe_differences,
)
from .._dist import barrier, rank_world
from .._lock import exclusive_for_job, file_lock
from ..adapters import batch_xy, check_keys
from ..attacks import Attack
from ..methods import DEFAULT_METHOD, NAMES, TrainingMethod, from_name
from ..progress import interrupted
from .callbacks import Callback, EpochEvaluation, Guard, HistoryFile, check_callbacks, check_record, check_state
from .checkpoint import read_checkpoint, recover, rng_state, save_checkpoint, set_rng_state, what_was_kept
from .epoch import train_epoch

__all__ = ["AdversarialTrainer", "adversarial_train", "METHODS"]

METHODS = NAMES
"""The method names the trainer takes as shorthands for each method's defaults."""

Batches = Iterable[Any]


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (attacks need no gradient sync)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) and type(model).__name__.endswith("DataParallel") else model


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
        lr, momentum, weight_decay, schedule: the default optimiser and schedule (see the package docs).
        optimizer, scheduler: your own, instead (an optimiser over ``model``'s parameters; a scheduler stepped
            once per optimiser step).
        eval_loader, eval_attack: after every epoch, clean and robust accuracy on ``eval_loader`` under
            ``eval_attack`` (default: the method's ``attack``); the ``EpochEvaluation`` callback.
        checkpoint, resume: see the package docs. A checkpoint of another model or configuration is refused.
        history_file: a JSONL file that gets one line per epoch (the ``HistoryFile`` callback).
        callbacks: your own ``advfeat.train.Callback`` objects (or None), called after the trainer's own; their
            ``state_key`` s must differ from each other's and from the trainer's own checkpoint entries.
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
        callbacks: Sequence[Callback] | None = (),
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
        self.model, self.loader, self.keys = model, loader, check_keys(keys)
        if eval_attack is not None and not isinstance(eval_attack, Attack):
            raise TypeError(f"eval_attack must be an advfeat Attack or None, got {eval_attack!r}")
        if amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16'; got {amp!r}")
        self.amp, self.attack_eval_mode, self.progress = amp, bool(attack_eval_mode), progress
        params = list(model.parameters())
        if not params:
            raise ValueError("model has no parameters to train")
        self.device = check_device("device", device) if device is not None else params[0].device
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.resume = bool(resume)
        self.eval_loader = eval_loader
        self.callbacks = _callbacks(self.method, attack, eval_loader, eval_attack, history_file, callbacks)
        self._per_epoch = self._steps_per_epoch()
        self.optimizer = _optimizer(optimizer, params, lr, momentum, weight_decay)
        self.scheduler = scheduler if scheduler is not None else _schedule(self.optimizer, schedule,
                                                                            self._per_epoch, self.epochs)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16" and self.device.type == "cuda")
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self._classes: int | None = None  # known after the first step
        self._batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())

    @property
    def module(self) -> nn.Module:
        """The bare module being trained (inside ``DistributedDataParallel`` when wrapped)."""
        return _unwrap(self.model)

    def _steps_per_epoch(self) -> int | None:
        try:
            n = len(cast(Sized, self.loader))
        except TypeError:  # an iterable without a length (or an IterableDataset's loader)
            return None
        return n * self.method.steps_per_batch

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: the model's architecture and the training config."""
        return {
            "model": type(self.module).__name__,
            "parameters": [[k, list(v.shape)] for k, v in self.module.state_dict().items()],
            "method": repr(self.method),
            "epochs": self.epochs,
            "optimizer": type(self.optimizer).__name__,
            "scheduler": type(self.scheduler).__name__,
            "amp": self.amp,
        }

    # -- state --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything ``fit`` needs to continue: weights, optimiser, scheduler, scaler, epoch, RNGs, history and
        the callbacks' states (under their ``state_key``)."""
        state = {
            "fingerprint": self.fingerprint(),
            "epoch": self.epoch,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if hasattr(self.scheduler, "state_dict") else None,
            "scaler": self.scaler.state_dict(),
            "history": json.dumps(self.history),
            "rng": rng_state(self.loader),
        }
        own: dict[str, Any] = {}
        for cb in self.callbacks:
            if cb.state_key is not None:
                own[cb.state_key] = cb.state_dict()
                check_state(cb, own[cb.state_key])  # before anything is written: a resume must read it back
        return state | own

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        shown = describe_differences(state.get("fingerprint", {}), self.fingerprint(), "in the checkpoint", "now")
        if shown:
            raise ValueError(f"checkpoint was written for another model or configuration ({shown}); "
                             "use another checkpoint path or the original settings")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scheduler"] is not None and hasattr(self.scheduler, "load_state_dict"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.history = json.loads(state["history"])
        set_rng_state(state["rng"], self.loader)
        for cb in self.callbacks:
            if cb.state_key is not None and state.get(cb.state_key) is not None:
                cb.load_state_dict(dict(state[cb.state_key]))

    def save(self, path: str | Path) -> None:
        """Write ``state_dict`` to ``path`` (``advfeat.train.checkpoint.save_checkpoint``: atomic, checksummed,
        the replaced checkpoint kept as ``<path>.prev``)."""
        save_checkpoint(path, self.state_dict())

    def load(self, path: str | Path) -> None:
        """Read a checkpoint ``save`` wrote, verifying its checksum; a damaged or foreign file is refused."""
        self.load_state_dict(read_checkpoint(path, self.device))

    def save_checkpoint(self) -> None:
        """Write the run's ``checkpoint`` (rank 0, when one was given); every rank waits for it."""
        if self.checkpoint is not None and rank_world()[0] == 0:
            self.save(self.checkpoint)
        barrier()

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
        checkpoint = self.checkpoint
        with exclusive_for_job(file_lock(checkpoint), f"checkpoint={str(checkpoint)!r}"):
            history = interrupted(partial(what_was_kept, checkpoint), self._fit)
            return history

    def _fit(self) -> list[dict[str, Any]]:
        if self.checkpoint is not None:
            recover(self.checkpoint, self.resume, temporaries=rank_world()[0] == 0)
            if self.checkpoint.exists():
                if not self.resume:
                    raise FileExistsError(f"checkpoint {self.checkpoint} exists; pass resume=True to continue from "
                                          "it or choose another path")
                self.load(self.checkpoint)
        for cb in self.callbacks:
            cb.on_fit_start(self)
        while self.epoch < self.epochs:
            record = train_epoch(self)
            for cb in self.callbacks:
                cb.on_epoch_end(self, record)
                check_record(cb, record)
            self.epoch += 1
            self.history.append(record)
            if self.checkpoint is not None and rank_world()[0] == 0:
                self.save(self.checkpoint)
            for cb in self.callbacks:
                cb.on_epoch_saved(self, record)
            barrier()
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return self.history

    def batch_on_device(self, batch: Any, where: str) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of a loader's batch, checked (box, labels) on the loader's copy and moved to the device;
        an error names ``where``."""
        x, y = batch_xy(batch, self.keys, f"loader, {where}")
        lower, upper = self.method.box
        try:
            x, y = check_batch(x, y, lower, upper)  # on the loader's CPU copy: no device sync
            if y.shape[0] == 0:
                raise ValueError("an empty batch (0 samples): the loader must not yield one")
            if y.shape[0] == 1 and self._batchnorm:
                raise ValueError("a batch of one sample cannot train a model with BatchNorm (its batch statistics "
                                 "need 2 or more): pass drop_last=True to the DataLoader or use larger batches")
            if self._classes is not None:
                check_labels(y, self._classes, "y")
        except (TypeError, ValueError) as e:
            raise type(e)(f"loader, {where}: {e}") from None
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def _callbacks(method: TrainingMethod, attack: Attack | None, eval_loader: Batches | None,
               eval_attack: Attack | None, history_file: str | Path | None,
               user: Sequence[Callback] | None) -> tuple[Callback, ...]:
    """The trainer's own callbacks (the method's guard, the per-epoch evaluation), the user's, the history file;
    every ``state_key`` its own (``check_callbacks``)."""
    check_callbacks(user)
    own: list[Callback] = []
    guard = method.guard_attack()
    if guard is not None:
        own.append(Guard(guard))
    if eval_loader is not None:
        default = attack if attack is not None else getattr(method, "attack", None)  # "standard" has none
        own.append(EpochEvaluation(eval_loader, eval_attack if eval_attack is not None else default))
    return check_callbacks([*own, *(user or ()), *([HistoryFile(history_file)] if history_file is not None else [])])


def _optimizer(optimizer: torch.optim.Optimizer | None, params: list[nn.Parameter], lr: float, momentum: float,
               weight_decay: float) -> torch.optim.Optimizer:
    """The caller's optimiser, or SGD over the trainable parameters."""
    if optimizer is None:
        check_positive_float("lr", lr)
        return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=momentum,
                               weight_decay=weight_decay)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    return optimizer


def _schedule(opt: torch.optim.Optimizer, schedule: str, per_epoch: int | None, epochs: int) -> Any:
    """The named schedule, stepped once per optimiser step."""
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    if schedule not in ("onecycle", "piecewise"):
        raise ValueError(f"schedule must be 'onecycle', 'piecewise' or 'constant'; got {schedule!r}")
    if per_epoch is None or per_epoch == 0:
        raise ValueError(f"schedule={schedule!r} needs len(loader); pass schedule='constant' or a scheduler")
    total = per_epoch * epochs
    if schedule == "onecycle":
        peak = [g["lr"] for g in opt.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak, total_steps=total)
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[total // 2, (3 * total) // 4], gamma=0.1)

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


