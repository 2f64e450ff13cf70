"""Any model, any loader: the one place that decides what a model's output and a loader's batch may be.

A model's output may be

* a logits tensor ``(N, C)``,
* a mapping with a ``"logits"`` entry (a dict), or
* an object with a ``.logits`` tensor attribute (Hugging Face's ``ModelOutput``, e.g. ``ImageClassifierOutput``).

A batch may be

* a tuple or list ``(x, y, ...)`` (extra entries are ignored), or
* a mapping (a Hugging Face ``datasets`` batch), with the image and the label found among the common key names
  (``IMAGE_KEYS``, ``LABEL_KEYS``) or named by ``keys=("pixel_values", "label")``.

Every attack, ``evaluate``, the trainer's methods, the constructors and the controls go through ``classifier``
and ``batch_xy``; anything else is refused with an error that lists the accepted forms.

Examples:
    >>> import torch, advfeat as af
    >>> from torch import nn
    >>> class HF(nn.Module):                      # returns {"logits": ...} like a transformers model
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 3)
    ...     def forward(self, x):
    ...         return {"logits": self.fc(x.flatten(1))}
    >>> model = af.adapters.classifier(HF())
    >>> model(torch.rand(2, 1, 2, 2)).shape
    torch.Size([2, 3])
    >>> x, y = af.adapters.batch_xy({"pixel_values": torch.rand(2, 4), "label": torch.tensor([0, 2])})
    >>> x.shape, y.tolist()
    (torch.Size([2, 4]), [0, 2])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["IMAGE_KEYS", "LABEL_KEYS", "Classifier", "batch_xy", "check_keys", "classifier", "logits_of"]

IMAGE_KEYS = ("pixel_values", "image", "images", "input", "inputs", "x")
"""The keys a mapping batch's image may have (exactly one of them), unless ``keys=`` names it."""
LABEL_KEYS = ("label", "labels", "y", "target", "targets")
"""The keys a mapping batch's label may have (exactly one of them), unless ``keys=`` names it."""

_FORMS = "a logits tensor (N, C), a mapping with 'logits', or an object with a .logits tensor (Hugging Face)"


def logits_of(output: object, what: str = "model") -> Tensor:
    """The logits tensor in a model's ``output`` (see the module docs); a clear error for anything else."""
    if isinstance(output, Tensor):
        return output
    found = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(found, Tensor):
        return found
    shown = type(output).__name__
    if isinstance(output, (tuple, list)):
        shown += f" of {len(output)} ({', '.join(type(o).__name__ for o in output[:4])})"
    raise TypeError(f"{what} must return logits of shape (N, C): {_FORMS}; got {shown}")


class Classifier(nn.Module):
    """``model`` with its output reduced to the logits tensor (``logits_of``). Holds ``model`` as its only child:
    its parameters, buffers and training flag are the model's own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return logits_of(self.model(x))


def classifier(model: nn.Module) -> nn.Module:
    """``model`` as a module whose forward returns a logits tensor: ``model`` itself when it is already wrapped,
    else a ``Classifier`` around it (cheap: one type check per forward)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return model if isinstance(model, Classifier) else Classifier(model)


def check_keys(keys: object) -> tuple[str, str] | None:
    """``keys=``: None, or a pair ``(image key, label key)`` of a mapping batch."""
    if keys is None:
        return None
    if (not isinstance(keys, Sequence) or isinstance(keys, str) or len(keys) != 2
            or not all(isinstance(k, str) for k in keys)):
        raise TypeError(f"keys must be None or a pair of strings (image key, label key), e.g. "
                        f"('pixel_values', 'label'); got {keys!r}")
    return keys[0], keys[1]


def _find(batch: Mapping[str, Any], names: Sequence[str], what: str, where: str) -> str:
    present = [k for k in names if k in batch]
    if len(present) != 1:
        problem = "none of" if not present else f"more than one of {present} among"
        raise ValueError(f"{where}: a mapping batch must hold exactly one {what} key: found {problem} "
                         f"{list(names)} in the batch's keys {sorted(map(str, batch))}; pass keys=(image key, "
                         "label key) to name them")
    return present[0]


def batch_xy(batch: object, keys: tuple[str, str] | None = None, where: str = "loader") -> tuple[Any, Any]:
    """``(x, y)`` of a loader's batch: a tuple / list ``(x, y, ...)`` or a mapping (see the module docs).
    Types and shapes are checked by the caller (``advfeat._checks.check_batch``)."""
    if isinstance(batch, Mapping):
        if keys is not None:
            missing = [k for k in keys if k not in batch]
            if missing:
                raise ValueError(f"{where}: keys={keys!r}: the batch has no {missing}; its keys are "
                                 f"{sorted(map(str, batch))}")
            return batch[keys[0]], batch[keys[1]]
        found = batch[_find(batch, IMAGE_KEYS, "image", where)], batch[_find(batch, LABEL_KEYS, "label", where)]
        if isinstance(found[0], list):
            raise TypeError(f"{where}: the batch's images are a Python list, not a tensor: give a Hugging Face "
                            "dataset torch format first (dataset.with_format('torch'))")
        return found
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        if keys is not None:
            raise ValueError(f"{where}: keys={keys!r} names a mapping's keys, but the loader yields "
                             f"{type(batch).__name__}s (x, y, ...): drop keys= or yield mappings")
        return batch[0], batch[1]
    shown = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    raise TypeError(f"{where}: the loader must yield (x, y, ...) tuples or mappings with image and label keys "
                    f"({'/'.join(IMAGE_KEYS)} and {'/'.join(LABEL_KEYS)}); got {shown}")
