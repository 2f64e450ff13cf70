"""Clean and robust accuracy of a model over a loader, under one or more attacks.

Robust accuracy here counts a sample as correct only if it is classified correctly clean and at every
iterate of the attack (the start and the final point included). With ``early_stop=True`` (default), PGD
attacks stop spending steps on a sample as soon as it is misclassified and drop it from the batch (after
every step on CPU; at steps 1, 2, 4, 8, ... on accelerators, one host sync each); with
``early_stop=False`` every step is run with ``keep_best``. Both count the same samples as broken: the
trajectory of a sample until its first misclassification does not depend on the others (eval mode), so the
accuracies agree.

Examples:
    >>> import torch, advfeat as af
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    >>> data = TensorDataset(torch.rand(32, 4), torch.randint(0, 2, (32,)))
    >>> result = af.evaluate(model, DataLoader(data, batch_size=16), {"l2": af.L2PGD(0.5)}, progress=False)
    >>> result.total, 0 <= result.robust_accuracy("l2") <= result.clean_accuracy <= 1
    (32, True)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ._checks import check_batch, check_logits
from .adapters import batch_xy, check_keys, classifier
from .attacks import Attack
from .guard import device_of, frozen_model
from .progress import progress_bar

__all__ = ["evaluate", "EvalResult", "shifted_accuracy"]


@dataclass
class EvalResult:
    """Counts from ``evaluate``; accuracies are fractions in [0, 1]."""

    total: int = 0
    clean_correct: int = 0
    robust_correct: dict[str, int] = field(default_factory=dict)
    worst_correct: int | None = None

    @property
    def clean_accuracy(self) -> float:
        return self.clean_correct / self.total if self.total else float("nan")

    def robust_accuracy(self, name: str) -> float:
        """Accuracy under the attack named ``name``."""
        return self.robust_correct[name] / self.total if self.total else float("nan")

    @property
    def worst_accuracy(self) -> float | None:
        """Accuracy under the worst case over all attacks (correct only if no attack broke the sample)."""
        if self.worst_correct is None:
            return None
        return self.worst_correct / self.total if self.total else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "clean_correct": self.clean_correct,
            "clean_accuracy": self.clean_accuracy,
            "robust_correct": dict(self.robust_correct),
            "robust_accuracy": {k: self.robust_accuracy(k) for k in self.robust_correct},
            "worst_correct": self.worst_correct,
            "worst_accuracy": self.worst_accuracy,
        }

    def __str__(self) -> str:
        lines = [f"clean: {self.clean_accuracy:.2%} ({self.clean_correct}/{self.total})"]
        for k, c in self.robust_correct.items():
            lines.append(f"{k}: {self.robust_accuracy(k):.2%} ({c}/{self.total})")
        if self.worst_correct is not None and len(self.robust_correct) > 1:
            lines.append(f"worst case: {self.worst_accuracy:.2%} ({self.worst_correct}/{self.total})")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


def _named(attacks: Attack | Sequence[Attack] | Mapping[str, Attack] | None) -> dict[str, Attack]:
    if attacks is None:
        return {}
    if isinstance(attacks, Attack):
        attacks = [attacks]
    if isinstance(attacks, (str, bytes)) or not isinstance(attacks, (Mapping, Sequence)):
        raise TypeError(f"attacks must be an advfeat Attack, a list of them or a dict name -> Attack; got "
                        f"{attacks!r}")
    named = dict(attacks) if isinstance(attacks, Mapping) else {repr(a): a for a in attacks}
    for name, a in named.items():
        if not isinstance(a, Attack):
            raise TypeError(f"attacks must be advfeat Attacks, got {a!r} for {name!r}")
        if a.targeted:
            raise ValueError(f"attacks: evaluate measures untargeted robustness; {name!r} is targeted")
    return named


def shifted_accuracy(model: nn.Module, data: Any, shift: int = 0, device: str | torch.device | None = None) -> float:
    """The share of samples the model predicts as ``(y + shift) mod C``: the accuracy (``shift=0``), or how often
    a model trained on D_det follows the shifted robust features (``shift=1``). ``data``: a Dataset of
    ``(x, y)`` (read in batches of 500) or any iterable of batches.

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from advfeat.evaluate import shifted_accuracy
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> data = TensorDataset(torch.rand(6, 1, 2, 2), torch.zeros(6, dtype=torch.long))
        >>> sum(shifted_accuracy(model, data, shift=k) for k in range(3))
        1.0
    """
    dev = device_of(model, device)
    batches = DataLoader(data, batch_size=500) if isinstance(data, Dataset) else data
    hits = total = 0
    with torch.no_grad(), frozen_model(model):
        for batch in batches:
            x, y = batch_xy(batch)
            logits = classifier(model)(x.to(dev))
            hits += int((logits.argmax(1).cpu() == (y.cpu() + shift) % logits.shape[1]).sum())
            total += len(y)
    return hits / max(1, total)


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    attacks: Attack | Sequence[Attack] | Mapping[str, Attack] | None = None,
    *,
    early_stop: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
    generator: torch.Generator | None = None,
    keys: tuple[str, str] | None = None,
) -> EvalResult:
    """Clean accuracy, robust accuracy per attack and the worst case over attacks.

    Args:
        model: maps a batch in [0, 1] to logits (N, C); run in eval mode, its state is restored.
        loader: yields ``(x, y, ...)`` tuples or mappings with image and label keys (a DataLoader or any
            iterable; see ``advfeat.adapters``).
        keys: ``(image key, label key)`` of mapping batches, when not among the common names.
        attacks: an attack, a list (named by their repr) or a dict name -> attack. Untargeted only.
        early_stop: stop attacking samples once misclassified (same accuracy, less work).
        device: where to run; default: the device of the model's parameters.
        progress: show a progress bar (tqdm, notebook aware).
        generator: the random source for attacks with random starts.
    """
    keys = check_keys(keys)
    model = classifier(model)
    named = _named(attacks)
    runs = {k: a.for_evaluation(early_stop) for k, a in named.items()}
    dev = device_of(model, device)
    total = torch.zeros((), dtype=torch.long, device=dev)
    clean = torch.zeros((), dtype=torch.long, device=dev)
    robust = {k: torch.zeros((), dtype=torch.long, device=dev) for k in runs}
    worst = torch.zeros((), dtype=torch.long, device=dev)
    lower, upper = next(iter(runs.values())).box if runs else (0.0, 1.0)
    with frozen_model(model) as m, progress_bar(loader, desc="evaluate", enabled=progress) as bar:
        for batch_no, batch in enumerate(bar):
            x, y = batch_xy(batch, keys, f"loader, batch {batch_no}")
            x, y = check_batch(x, y, lower, upper)
            x, y = x.to(dev), y.to(dev)
            with torch.no_grad():
                logits = m(x)
            check_logits(logits, y)
            if not bool(torch.isfinite(logits).all()):
                raise FloatingPointError(f"model ({type(model.model).__name__}) returned non-finite logits (NaN or "
                                         f"inf) on loader batch {batch_no}: no accuracy is reported for it")
            correct = logits.argmax(1) == y
            total += y.shape[0]
            clean += correct.sum()
            keep = correct.nonzero().squeeze(1)
            xs, ys = x.index_select(0, keep), y.index_select(0, keep)
            still: Tensor = torch.ones_like(ys, dtype=torch.bool)
            for k, attack in runs.items():
                if ys.shape[0] == 0:  # nothing left to attack (known: nonzero synced); some models refuse empty batches
                    break
                try:
                    x_adv = attack(m, xs, ys, generator=generator)
                except FloatingPointError as e:
                    raise FloatingPointError(f"loader batch {batch_no}, attack {k!r}: {e}") from None
                with torch.no_grad():
                    ok = m(x_adv).argmax(1) == ys
                robust[k] += ok.sum()
                still &= ok
            worst += still.sum()
            if progress:
                bar.set_postfix(clean=f"{clean.item() / max(total.item(), 1):.3f}", refresh=False)
    if int(total) == 0:
        raise ValueError("loader yielded no samples: there is no accuracy to report")
    return EvalResult(
        total=int(total), clean_correct=int(clean),
        robust_correct={k: int(v) for k, v in robust.items()},
        worst_correct=int(worst) if runs else None,
    )
