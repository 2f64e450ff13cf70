"""ConstructedDataset: images, labels, per-sample metadata and the construction config; safe on disk.

On disk a constructed dataset is a directory:

    manifest.json                 config, library version, model and data fingerprints, shard count
    shard-00000.json              one per finished shard: its sample range and the sha256 of each file
    shard-00000.images.npy        float32 (default) or uint8 images of the shard
    shard-00000.labels.npy        int64 labels
    shard-00000.<field>.npy       per-sample metadata (e.g. rel_distance, target_reached)

Only ``.npy`` files loaded with ``allow_pickle=False`` and JSON: loading never runs code from the files.
A shard's ``.json`` is written last, atomically, after its arrays: a shard without one does not exist, so a
crash at any moment leaves only finished shards. ``ConstructedDataset.load`` checks every checksum and
refuses a partial or tampered directory; large image shards are memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .._checks import describe_differences
from .._digest import sha256_file
from .._io import atomic_write

__all__ = ["ConstructedDataset", "FORMAT"]

FORMAT = "advfeat.constructed/1"
_MMAP_BYTES = 64 << 20


class ConstructedDataset(Dataset[tuple[Tensor, Tensor]]):
    """A dataset built by ``advfeat.robustify`` or ``advfeat.nonrobustify``.

    ``ds[i]`` is ``(image, label)`` with the image as float32 in [0, 1] (also when stored as uint8).
    ``ds.meta`` maps each per-sample field name to a tensor of length ``len(ds)``; ``ds.config`` holds the
    construction settings. ``ConstructedDataset.load(path)`` reads a directory written by a constructor.

    Examples:
        >>> import torch
        >>> ds = ConstructedDataset([torch.rand(4, 1, 2, 2)], [torch.tensor([0, 1, 0, 1])], config={"kind": "demo"})
        >>> len(ds), ds[1][1].item(), ds.config["kind"]
        (4, 1, 'demo')
    """

    def __init__(
        self,
        images: Sequence[Tensor | np.ndarray],
        labels: Sequence[Tensor | np.ndarray],
        meta: Mapping[str, Sequence[Tensor | np.ndarray]] | None = None,
        config: Mapping[str, Any] | None = None,
        path: Path | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"images and labels must have one part per shard each, got {len(images)} and "
                             f"{len(labels)}")
        self._images = list(images)
        self._labels = torch.cat([torch.as_tensor(np.asarray(y)) for y in labels]) if labels else \
            torch.zeros(0, dtype=torch.int64)
        self._starts = np.cumsum([0] + [len(p) for p in self._images])
        self.meta: dict[str, Tensor] = {
            k: torch.cat([torch.as_tensor(np.asarray(v)) for v in parts]) for k, parts in (meta or {}).items()}
        self.config: dict[str, Any] = dict(config or {})
        self.path = path
        if int(self._starts[-1]) != len(self._labels):
            raise ValueError(f"{int(self._starts[-1])} images but {len(self._labels)} labels")

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> Tensor:
        return self._labels

    def _image(self, part: Tensor | np.ndarray, j: int) -> Tensor:
        x = torch.as_tensor(np.array(part[j])) if isinstance(part, np.ndarray) else part[j]
        return x.float().div_(255) if x.dtype == torch.uint8 else x.float()

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} samples")
        i %= n
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._image(self._images[s], i - int(self._starts[s])), self._labels[i]

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All images (float32, in memory) and labels."""
        parts = [torch.as_tensor(np.asarray(p)) if isinstance(p, np.ndarray) else p for p in self._images]
        x = torch.cat(parts) if parts else torch.zeros(0)
        return (x.float().div_(255) if x.dtype == torch.uint8 else x.float()), self._labels

    def __repr__(self) -> str:
        kind = self.config.get("kind", "?")
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"ConstructedDataset({kind}, {len(self)} samples, meta={sorted(self.meta)}{where})"

    # -- disk ---------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> ConstructedDataset:
        """Read a directory written by a constructor: no unpickling; checksums verified (``verify``).

        Raises ValueError naming what is wrong for a partial, tampered or foreign directory.
        """
        root = Path(path)
        manifest = read_manifest(root)
        n_shards = int(manifest["shards"])
        done = finished_shards(root, verify=verify)
        missing = [i for i in range(n_shards) if i not in done]
        if missing:
            raise ValueError(f"{root} is partial: {n_shards - len(missing)} of {n_shards} shards are finished "
                             f"(first missing: {missing[0]}); call the constructor again with out={str(root)!r} "
                             "and the same settings to finish it")
        images: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        meta: dict[str, list[np.ndarray]] = {}
        fields = manifest.get("fields", [])
        for i in range(n_shards):
            info = done[i]
            if set(info["files"]) != {"images", "labels", *fields}:
                raise ValueError(f"{root / 'manifest.json'} was changed by hand: its fields {fields} do not match "
                                 f"shard {i}'s files {sorted(info['files'])}")
            img = root / info["files"]["images"]
            images.append(_npy(img, mmap=img.stat().st_size > _MMAP_BYTES))
            labels.append(_npy(root / info["files"]["labels"]))
            for f in fields:
                meta.setdefault(f, []).append(_npy(root / info["files"][f]))
        ds = cls(images, labels, meta, manifest["config"], path=root)
        if "target_reached" in ds.meta:  # a relabelling: the share of targets reached, as its constructor says
            ds.config["targets_reached"] = float(ds.meta["target_reached"].double().mean())
        return ds


def _npy(path: Path, mmap: bool = False) -> np.ndarray:
    """A shard's ``.npy`` array, never unpickled; an object array or a damaged file is refused naming the file."""
    try:
        arr: np.ndarray = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as e:
        raise ValueError(f"{path}: not a plain numeric .npy array ({e}); advfeat never unpickles: delete the folder "
                         "and build it again") from None
    return arr


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def _manifest_sum(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest, checked: its checksum (written since advfeat 0.2), and its shard count against its config's
    ``n`` and ``shard_size``. A hand-edited manifest is refused, naming what is wrong."""
    m = root / "manifest.json"
    if m.is_symlink():
        raise ValueError(f"{m} is a symbolic link: a constructed dataset's files are its own; refusing to read it")
    if not m.exists():
        raise ValueError(f"{root} is not a constructed dataset: no manifest.json")
    try:
        manifest: dict[str, Any] = json.loads(m.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{m} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{m}: format {got!r}, expected {FORMAT!r}")
    changed = f"{m} was changed by hand"
    if "sha256" in manifest and manifest["sha256"] != _manifest_sum(manifest):
        raise ValueError(f"{changed}: it does not match its checksum; restore it, or delete the folder to rebuild")
    config = manifest.get("config", {})
    try:
        expected = shard_count(int(config["n"]), int(config["shard_size"]))
        shards = int(manifest["shards"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{changed}: it lacks the shard count or the config's n and shard_size") from None
    if shards != expected:
        raise ValueError(f"{changed}: {shards} shards, but its config ({config['n']} samples in shards of "
                         f"{config['shard_size']}) makes {expected}")
    if not isinstance(manifest.get("fields", []), list):
        raise ValueError(f"{changed}: fields must be a list")
    return manifest


def finished_shards(root: Path, *, verify: bool = True) -> dict[int, dict[str, Any]]:
    """The shards whose ``.json`` exists (and, with ``verify``, whose files match their checksums)."""
    out: dict[int, dict[str, Any]] = {}
    for j in sorted(root.glob("shard-*.json")):
        if j.is_symlink():
            raise ValueError(f"{j} is a symbolic link: a constructed dataset's files are its own; delete it and call "
                             "the constructor again to rebuild that shard")
        try:
            info = json.loads(j.read_text())
            i = int(info["index"])
            files: dict[str, str] = info["files"]
            sums: dict[str, str] = info["sha256"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{j} is not a shard record; the directory was changed by hand") from None
        for key, name in files.items():
            if not _own_file(name, i, key):
                raise ValueError(f"{j} names {name!r} for {key!r}, which is not this shard's own file in {root} "
                                 f"(expected {shard_name(i)}.{key}.npy); the record was changed by hand: delete "
                                 f"{j.name} and call the constructor again to rebuild that shard")
        if verify:
            for key, name in files.items():
                f = root / name
                if f.is_symlink():
                    raise ValueError(f"{root}: {name} is a symbolic link, not a file the constructor wrote; delete "
                                     f"{j.name} and call the constructor again to rebuild that shard")
                if not f.exists():
                    raise ValueError(f"{root}: shard {i} lists {name}, which is missing")
                if sha256_file(f) != sums[key]:
                    raise ValueError(f"{root}: {name} does not match its checksum (tampered or damaged); "
                                     f"delete {j.name} and call the constructor again to rebuild that shard")
        out[i] = info
    return out


def _own_file(name: object, i: int, key: object) -> bool:
    """A shard record may name only its own files, by plain name inside the dataset's folder: never a path
    (``../x.npy``, ``/etc/x``, ``sub/x``), so that a hand-edited record cannot make ``load`` read elsewhere."""
    return isinstance(name, str) and isinstance(key, str) and name == f"{shard_name(i)}.{key}.npy" \
        and Path(name).name == name


def write_shard(root: Path, i: int, start: int, arrays: Mapping[str, np.ndarray], source: str | None = None,
                starts: str | None = None) -> None:
    """Write a shard's arrays, then its record (the commit point), each atomically. ``source``: the sha256 of the
    source samples the shard was built from; ``starts``: that of the other source samples its samples started from
    (robustify's start images); both checked when a build resumes."""
    files, sums = {}, {}
    for key, arr in arrays.items():
        name = f"{shard_name(i)}.{key}.npy"
        _save_npy(root / name, arr)
        files[key], sums[key] = name, sha256_file(root / name)
    n = len(arrays["labels"])
    record: dict[str, Any] = {"index": i, "start": start, "stop": start + n, "files": files, "sha256": sums}
    if source is not None:
        record["source_sha256"] = source
    if starts is not None:
        record["starts_sha256"] = starts
    atomic_write(root / f"{shard_name(i)}.json", lambda f: f.write(json.dumps(record, indent=1).encode()))


def _save_npy(path: Path, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False), size=arr.nbytes + 128)  # + the .npy header


def check_directory(root: Path, manifest: dict[str, Any]) -> bool:
    """Whether ``root`` already holds this construction (True) or nothing yet (False); writes nothing.

    Refuses (ValueError) a directory holding something else or built with another configuration.
    """
    if root.exists() and not root.is_dir():
        raise ValueError(f"out={str(root)!r} is an existing file, not a folder: a constructed dataset is a folder of "
                         "shards; choose a new or empty folder")
    m = root / "manifest.json"
    if m.exists():
        old = read_manifest(root)
        shown = describe_differences(old.get("config", {}), manifest["config"], "there", "now")
        if shown:
            raise ValueError(f"out={str(root)!r} holds a construction with other settings ({shown}); "
                             "choose another directory or the original settings")
        return True
    if root.exists() and any(p for p in root.iterdir() if not p.name.startswith(".")):
        raise ValueError(f"out={str(root)!r} exists and holds other files (no manifest.json): refusing to write "
                         "into it; choose an empty or new directory")
    return False


def prepare_directory(root: Path, manifest: dict[str, Any]) -> None:
    """Create ``root`` with ``manifest``, or check that it already holds the same construction."""
    if not check_directory(root, manifest):
        signed = {**manifest, "sha256": _manifest_sum(manifest)}
        atomic_write(root / "manifest.json", lambda f: f.write(json.dumps(signed, indent=1, sort_keys=True).encode()))


def shard_count(n: int, shard_size: int) -> int:
    return max(1, math.ceil(n / shard_size))
