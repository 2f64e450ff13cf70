"""What every part of advfeat needs from a model: the state guard, one device resolution, one prediction helper.

* ``frozen_model``: run a model with frozen parameters (in eval mode by default) and put every bit of its state
  back afterwards; attacks, evaluation, the trainer's attacks and the constructors all run inside it.
* ``device_of``: where work on a model runs: the ``device`` asked for (checked), else where its parameters (or
  buffers) are, else the CPU.
* ``predict``: the class a model predicts for each sample, without gradients and with its state guarded.

What a model's output may be (a tensor, a mapping with ``"logits"``, a Hugging Face output) is decided in one
place, ``advfeat.adapters``.

Examples:
    >>> import torch, advfeat as af
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.Dropout(0.5)).train()
    >>> af.guard.predict(model, torch.rand(2, 1, 2, 2)).shape, model.training   # eval mode inside, restored after
    (torch.Size([2]), True)
    >>> af.guard.device_of(model)
    device(type='cpu')
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ._checks import check_device
from .adapters import Classifier, logits_of

__all__ = ["frozen_model", "model_lock", "device_of", "predict", "check_input"]

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
"""The models frozen now (by the thread that holds their lock), with the mode they were frozen in."""


def _inner(model: nn.Module) -> nn.Module:
    while isinstance(model, Classifier):
        model = model.model
    return model


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock ``frozen_model`` holds on ``model`` (one per model, re-entrant, forgotten with the model; the
    model inside advfeat's output adapters, ``advfeat.adapters.Classifier``, is the one locked)."""
    model = _inner(model)
    with _LOCKS_LOCK:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextmanager
def frozen_model(model: nn.Module, *, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Run ``model`` with frozen parameters (and in eval mode), then put every bit of its state back.

    Restored on exit, also after an exception: every module's ``training`` flag, every parameter's
    ``requires_grad``, every buffer's values (BatchNorm running statistics, even when ``eval_mode=False``
    lets them change). Parameters' ``.grad`` are left alone: nothing inside computes parameter gradients.

    The model's lock (``model_lock``) is held throughout: threads that attack or evaluate one shared model take
    turns, so each sees the model as its caller left it and none restores a state another one set (re-entrant:
    an attack inside an evaluation of the same model, in one thread, nests, and a nested block in the same mode
    does nothing more).
    """
    with model_lock(model):
        key = _inner(model)
        if _ACTIVE.get(key) == eval_mode:  # already frozen so by an enclosing block of this thread: nothing to redo
            yield model
            return
        before = _ACTIVE.get(key)
        _ACTIVE[key] = eval_mode
        try:
            with _frozen(model, eval_mode) as m:
                yield m
        finally:
            if before is None:
                del _ACTIVE[key]
            else:
                _ACTIVE[key] = before


@contextmanager
def _frozen(model: nn.Module, eval_mode: bool) -> Iterator[nn.Module]:
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        if eval_mode:
            model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)
        with torch.no_grad():
            for b, saved in buffers:  # through .data: the values return without bumping the version counter that
                b.data.copy_(saved)   # autograd checks for a backward still to come (BatchNorm's, in TRADES)


def device_of(model: nn.Module, device: str | torch.device | None = None) -> torch.device:
    """``device`` (checked: it must exist here), or where ``model``'s parameters (or buffers) are; the CPU for a
    model without either."""
    if device is not None:
        return check_device("device", device)
    for t in model.parameters():
        return t.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def check_input(model: nn.Module, x: Tensor, what: str = "x") -> None:
    """Refuse a batch the model cannot take, naming both: ``x`` on another device than every parameter of the
    model (a meta model included), or of another floating dtype than every floating parameter outside
    ``torch.autocast`` (fp16 / bf16 pixels into a float32 model). No host sync."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    if not params:
        return
    if all(p.device != x.device for p in params):
        raise ValueError(f"{what} is on {x.device} but the model's parameters are on {params[0].device}: move the "
                         f"batch or the model (a model on the meta device holds no weights to compute with)")
    if all(p.dtype != x.dtype for p in params) and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{what} has dtype {x.dtype} but the model's parameters are {params[0].dtype}: cast the "
                        f"batch ({what}.to({params[0].dtype})) or the model, or run under torch.autocast")


def predict(model: nn.Module, x: Tensor) -> Tensor:
    """The class ``model`` predicts for each sample of ``x`` (the argmax of its logits, in any output form of
    ``advfeat.adapters``), computed without gradients, in eval mode, with the model's state restored after."""
    with torch.no_grad(), frozen_model(model):
        return logits_of(model(x)).argmax(1)
