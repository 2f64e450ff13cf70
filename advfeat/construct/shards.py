"""The sharded, resumable build every construction runs on.

A construction says *what* one batch becomes (``Work``); ``build`` runs it over a validated ``Spec``'s source shard
by shard, in memory or streamed to a folder (``advfeat.construct.store``), resuming after a crash and split across
``torch.distributed`` ranks (rank ``r`` builds shards ``r, r + W, r + 2W, ...`` of one folder).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import closing
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._checks import check_labels
from .._dist import barrier, rank_world
from .._io import TMP_SUFFIX
from .._lock import exclusive_for_job, folder_lock
from ..progress import interrupted, progress_bar
from .spec import Source, Spec
from .store import ConstructedDataset, check_directory, finished_shards, prepare_directory, shard_count, write_shard

__all__ = ["Work", "build"]

Work = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], "tuple[Tensor, Tensor, dict[str, Tensor]]"]
"""What one batch becomes: ``work(idx, x, y, other) -> (images, labels, meta)``, ``idx`` the samples' positions,
``other`` the images of their companion samples (``build(companion=)``: robustify's starting images), else None."""

Finish = Callable[[int, dict[str, np.ndarray], str, "str | None"], None]
"""What becomes of a finished shard: ``finish(shard, arrays, source_sha256, starts_sha256)``."""


def build(spec: Spec, work: Work, companion: Tensor | None = None) -> ConstructedDataset:
    """Run ``work`` over ``spec``'s source, shard by shard; returns the dataset (loaded back from its folder when
    ``spec.out`` is set).

    ``companion`` (one source index per sample): the images of those samples stream beside each batch through a
    second loader with the same settings, as ``other``. With an ``out`` folder, the folder is checked (nothing
    written) and then held by this job for the whole build (``advfeat._lock``): a second writer stops at once with
    an error naming the holder.
    """
    n_shards = shard_count(spec.source.n, spec.shard_size)
    if spec.out is None:
        parts: dict[int, dict[str, np.ndarray]] = {}
        interrupted(f"{spec.desc}: interrupted; built in memory, nothing was kept (pass out=folder to keep finished "
                    "shards and resume)", _run_shards, spec, list(range(n_shards)), work,
                    lambda s, shard, _source, _starts: parts.__setitem__(s, shard), spec.progress, companion)
        order = sorted(parts)
        return ConstructedDataset([torch.from_numpy(parts[s]["images"]) for s in order],
                                  [parts[s]["labels"] for s in order],
                                  {f: [parts[s][f] for s in order] for f in spec.fields}, spec.config)
    root = spec.out
    rank, world = rank_world()
    manifest = spec.manifest()
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
        _same_source(spec.source, {s: r for s, r in records.items() if s % world == rank}, str(root), companion)
        todo = [s for s in range(n_shards) if s % world == rank and s not in records]
        interrupted(f"{spec.desc}: interrupted; the finished shards are kept in {root}: call again with the same "
                    f"settings and out={str(root)!r} to resume", _run_shards, spec, todo, work,
                    lambda s, shard, source, starts: write_shard(root, s, s * spec.shard_size, shard, source, starts),
                    spec.progress and rank == 0, companion)
        barrier()
    return ConstructedDataset.load(root)


def _run_shards(spec: Spec, todo: list[int], work: Work, finish: Finish, progress: bool,
                companion: Tensor | None) -> None:
    """Build the shards ``todo`` in order, batch by batch, handing each finished shard to ``finish``."""
    source, shard_size, device = spec.source, spec.shard_size, spec.device
    ranges = [(s * shard_size, min(source.n, (s + 1) * shard_size)) for s in todo]
    total = sum(stop - start for start, stop in ranges)
    written: list[int] = []
    with (closing(source.batches(ranges)) as batches,  # one loader for all: the caller's workers stay up
          closing(source.batches(ranges if companion is not None else [], companion)) as others,
          progress_bar(None, desc=spec.desc, enabled=progress, total=total, unit="img") as bar):
        for s, (start, stop) in zip(todo, ranges, strict=True):
            arrays: dict[str, list[np.ndarray]] = {}
            digest = hashlib.sha256()  # every source sample's bytes, as they stream: no extra pass
            starts = hashlib.sha256() if companion is not None else None  # and those of their companions
            for _ in range(start, stop, source.batch_size):
                idx, x, y = next(batches)
                source.hash(digest, x, y)
                # a dataset without .labels: checked as it streams, on the CPU copy
                kept = f"{len(written)} finished shards are kept" if written else "nothing was written"
                check_labels(y, spec.classes, f"loader's labels, samples {int(idx[0])}..{int(idx[-1])} ({kept}: fix "
                             "the labels and call again to resume)")
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # pinned by the loader
                other = None
                if starts is not None:
                    _, ox, oy = next(others)
                    source.hash(starts, ox, oy)
                    other = ox.to(device, x.dtype, non_blocking=True)
                images, labels, meta = work(idx, x, y, other)
                stored = images.detach().float().cpu()
                if not bool(torch.isfinite(stored).all()):  # nothing non-finite is ever written
                    raise FloatingPointError(
                        f"{spec.desc}: samples {int(idx[0])}..{int(idx[-1])} (shard {s}) came out non-finite (NaN or "
                        "inf): the model's output or gradient is not finite there; nothing of this shard was "
                        "written (finished shards are kept)")
                if spec.storage == "uint8":
                    stored = stored.mul(255).round_().clamp_(0, 255).to(torch.uint8)
                for k, v in {"images": stored, "labels": labels.detach().cpu().long(), **meta}.items():
                    arrays.setdefault(k, []).append(v.detach().cpu().numpy())
                bar.update(len(idx))
            finish(s, {k: np.concatenate(v) for k, v in arrays.items()}, digest.hexdigest(),
                   None if starts is None else starts.hexdigest())
            written.append(s)


def _same_source(source: Source, records: dict[int, dict[str, Any]], root: str,
                 companion: Tensor | None = None) -> None:
    """On resume: the samples of every finished shard, and the companion samples (start images) it was built from,
    must be those it recorded (re-read and hashed, no model runs); a record without a hash is taken as it is."""
    checked = [(s, r) for s, r in sorted(records.items()) if r.get("source_sha256") is not None]
    ranges = [(int(r["start"]), int(r["stop"])) for _, r in checked]
    with_starts = companion is not None and all(r.get("starts_sha256") is not None for _, r in checked)
    with (closing(source.batches(ranges)) as batches,  # one loader for every shard, as the build reads them
          closing(source.batches(ranges if with_starts else [], companion)) as others):
        for (s, record), (start, stop) in zip(checked, ranges, strict=True):
            digest, starts = hashlib.sha256(), hashlib.sha256()
            for _ in range(start, stop, source.batch_size):
                _, x, y = next(batches)
                Source.hash(digest, x, y)
                if with_starts:
                    Source.hash(starts, *next(others)[1:])
            if digest.hexdigest() != record["source_sha256"]:
                raise ValueError(f"out={root!r}: the source's samples {start}..{stop - 1} are not those shard "
                                 f"{s} was built from (the data changed since): resume with the original data, or "
                                 "use another out= to build from this data")
            if with_starts and starts.hexdigest() != record["starts_sha256"]:
                raise ValueError(f"out={root!r}: the start images of samples {start}..{stop - 1} (other images of "
                                 f"the source) are not those shard {s} was built from (the data changed since): "
                                 "resume with the original data, or use another out= to build from this data")
