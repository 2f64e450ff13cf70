"""Files the library writes: the mode a plain open(path, "w") gives under the umask; shard records that name
only their own files."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

import advfeat as af
from advfeat._io import atomic_write


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_write_gives_what_open_gives(tmp_path, mask):
    with umask(mask):
        atomic_write(tmp_path / "a.txt", lambda f: f.write(b"new"))
        with open(tmp_path / "b.txt", "w") as f:
            f.write("plain")
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "b.txt") == 0o666 & ~mask
    assert (tmp_path / "a.txt").read_bytes() == b"new"


def test_an_existing_file_keeps_its_mode(tmp_path):
    f = tmp_path / "report.md"
    f.write_text("old")
    f.chmod(0o640)
    with umask(0o022):
        atomic_write(f, lambda h: h.write(b"new"))
    assert mode(f) == 0o640 and f.read_text() == "new"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    f = tmp_path / "x.json"
    f.write_text("old")

    def boom(h: object) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(f, boom)
    assert f.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_datasets_checkpoints_and_histories_get_the_umasks_mode(tmp_path, mask):
    data = af.data.planted(40, 8, seed=2)
    model = af.models.PlantedNet(hidden=8)
    with umask(mask):
        af.nonrobustify(model, data.train, steps=1, shard_size=16, out=tmp_path / "d", progress=False)
        af.adversarial_train(model, DataLoader(data.train, batch_size=20), method="standard", epochs=1,
                             checkpoint=tmp_path / "ck" / "m.pt", history_file=tmp_path / "ck" / "h.jsonl",
                             progress=False)
    files = [*(tmp_path / "d").iterdir(), *(tmp_path / "ck").iterdir()]
    assert {p.name for p in files} >= {"manifest.json", "shard-00002.images.npy", "shard-00002.json", "m.pt",
                                       "h.jsonl", ".advfeat.lock", ".m.pt.lock"}
    assert {p.name: oct(mode(p)) for p in files} == {p.name: oct(0o666 & ~mask) for p in files}


@pytest.mark.parametrize("bad", ["../shard-00000.labels.npy", "/tmp/shard-00000.labels.npy",
                                 "sub/shard-00000.labels.npy", "shard-00001.labels.npy"])
@pytest.mark.parametrize("verify", [True, False])
def test_a_record_naming_a_file_outside_its_shard_is_refused(tmp_path, bad, verify):
    data = af.data.planted(20, 8, seed=2).train
    out = tmp_path / "d"
    model = af.models.PlantedNet(hidden=8)
    af.nonrobustify(model, data, steps=1, out=out, progress=False)
    record = out / "shard-00000.json"
    info = json.loads(record.read_text())
    info["files"]["labels"] = bad
    record.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"shard-00000.json names .* not this shard's own file"):
        af.ConstructedDataset.load(out, verify=verify)
    with pytest.raises(ValueError, match="not this shard's own file"):  # resuming refuses it too
        af.nonrobustify(model, data, steps=1, out=out, progress=False)
