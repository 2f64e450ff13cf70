"""The machinery every construction runs on: the source read in order, the targets of a relabelling, the
sharded, resumable build, and the fingerprints that tie a folder to its model and data.

``advfeat.construct`` (robustify, nonrobustify) and ``advfeat.controls`` (the critics' constructions) describe
*what* one batch becomes (a ``work(idx, x, y) -> (images, labels, meta)`` function); ``build`` runs it over the
source shard by shard, in memory or streamed to a folder (``advfeat.store``), resuming after a crash and split
across ``torch.distributed`` ranks. Package-internal: users call the constructions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, Sampler, SequentialSampler, default_collate

from ._checks import check_batch, check_labels, check_logits, check_positive_int
from ._dist import barrier, rank_world
from ._io import TMP_SUFFIX
from ._lock import exclusive_for_job, folder_lock
from .adapters import batch_xy, check_keys, classifier
from .guard import device_of, frozen_model
from .progress import interrupted, progress_bar
from .store import (
    FORMAT,
    ConstructedDataset,
    check_directory,
    finished_shards,
    prepare_directory,
    shard_count,
    write_shard,
)

__all__ = ["Source", "Targets", "Work", "build", "classes", "model_fingerprint", "prepare"]

Work = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], "tuple[Tensor, Tensor, dict[str, Tensor]]"]
"""What one batch becomes: ``work(idx, x, y, other) -> (images, labels, meta)``, ``idx`` the samples' positions,
``other`` the images of their companion samples (``build(companion=)``: robustify's starting images), else None."""


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
        return self._checked(_Collate(self.collate)(items), ids[0], ids[-1], what)

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
            x, y = self._checked(batch, idx[0], idx[-1], "loader")
            yield torch.tensor(idx), x, y

    def _checked(self, batch: Any, first: int, last: int, what: str) -> tuple[Tensor, Tensor]:
        x, y = batch_xy(batch, self.keys, f"{what}, samples {first}..{last}")
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
        digest.update(x.detach().float().cpu().contiguous().numpy().tobytes())
        digest.update(y.detach().cpu().numpy().astype(np.int64).tobytes())

    def fingerprint(self) -> str:
        """sha256 of the size and of up to 64 evenly spaced samples (images and labels), in order."""
        h = hashlib.sha256(str(self.n).encode())
        picks = torch.linspace(0, self.n - 1, min(64, self.n)).round().long()
        self.hash(h, *self.get(picks))
        return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256(type(model).__name__.encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


def build(
    source: Source,
    config: dict[str, Any],
    fields: list[str],
    work: Work,
    *,
    out: str | Path | None,
    shard_size: int,
    storage: str,
    device: torch.device,
    progress: bool,
    desc: str,
    companion: Tensor | None = None,
) -> ConstructedDataset:
    """Run ``work(idx, x, y, other) -> (images, labels, meta)`` over the source, shard by shard.

    ``companion`` (one source index per sample): the images of those samples stream beside each batch through a
    second loader with the same settings, as ``other``. With ``out``, the folder is checked (nothing written) and
    then held by this job for the whole build (``advfeat._lock``): a second writer stops at once with an error
    naming the holder.
    """
    if out is None:
        parts: dict[int, dict[str, np.ndarray]] = {}
        interrupted(f"{desc}: interrupted; built in memory, nothing was kept (pass out=folder to keep finished "
                    "shards and resume)", _run_shards, source, list(range(shard_count(source.n, shard_size))), work,
                    lambda s, shard, _digest: parts.__setitem__(s, shard),
                    shard_size=shard_size, storage=storage, device=device, progress=progress, desc=desc,
                    classes=config.get("classes"), companion=companion)
        order = sorted(parts)
        return ConstructedDataset([torch.from_numpy(parts[s]["images"]) for s in order],
                                  [parts[s]["labels"] for s in order],
                                  {f: [parts[s][f] for s in order] for f in fields}, config)
    from . import __version__

    root = Path(out)
    n_shards = shard_count(source.n, shard_size)
    rank, world = rank_world()
    manifest = {"format": FORMAT, "library": f"advfeat {__version__}", "config": config,
                "shards": n_shards, "fields": fields}
    check_directory(root, manifest)  # refuse a foreign folder before the lock file is created in it
    with exclusive_for_job(folder_lock(root), f"out={str(root)!r}"):
        if rank == 0:
            prepare_directory(root, manifest)
            for pattern in (f".shard-*{TMP_SUFFIX}", f".manifest.json.*{TMP_SUFFIX}"):  # writes killed half-way
                for tmp in root.glob(pattern):
                    tmp.unlink(missing_ok=True)
        barrier()
        if rank != 0:
            prepare_directory(root, manifest)
        records = finished_shards(root, verify=True)
        done = set(records)
        _same_source(source, {s: r for s, r in records.items() if s % world == rank}, root)
        todo = [s for s in range(n_shards) if s % world == rank and s not in done]
        interrupted(f"{desc}: interrupted; the finished shards are kept in {root}: call again with the same "
                    f"settings and out={str(root)!r} to resume", _run_shards, source, todo, work,
                    lambda s, shard, digest: write_shard(root, s, s * shard_size, shard, digest),
                    shard_size=shard_size, storage=storage, device=device, progress=progress and rank == 0,
                    desc=desc, classes=config.get("classes"), companion=companion)
        barrier()
    return ConstructedDataset.load(root)


def _run_shards(
    source: Source,
    todo: list[int],
    work: Work,
    finish: Callable[[int, dict[str, np.ndarray], str], None],
    *,
    shard_size: int,
    storage: str,
    device: torch.device,
    progress: bool,
    desc: str,
    classes: int | None,
    companion: Tensor | None = None,
) -> None:
    """Build the shards ``todo`` in order, batch by batch, handing each finished shard to ``finish``."""
    ranges = [(s * shard_size, min(source.n, (s + 1) * shard_size)) for s in todo]
    total = sum(stop - start for start, stop in ranges)
    written: list[int] = []
    with (closing(source.batches(ranges)) as batches,  # one loader for all: the caller's workers stay up
          closing(source.batches(ranges if companion is not None else [], companion)) as others,
          progress_bar(None, desc=desc, enabled=progress, total=total, unit="img") as bar):
        for s, (start, stop) in zip(todo, ranges, strict=True):
            arrays: dict[str, list[np.ndarray]] = {}
            digest = hashlib.sha256()  # every source sample's bytes, as they stream: no extra pass
            for _ in range(start, stop, source.batch_size):
                idx, x, y = next(batches)
                source.hash(digest, x, y)
                if classes is not None:  # a dataset without .labels: checked as it streams, on the CPU copy
                    kept = f"{len(written)} finished shards are kept" if written else "nothing was written"
                    check_labels(y, classes, f"loader's labels, samples {int(idx[0])}..{int(idx[-1])} ({kept}: fix "
                                 "the labels and call again to resume)")
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # pinned by the loader
                other = next(others)[1].to(device, x.dtype, non_blocking=True) if companion is not None else None
                images, labels, meta = work(idx, x, y, other)
                stored = images.detach().float().cpu()
                if not bool(torch.isfinite(stored).all()):  # nothing non-finite is ever written
                    raise FloatingPointError(
                        f"{desc}: samples {int(idx[0])}..{int(idx[-1])} (shard {s}) came out non-finite (NaN or inf): "
                        "the model's output or gradient is not finite there; nothing of this shard was written "
                        "(finished shards are kept)")
                if storage == "uint8":
                    stored = stored.mul(255).round_().clamp_(0, 255).to(torch.uint8)
                for k, v in {"images": stored, "labels": labels.detach().cpu().long(), **meta}.items():
                    arrays.setdefault(k, []).append(v.detach().cpu().numpy())
                bar.update(len(idx))
            finish(s, {k: np.concatenate(v) for k, v in arrays.items()}, digest.hexdigest())
            written.append(s)


def classes(model: nn.Module, source: Source, device: torch.device) -> int:
    x, y = source.get(torch.arange(min(2, source.n)))
    with torch.no_grad(), frozen_model(model):
        logits = classifier(model)(x.to(device))
    c = check_logits(logits, y.to(device))
    labels = source.labels()
    if labels is not None:  # all labels up front when the dataset exposes them, before anything is written
        check_labels(labels, c, "loader's labels")
    return c


class Targets:
    """The new label of sample ``i``: ``(y + 1) mod C`` (det), or ``y`` plus an offset in [1, C) drawn for the
    whole dataset from ``seed`` (rand). Shared by every construction that relabels (nonrobustify, the controls)."""

    def __init__(self, mode: str, classes: int, n: int, seed: int) -> None:
        self.mode, self.classes = mode, classes
        self.offsets = torch.randint(1, classes, (n,), generator=torch.Generator().manual_seed(seed))

    def __call__(self, idx: Tensor, y: Tensor) -> Tensor:
        shift = 1 if self.mode == "det" else self.offsets[idx].to(y.device)
        return (y + shift) % self.classes


def _same_source(source: Source, records: dict[int, dict[str, Any]], root: Path) -> None:
    """On resume: the samples of every finished shard must be those it was built from (re-read and hashed, no
    model runs); a shard written before advfeat 0.2 has no source hash and is taken as it is."""
    checked = [(s, r) for s, r in sorted(records.items()) if r.get("source_sha256") is not None]
    ranges = [(int(r["start"]), int(r["stop"])) for _, r in checked]
    with closing(source.batches(ranges)) as batches:  # one loader for every shard, as the build reads them
        for (s, record), (start, stop) in zip(checked, ranges, strict=True):
            digest = hashlib.sha256()
            for _ in range(start, stop, source.batch_size):
                _, x, y = next(batches)
                Source.hash(digest, x, y)
            if digest.hexdigest() != record["source_sha256"]:
                raise ValueError(f"out={str(root)!r}: the source's samples {start}..{stop - 1} are not those shard "
                                 f"{s} was built from (the data changed since): resume with the original data, or "
                                 "use another out= to build from this data")


def prepare(model: nn.Module, loader: Any, *, mode: str | None, seed: int, batch_size: int | None, lower: float,
            upper: float, device: str | torch.device | None, keys: tuple[str, str] | None
            ) -> tuple[Source, torch.device, int, Targets | None, str]:
    """What every construction starts with, checked before anything is written: the source, the device, the
    number of classes (every label checked against it when the dataset exposes them), the targets of a relabelling
    (``mode`` ``"det"`` / ``"rand"``, else None) and the model's fingerprint."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if mode is not None and mode not in ("det", "rand"):
        raise ValueError(f"mode must be 'det' (t = y + 1 mod C) or 'rand' (t uniform over the other classes); "
                         f"got {mode!r}")
    dev = device_of(model, device)
    source = Source(loader, batch_size, lower, upper, keys)
    c = classes(model, source, dev)
    if mode is not None and c < 2:
        raise ValueError(f"mode={mode!r} needs a model with at least 2 classes, got {c}")
    targets = Targets(mode, c, source.n, seed) if mode is not None else None
    return source, dev, c, targets, model_fingerprint(model)
