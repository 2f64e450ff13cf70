"""One construction, validated once: the source read in order, the model, the device, the classes, the targets of a
relabelling, and the config and manifest that tie a folder to them.

``specify`` checks everything a construction depends on before anything is written and returns a ``Spec``;
``advfeat.construct.shards`` runs it. The caller's ``model`` enters here once: its type is checked, its device
resolved (``advfeat.guard.device_of``), its output adapted (``advfeat.adapters.classifier``), its classes read from
one forward pass and its fingerprint taken.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, Sampler, SequentialSampler, default_collate

from .._checks import check_batch, check_labels, check_logits, check_positive_int, check_seed
from .._digest import fingerprint, tensor_bytes
from .._version import __version__
from ..adapters import batch_xy, check_keys, classifier
from ..guard import device_of, frozen_model

__all__ = ["Source", "Targets", "Spec", "Build", "BuildOptions", "specify", "STORAGE"]

STORAGE = ("float32", "uint8")
"""How images are stored: ``"float32"`` (exact) or ``"uint8"`` (quantised to 1/255, which can erase non-robust
features)."""


class _Collate:
    """The caller's collate function, except for a dataset whose ``__getitems__`` already returns a batch."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: Any) -> Any:
        return self.collate(items) if isinstance(items, list) else items


class _Ranges(Sampler[list[int]]):
    """Batches of consecutive indices: ``batch_size`` at a time within each ``(start, stop)`` range, in order;
    with ``through``, each index ``i`` is replaced by ``through[i]`` (the companion samples of the same batches)."""

    def __init__(self, ranges: Sequence[tuple[int, int]], batch_size: int, through: Tensor | None = None) -> None:
        self.ranges, self.batch_size = list(ranges), batch_size
        self.through = None if through is None else through.tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for start, stop in self.ranges:
            for b0 in range(start, stop, self.batch_size):
                ids = range(b0, min(stop, b0 + self.batch_size))
                yield list(ids) if self.through is None else [self.through[i] for i in ids]

    def __len__(self) -> int:
        return sum(-(-(stop - start) // self.batch_size) for start, stop in self.ranges)


def _every_index_in_order(sampler: Any, dataset: Any) -> bool:
    """Whether ``sampler`` yields 0, 1, ..., len(dataset) - 1: a ``SequentialSampler`` over a source as long as the
    dataset."""
    if not isinstance(sampler, SequentialSampler):
        return False
    try:
        return len(sampler) == len(dataset)
    except TypeError:
        return False


class Source:
    """The source samples in order, batched like the caller's loader.

    Streaming (``batches``) goes through a DataLoader with the caller's workers, pinning, collate function and
    worker settings over a sequential index range (robustify's starting images through a second such loader), so
    a dataset that decodes images feeds the device from worker processes; random access (``get``: the fingerprint,
    the class probe) reads in this process.
    """

    def __init__(self, data: Any, batch_size: int | None, lower: float, upper: float,
                 keys: tuple[str, str] | None = None) -> None:
        self.lower, self.upper, self.keys = lower, upper, check_keys(keys)
        if isinstance(data, DataLoader):
            if not isinstance(data.sampler, SequentialSampler) or getattr(data.batch_sampler, "drop_last", False):
                raise ValueError("loader must not shuffle, sample or drop samples: order matters for resume and "
                                 "for the (seed, index) randomness; pass DataLoader(dataset, shuffle=False) or the "
                                 "Dataset itself")
            batches = data.batch_sampler
            if batches is not None and not (type(batches) is BatchSampler and _every_index_in_order(batches.sampler,
                                                                                                   data.dataset)):
                raise ValueError(f"loader's batch_sampler ({type(batches).__name__}) must batch every sample in "
                                 "order (a construction reads the whole dataset, sample i as the i-th): pass "
                                 "DataLoader(dataset, batch_size=..., shuffle=False) or the Dataset itself")
            self.dataset: Any = data.dataset
            self.collate: Callable[[list[Any]], Any] = data.collate_fn
            self.batch_size = batch_size if batch_size is not None else (data.batch_size or 128)
            workers = int(data.num_workers)
            self.options: dict[str, Any] = {
                "num_workers": workers, "pin_memory": bool(data.pin_memory), "timeout": data.timeout,
                "worker_init_fn": data.worker_init_fn, "multiprocessing_context": data.multiprocessing_context,
                "pin_memory_device": getattr(data, "pin_memory_device", ""),
            }
            if workers > 0:
                self.options.update(prefetch_factor=data.prefetch_factor, persistent_workers=False)
        elif (hasattr(data, "__getitem__") and hasattr(data, "__len__")
              and not isinstance(data, (IterableDataset, Tensor))):  # map-style: a torch or a datasets Dataset
            self.dataset, self.collate = data, default_collate
            self.batch_size = batch_size if batch_size is not None else 128
            self.options = {}
        else:
            raise TypeError(f"loader must be a non-shuffling DataLoader or a map-style Dataset (len and [i]), got "
                            f"{type(data).__name__}")
        check_positive_int("batch_size", self.batch_size)
        try:
            self.n = len(self.dataset)
        except TypeError:
            raise TypeError("loader's dataset must have a length (a map-style Dataset)") from None
        if self.n < 1:
            raise ValueError("loader's dataset is empty")

    def get(self, idx: Tensor, what: str = "loader") -> tuple[Tensor, Tensor]:
        """The samples ``idx``, read in this process."""
        ids = idx.tolist()
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(ids) if getitems is not None else [self.dataset[i] for i in ids]
        return self._checked(_Collate(self.collate)(items), ids, what)

    def batches(self, ranges: Sequence[tuple[int, int]], through: Tensor | None = None
                ) -> Generator[tuple[Tensor, Tensor, Tensor], None, None]:
        """``(idx, x, y)`` for the samples of each ``(start, stop)`` range in order, ``batch_size`` at a time (a
        batch never crosses a range's end), read through the caller's workers, pinning and collate function.
        With ``through`` (one index per sample), the samples read, and the ``idx`` yielded, are ``through[idx]``."""
        sampler = _Ranges(ranges, self.batch_size, through)
        if len(sampler) == 0:
            return
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=_Collate(self.collate), **self.options)
        ids = iter(sampler)
        for batch in loader:
            idx = next(ids)
            x, y = self._checked(batch, idx, "loader")
            yield torch.tensor(idx), x, y

    def _checked(self, batch: Any, ids: Sequence[int], what: str) -> tuple[Tensor, Tensor]:
        first, last = ids[0], ids[-1]
        x, y = batch_xy(batch, self.keys, f"{what}, samples {first}..{last}")
        if x.shape[0] != len(ids) or y.shape[0] != len(ids):
            raise ValueError(f"{what}: its collate_fn returned {x.shape[0]} samples for the {len(ids)} samples "
                             f"{first}..{last}: a construction needs one output per input sample, in order")
        try:
            return check_batch(x, y, self.lower, self.upper)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{what}, samples {first}..{last}: {e}") from None

    def labels(self) -> Tensor | None:
        """All labels, when the dataset exposes them cheaply (else None: checked batch by batch)."""
        ds = self.dataset
        for attr in ("labels", "targets"):
            v = getattr(ds, attr, None)
            if isinstance(v, (Tensor, np.ndarray, list)):
                return torch.as_tensor(v)
        tensors = getattr(ds, "tensors", None)
        if isinstance(tensors, tuple) and len(tensors) == 2 and isinstance(tensors[1], Tensor):
            return tensors[1]
        return None

    @staticmethod
    def hash(digest: Any, x: Tensor, y: Tensor) -> None:
        """Add a batch's samples (images as float32, labels as int64) to ``digest``."""
        digest.update(tensor_bytes(x.float()))
        digest.update(tensor_bytes(y.long()))

    def fingerprint(self) -> str:
        """sha256 of the size and of up to 64 evenly spaced samples (images and labels), in order."""
        h = hashlib.sha256(str(self.n).encode())
        picks = torch.linspace(0, self.n - 1, min(64, self.n)).round().long()
        self.hash(h, *self.get(picks))
        return h.hexdigest()[:16]


class Targets:
    """The new label of sample ``i``: ``(y + 1) mod C`` (det), or ``y`` plus an offset in [1, C) drawn for the
    whole dataset from ``seed`` (rand). Shared by every construction that relabels (nonrobustify, the controls)."""

    def __init__(self, mode: str, classes: int, n: int, seed: int) -> None:
        self.mode, self.classes = mode, classes
        self.offsets = torch.randint(1, classes, (n,), generator=torch.Generator().manual_seed(seed))

    def __call__(self, idx: Tensor, y: Tensor) -> Tensor:
        shift = 1 if self.mode == "det" else self.offsets[idx].to(y.device)
        return (y + shift) % self.classes


@dataclass(frozen=True)
class Spec:
    """One validated construction: ``model`` (the caller's, adapted to return logits), the ``source``, the
    ``device``, the number of ``classes``, the ``targets`` of a relabelling (else None), the ``config`` recorded in
    its manifest and its per-sample ``fields``, and how it is stored."""

    model: nn.Module
    source: Source
    device: torch.device
    classes: int
    targets: Targets | None
    config: dict[str, Any]
    fields: tuple[str, ...]
    out: Path | None
    shard_size: int
    storage: str
    progress: bool
    desc: str

    def manifest(self) -> dict[str, Any]:
        """What a folder of this construction records (``advfeat.construct.store``)."""
        from .store import FORMAT, shard_count

        return {"format": FORMAT, "library": f"advfeat {__version__}", "config": self.config,
                "shards": shard_count(self.source.n, self.shard_size), "fields": list(self.fields)}


@dataclass(frozen=True)
class Build:
    """What every construction takes besides its own settings: the ``seed`` (sample ``i``'s randomness depends
    only on ``(seed, i)``), the pixel box ``lower`` / ``upper``, where it streams (``out``, ``shard_size``,
    ``storage``), how it reads (``batch_size``, ``keys`` of mapping batches), the ``device`` and the progress bar.
    A construction's public function takes these as keywords and hands them to ``specify`` as one ``Build``; a new
    construction declares only its own parameters and ``**build: Unpack[BuildOptions]``."""

    seed: int = 0
    lower: float = 0.0
    upper: float = 1.0
    out: str | Path | None = None
    shard_size: int = 4096
    batch_size: int | None = None
    storage: str = "float32"
    device: str | torch.device | None = None
    progress: bool = True
    keys: tuple[str, str] | None = None


class BuildOptions(TypedDict, total=False):
    """``Build``'s fields as keyword arguments (``**build: Unpack[BuildOptions]`` in a construction's signature)."""

    seed: int
    lower: float
    upper: float
    out: str | Path | None
    shard_size: int
    batch_size: int | None
    storage: str
    device: str | torch.device | None
    progress: bool
    keys: tuple[str, str] | None


def specify(kind: str, model: nn.Module, loader: Any, build: Build, *, settings: Mapping[str, Any],
            fields: Sequence[str], desc: str, mode: str | None = None,
            extra: Mapping[str, Any] | None = None) -> Spec:
    """Check a construction before anything is written and return its ``Spec``.

    ``build``: the parameters every construction shares; ``settings``: the construction's own recorded settings
    (after ``kind``, before the common ones); ``mode``: ``"det"`` / ``"rand"`` for a relabelling (its targets), else
    None; ``extra``: config entries recorded after the common ones (and only when given, so folders built before
    they existed still resume).
    """
    seed, lower, upper, batch_size, shard_size = build.seed, build.lower, build.upper, build.batch_size, \
        build.shard_size
    storage, device, keys, out, progress = build.storage, build.device, build.keys, build.out, build.progress
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if mode is not None and mode not in ("det", "rand"):
        raise ValueError(f"mode must be 'det' (t = y + 1 mod C) or 'rand' (t uniform over the other classes); "
                         f"got {mode!r}")
    check_positive_int("shard_size", shard_size)
    check_seed("seed", seed)
    if storage not in STORAGE:
        raise ValueError(f"storage must be 'float32' (default, exact) or 'uint8' (quantised to 1/255, which can "
                         f"erase non-robust features); got {storage!r}")
    dev = device_of(model, device)
    source = Source(loader, batch_size, lower, upper, keys)
    clf = classifier(model)
    x, y = source.get(torch.arange(min(2, source.n)))
    with torch.no_grad(), frozen_model(clf):
        c = check_logits(clf(x.to(dev)), y.to(dev))
    labels = source.labels()
    if labels is not None:  # all labels up front when the dataset exposes them, before anything is written
        check_labels(labels, c, "loader's labels")
    if mode is not None and c < 2:
        raise ValueError(f"mode={mode!r} needs a model with at least 2 classes, got {c}")
    config = {"kind": kind, **settings, "seed": seed, "lower": lower, "upper": upper, "n": source.n, "classes": c,
              "shard_size": shard_size, "batch_size": source.batch_size, "storage": storage,
              "model": fingerprint(model), "data": source.fingerprint(), **(extra or {})}
    return Spec(clf, source, dev, c, None if mode is None else Targets(mode, c, source.n, seed), config,
                tuple(fields), None if out is None else Path(out), shard_size, storage, progress, desc)
