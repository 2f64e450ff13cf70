"""Every accuracy advfeat reports comes from one checked pass and one accumulator.

* ``checked_batches``: a loader's batches read from any form (``advfeat.adapters``), checked once (finite pixels
  inside the box, integer labels, the model's device and dtype), moved to the device, with the model's clean
  logits checked (shape (N, C), every label below C, nothing non-finite); an error names the batch.
* ``Tally``: per-name correctness accumulated as torchmetrics accumulates a metric: ``update(name, correct)``
  per batch (counts stay on the device: no host sync), ``compute()`` the ``EvalResult``; with per-sample flags
  kept, ``compute(indices=...)`` across ``torch.distributed`` ranks counts each dataset index once.

``evaluate``, ``robustness_curve``, ``shifted_accuracy``, ``transfer_rates`` and the FGSM-RS guard all read their
batches and count their samples here, so their checks cannot drift apart.

Examples:
    >>> import torch
    >>> from advfeat.tally import Tally, checked_batches
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> tally = Tally(["clean"], keep=True)
    >>> for _, x, y, logits in checked_batches([(torch.rand(5, 4), torch.zeros(5, dtype=torch.long))], model):
    ...     tally.update("clean", logits.argmax(1) == y)
    >>> r = tally.compute()
    >>> r.total, r.samples["clean"].shape
    (5, torch.Size([5]))
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from ._checks import check_batch, check_logits
from ._dist import all_gather_object
from .adapters import batch_xy
from .guard import check_input, device_of
from .result import EvalResult

__all__ = ["checked_batches", "Tally"]


def checked_batches(loader: Iterable[Any], model: nn.Module, keys: tuple[str, str] | None = None,
                    box: tuple[float | Tensor, float | Tensor] = (0.0, 1.0), device: torch.device | None = None,
                    what: str = "loader") -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
    """``(batch number, x, y, clean logits)`` of every batch of ``loader``, checked and on ``device`` (default: the
    model's). ``model`` must return a logits tensor (wrap it with ``advfeat.adapters.classifier``) and should be
    frozen by the caller (``advfeat.guard.frozen_model``). One host sync per batch: the finiteness of the logits."""
    dev = device if device is not None else device_of(model)
    for batch_no, batch in enumerate(loader):
        x, y = batch_xy(batch, keys, f"{what}, batch {batch_no}")
        x, y = check_batch(x, y, *box)
        x, y = x.to(dev), y.to(dev)
        check_input(model, x, f"{what}, batch {batch_no}: x")
        with torch.no_grad():
            logits = model(x)
        check_logits(logits, y)
        if not bool(torch.isfinite(logits).all()):
            inner = getattr(model, "model", model)
            raise FloatingPointError(f"model ({type(inner).__name__}) returned non-finite logits (NaN or inf) on "
                                     f"{what} batch {batch_no}: no accuracy is reported for it")
        yield batch_no, x, y, logits


class Tally:
    """Which samples are correct, per name (``"clean"``, an attack's name, ...), over the batches of a pass.

    ``update(name, correct)`` adds one batch's flags (a bool tensor, one per sample of the batch); every name is
    updated once per batch, ``"clean"`` first; ``update_worst(correct)`` the worst case over the attacks (correct
    under every one), kept apart from the names (an attack may be called "worst"). Counts stay on the device until
    ``compute``; with ``keep=True`` the flags are kept too (per-sample results, and the gathering across ranks).
    ``compute()`` gives the ``advfeat.EvalResult``."""

    def __init__(self, names: Sequence[str], *, keep: bool = False) -> None:
        if not names or names[0] != "clean":
            raise ValueError("a Tally counts 'clean' first")
        if keep and any(k in ("clean", "worst") for k in names[1:]):
            raise ValueError("attacks: 'clean' and 'worst' name the clean and the worst-case results in per-sample "
                             "results; give the attack another name")
        self.names = list(names)
        self.keep = keep
        self.counts: dict[str, Tensor | int] = {k: 0 for k in self.names}
        self.flags: dict[str, list[Tensor]] = {k: [] for k in self.names}
        self.worst: Tensor | int | None = None
        self.worst_flags: list[Tensor] = []
        self.total = 0

    def update(self, name: str, correct: Tensor) -> None:
        if name == "clean":
            self.total += int(correct.shape[0])
        self.counts[name] = self.counts[name] + correct.sum()
        if self.keep:
            self.flags[name].append(correct)

    def update_worst(self, correct: Tensor) -> None:
        self.worst = (self.worst if self.worst is not None else 0) + correct.sum()
        if self.keep:
            self.worst_flags.append(correct)

    def count(self, name: str) -> int:
        return int(self.counts[name])

    def compute(self, indices: list[int] | None = None) -> EvalResult:
        """The ``EvalResult``: from the flags when kept (per sample; with ``indices``, the dataset index of each
        sample, gathered across ranks), else from the counts."""
        attacks = self.names[1:]
        if indices is not None:
            return _gathered(self.flags, indices, self.total, bool(attacks))
        if self.total == 0:
            raise ValueError("loader yielded no samples: there is no accuracy to report")
        if self.keep:  # the worst case: every attack's flags and the clean ones (from_samples)
            return EvalResult.from_samples({k: torch.cat(v) for k, v in self.flags.items()})
        return EvalResult(total=self.total, clean_correct=self.count("clean"),
                          robust_correct={k: self.count(k) for k in attacks},
                          worst_correct=None if self.worst is None else int(self.worst))


def _gathered(flags: dict[str, list[Tensor]], indices: list[int], total: int, attacked: bool) -> EvalResult:
    """The global result of every rank's per-sample flags: gathered, each dataset index counted once (the first
    rank that holds it), in index order."""
    if len(indices) < total:
        raise ValueError(f"the loader yielded {total} samples but its DistributedSampler holds {len(indices)}")
    local = {k: (torch.cat(v).cpu() if v else torch.zeros(0, dtype=torch.bool)) for k, v in flags.items()}
    parts = cast(list[tuple[list[int], dict[str, Tensor]]], all_gather_object((indices[:total], local)))
    seen: dict[int, tuple[int, int]] = {}
    for r, (idx, _) in enumerate(parts):
        for j, i in enumerate(idx):
            seen.setdefault(int(i), (r, j))
    order = sorted(seen)
    if not order:
        raise ValueError("loader yielded no samples on any rank: there is no accuracy to report")
    merged = {k: torch.tensor([bool(parts[seen[i][0]][1][k][seen[i][1]]) for i in order], dtype=torch.bool)
              for k in flags}
    return EvalResult.from_samples(merged if attacked else {"clean": merged["clean"]},
                                   torch.tensor(order, dtype=torch.long))
