"""robustify / nonrobustify: the planted features, labels, the ball and the box, crash-resume, ranks, storage."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HANG_GUARD_S, reaped
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import advfeat as af

WORKER = Path(__file__).parent / "workers" / "construct_worker.py"


@pytest.fixture(scope="module")
def trained() -> tuple[af.data.Planted, nn.Module, nn.Module]:
    p = af.data.planted(4000, 500, seed=0)
    loader = DataLoader(p.train, batch_size=128, shuffle=True)
    torch.manual_seed(0)
    std = af.models.PlantedNet()
    af.adversarial_train(std, loader, method="standard", epochs=30, lr=0.1, progress=False)
    torch.manual_seed(0)
    rob = af.models.PlantedNet()
    af.adversarial_train(rob, loader, method="pgd", attack=af.L2PGD(0.5, steps=5), epochs=10, lr=0.1,
                         progress=False)
    return p, std, rob


def _accuracies(p: af.data.Planted, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    fa, fb = p.features(x)
    return float((fa.argmax(1) == y).double().mean()), float((fb.argmax(1) == y).double().mean())


def test_robustify_keeps_what_the_model_sees(trained):
    p, std, rob = trained
    src = Subset(p.train, range(600))
    y = p.train.labels[:600]
    d_r = af.robustify(rob, src, steps=100, progress=False)
    d_nr = af.robustify(std, src, steps=100, progress=False)
    assert torch.equal(d_r.labels, y) and torch.equal(d_nr.labels, y)
    xr, _ = d_r.tensors()
    xn, _ = d_nr.tensors()
    assert xr.min() >= 0 and xr.max() <= 1 and xn.min() >= 0 and xn.max() <= 1
    r_robust, r_nonrobust = _accuracies(p, xr, y)
    n_robust, n_nonrobust = _accuracies(p, xn, y)
    # measured: D_R robust 81% / non-robust 61%; D_NR robust 15% / non-robust 79% (start images: ~10% each)
    assert r_robust > 0.7 and n_robust < 0.4, (r_robust, n_robust)
    assert n_nonrobust > 0.65 and r_nonrobust < n_nonrobust - 0.1, (r_nonrobust, n_nonrobust)
    # converged: the robust model's representation is matched closely
    assert float(d_r.meta["rel_distance"].median()) < 0.1
    starts = d_r.meta["start_index"]
    assert (starts != torch.arange(600)).all() and starts.min() >= 0 and starts.max() < 600


@pytest.mark.parametrize("mode", ["det", "rand"])
def test_nonrobustify_moves_the_nonrobust_feature_to_the_target(trained, mode):
    p, std, _ = trained
    src = Subset(p.train, range(600))
    x, y = p.train.tensors()
    x, y = x[:600], y[:600]
    d = af.nonrobustify(std, src, mode=mode, eps=0.5, step_size=0.1, steps=50, progress=False)
    xa, t = d.tensors()
    if mode == "det":
        assert torch.equal(t, (y + 1) % 10)
    else:
        assert (t != y).all() and len(set(((t - y) % 10).tolist())) == 9
    assert torch.equal(d.meta["original_label"], y)
    norms = (xa - x).flatten(1).norm(dim=1)
    assert (norms <= 0.5 + 1e-4).all() and xa.min() >= 0 and xa.max() <= 1
    assert torch.allclose(norms, d.meta["perturbation_norm"], atol=1e-5)
    fa, fb = p.features(xa)
    reached = d.meta["target_reached"]
    # measured: 80% of targets reached; the non-robust feature says t for ~100%, the robust one still says y
    assert reached.double().mean() > 0.6
    assert (fb.argmax(1) == t).double().mean() > 0.9
    assert (fa.argmax(1) == y).double().mean() > 0.7


def test_randomness_depends_only_on_seed_and_index():
    data = af.data.planted(50, 8, seed=2).train
    torch.manual_seed(0)
    model = af.models.PlantedNet(hidden=16)
    a = af.nonrobustify(model, data, mode="rand", steps=2, batch_size=7, shard_size=11, progress=False, seed=5)
    b = af.nonrobustify(model, DataLoader(data, batch_size=50), mode="rand", steps=2, shard_size=100,
                        progress=False, seed=5)
    assert torch.equal(a.labels, b.labels)
    r1 = af.robustify(model, data, steps=1, batch_size=3, shard_size=7, progress=False, seed=5)
    r2 = af.robustify(model, data, steps=1, batch_size=16, progress=False, seed=5)
    assert torch.equal(r1.meta["start_index"], r2.meta["start_index"])
    assert not torch.equal(r1.meta["start_index"],
                           af.robustify(model, data, steps=1, progress=False, seed=6).meta["start_index"])
    n1 = af.robustify(model, data, init="noise", steps=1, batch_size=3, progress=False)
    n2 = af.robustify(model, data, init="noise", steps=1, batch_size=50, progress=False)
    assert torch.allclose(n1.tensors()[0], n2.tensors()[0], atol=1e-6)
    assert (n1.meta["start_index"] == -1).all()


class _Decoded(torch.utils.data.Dataset):
    """Dict samples, as a decoding dataset gives them; ``fail_at`` raises there when a worker reads it (a crash
    placed by index; the fingerprint's reads in the main process pass)."""

    def __init__(self, data: TensorDataset, fail_at: int | None = None) -> None:
        self.data, self.fail_at = data, fail_at

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, object]:
        if i == self.fail_at and torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(f"cannot decode sample {i}")
        x, y = self.data[i]
        return {"pixels": x.numpy(), "label": int(y)}


def _collate(items: list[dict[str, object]]) -> dict[str, torch.Tensor]:
    return {"pixels": torch.from_numpy(np.stack([it["pixels"] for it in items])),
            "label": torch.tensor([it["label"] for it in items])}


def _mark_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    assert info is not None
    Path(info.dataset.marks, f"worker{worker_id}").touch()  # type: ignore[attr-defined]


@pytest.mark.filterwarnings("ignore::advfeat.construct.LowTargetsWarning")  # 2 steps: the reading is tested
def test_the_callers_loader_feeds_the_build_with_its_workers_collate_and_pinning(tmp_path):
    """A DataLoader's workers, collate function and worker_init_fn read the source; the set is bitwise the one
    built from the dataset in this process, and so is a build that crashed in a worker and was resumed."""
    data = af.data.planted(90, 8, seed=3).train
    torch.manual_seed(0)
    model = af.models.PlantedNet(hidden=16)
    keys = ("pixels", "label")

    def loader(ds: _Decoded, workers: int) -> DataLoader:
        ds.marks = str(tmp_path)  # type: ignore[attr-defined]
        return DataLoader(ds, batch_size=8, collate_fn=_collate, num_workers=workers, pin_memory=False,
                          worker_init_fn=_mark_worker if workers else None)

    for build in (af.nonrobustify, af.robustify):
        ref = build(model, loader(_Decoded(data), 0), steps=2, shard_size=20, keys=keys, progress=False, seed=1)
        fed = build(model, loader(_Decoded(data), 2), steps=2, shard_size=20, keys=keys, progress=False, seed=1)
        _same(ref, fed)
    assert sorted(p.name for p in tmp_path.glob("worker*")) == ["worker0", "worker1"]
    out = tmp_path / "set"
    with pytest.raises(RuntimeError, match="cannot decode sample 47"):
        af.nonrobustify(model, loader(_Decoded(data, fail_at=47), 2), steps=2, shard_size=20, keys=keys,
                        progress=False, seed=1, out=out)
    assert len(list(out.glob("shard-*.json"))) == 2  # samples 0..39 were finished and kept
    resumed = af.nonrobustify(model, loader(_Decoded(data), 2), steps=2, shard_size=20, keys=keys, progress=False,
                              seed=1, out=out)
    _same(af.nonrobustify(model, data, steps=2, shard_size=20, progress=False, seed=1, batch_size=8), resumed)


def _worker(out: Path, kind: str, *extra: str, stdin: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(WORKER), str(out), kind, *extra], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=HANG_GUARD_S)
    return p.returncode, out, err


def _same(a: af.ConstructedDataset, b: af.ConstructedDataset) -> None:
    xa, ya = a.tensors()
    xb, yb = b.tensors()
    assert torch.equal(xa, xb) and torch.equal(ya, yb)  # bitwise
    assert a.meta.keys() == b.meta.keys() and all(torch.equal(a.meta[k], b.meta[k]) for k in a.meta)


SHARDS, BATCHES_PER_SHARD = 10, 2  # the worker's defaults: 160 samples, shards of 16, batches of 8
# Where each attempt dies, counted from its own start: in a shard's second batch; half-way through writing
# a shard's 4th file (its arrays partly written, no record, a partial temporary file left); after a shard's
# last batch, before its write; in a shard's first batch. Then a run that finishes.
KILLS = [("--kill-after-batches", "3"), ("--kill-in-write", "4"), ("--kill-after-batches", "4"),
         ("--kill-after-batches", "5")]


@pytest.mark.parametrize("kind", ["robustify", "rand"])
def test_resume_after_sigkills_at_chosen_moments_is_bitwise_identical(tmp_path, kind):
    """Crashes placed by the work's progress (never by a clock): every attempt dies where it was told to,
    the next resumes without redoing finished shards, and the result is bitwise the uninterrupted build."""
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    code, _, err = _finish(_worker(ref, kind))
    assert code == 0, err
    kills = 0
    first_record: tuple[int, int] | None = None
    for flag, n in KILLS:
        code, _, err = _finish(_worker(crashed, kind, flag, n))
        assert code == -signal.SIGKILL, (flag, n, code, err)
        kills += 1
        if flag == "--kill-in-write":
            assert list(crashed.glob(".*.tmp")), "a kill inside a write leaves a partial temporary file"
        if first_record is None:
            rec = (crashed / "shard-00000.json").stat()
            first_record = (rec.st_ino, rec.st_mtime_ns)
    assert kills >= 2
    records = len(list(crashed.glob("shard-*.json")))
    assert 0 < records < SHARDS
    code, out, err = _finish(_worker(crashed, kind))
    assert code == 0, err
    # resumed, not redone: the last run built only the missing shards, and the first shard's record is the
    # one written before the second crash
    assert json.loads(out.strip().splitlines()[-1])["batches"] == (SHARDS - records) * BATCHES_PER_SHARD
    rec = (crashed / "shard-00000.json").stat()
    assert (rec.st_ino, rec.st_mtime_ns) == first_record
    assert not list(crashed.glob(".*.tmp"))  # the partial file was cleaned up
    _same(af.ConstructedDataset.load(ref), af.ConstructedDataset.load(crashed))


def test_one_writer_per_folder_and_a_killed_writer_blocks_nothing(tmp_path):
    out = tmp_path / "d"
    holder = _worker(out, "det", "--pause-after-batches", "1", stdin=subprocess.PIPE)
    with reaped(holder):
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "paused"  # it holds the folder now
        code, _, err = _finish(_worker(out, "det"))
        assert code == 1
        assert "InUseError" in err and f"out={str(out)!r} is in use by another process (pid {holder.pid} " in err
    # reaped: SIGKILLed while holding the lock
    code, _, err = _finish(_worker(out, "det"))  # nothing stale blocks the next writer; it resumes
    assert code == 0, err
    assert len(af.ConstructedDataset.load(out)) == 160


def test_a_second_writer_in_the_same_process_is_refused(tmp_path):
    from advfeat._lock import exclusive, folder_lock

    data = af.data.planted(20, 8, seed=2).train
    model = af.models.PlantedNet(hidden=8)
    with exclusive(folder_lock(tmp_path / "d"), "test"):
        with pytest.raises(af.InUseError, match=r"in use by this process already"):
            af.nonrobustify(model, data, steps=1, out=tmp_path / "d", progress=False)
    af.nonrobustify(model, data, steps=1, out=tmp_path / "d", progress=False)  # released: fine now


def test_two_ranks_build_the_same_dataset_as_one(tmp_path, rendezvous):
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = _finish(_worker(one, "det"))
    assert code == 0, err
    procs = [_worker(two, "det", "--ddp", str(r), "2", str(rendezvous)) for r in range(2)]
    with reaped(*procs):
        for q in procs:
            code, _, err = _finish(q)
            assert code == 0, err
    _same(af.ConstructedDataset.load(one), af.ConstructedDataset.load(two))


def test_store_round_trip_and_refusals(tmp_path):
    data = af.data.planted(40, 8, seed=2).train
    torch.manual_seed(0)
    model = af.models.PlantedNet(hidden=16)
    out = tmp_path / "d"
    made = af.nonrobustify(model, data, steps=3, shard_size=16, out=out, progress=False)
    mem = af.nonrobustify(model, data, steps=3, shard_size=16, progress=False)
    _same(made, mem)
    assert made.tensors()[0].dtype == torch.float32 and made.config["mode"] == "det"
    assert sorted(q.name for q in out.glob("*.json")) == ["manifest.json", "shard-00000.json",
                                                          "shard-00001.json", "shard-00002.json"]
    again = af.nonrobustify(model, data, steps=3, shard_size=16, out=out, progress=False)  # all done: no work
    _same(made, again)
    with pytest.raises(ValueError, match="other settings.*steps"):
        af.nonrobustify(model, data, steps=4, shard_size=16, out=out, progress=False)
    # tampered
    f = out / "shard-00001.images.npy"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 1
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        af.ConstructedDataset.load(out)
    # partial
    (out / "shard-00001.json").unlink()
    with pytest.raises(ValueError, match="partial: 2 of 3 shards"):
        af.ConstructedDataset.load(out)
    # resuming rebuilds the missing shard, identical to before
    _same(af.nonrobustify(model, data, steps=3, shard_size=16, out=out, progress=False), mem)
    # uint8 storage: explicit and quantised to 1/255
    q = af.nonrobustify(model, data, steps=3, storage="uint8", progress=False)
    assert (q.tensors()[0] - mem.tensors()[0]).abs().max() <= 0.5 / 255 + 1e-6


def test_a_pickle_in_a_shard_is_never_loaded(tmp_path):
    data = af.data.planted(20, 8, seed=2).train
    model = af.models.PlantedNet(hidden=8)
    out = tmp_path / "d"
    af.nonrobustify(model, data, steps=1, out=out, progress=False)
    np.save(out / "shard-00000.labels.npy", np.array([object()] * 20, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        af.ConstructedDataset.load(out, verify=False)  # even without the checksum: allow_pickle=False


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    data = af.data.planted(20, 8, seed=2).train
    model = af.models.PlantedNet(hidden=8)
    out = tmp_path / "never"
    no_linear = nn.Sequential(nn.Flatten(), nn.Conv1d(1, 1, 1))
    cases = [
        (lambda: af.robustify(no_linear, data, out=out), ValueError, "no nn.Linear.*representation"),
        (lambda: af.nonrobustify(model, data, mode="fancy", out=out), ValueError, "mode must be"),
        (lambda: af.nonrobustify(model, data, eps=0.0, out=out), ValueError, "eps must be"),
        (lambda: af.robustify(model, data, steps=0, out=out), ValueError, "steps must be >= 1"),
        (lambda: af.robustify(model, data, init="zeros", out=out), ValueError, "init must be"),
        (lambda: af.nonrobustify(model, DataLoader(data, shuffle=True), out=out), ValueError, "must not shuffle"),
        (lambda: af.nonrobustify(model, TensorDataset(torch.rand(4, 1, 16, 16), torch.full((4,), 12)), out=out),
         ValueError, r"labels in \[0, C\) = \[0, 10\)"),
        (lambda: af.nonrobustify(nn.Sequential(nn.Flatten(), nn.Linear(256, 1)),
                                 TensorDataset(torch.rand(4, 1, 16, 16), torch.zeros(4, dtype=torch.long)), out=out),
         ValueError, "at least 2 classes"),
        (lambda: af.nonrobustify(model, TensorDataset(torch.rand(4, 1, 16, 16)), out=out), TypeError,
         r"must yield \(x, y, \.\.\.\) tuples"),
        (lambda: af.nonrobustify(model, data, storage="float16", out=out), ValueError, "storage must be"),
    ]
    for call, kind, match in cases:
        with pytest.raises(kind, match=match):
            call()
        assert not out.exists(), match
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        af.nonrobustify(model, data, steps=1, out=other, progress=False)
    assert sorted(q.name for q in other.iterdir()) == ["notes.txt"]


def test_progress_is_reported(capsys):
    data = af.data.planted(20, 8, seed=2).train
    af.nonrobustify(af.models.PlantedNet(hidden=8), data, steps=1)
    assert "img" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["robustify", "det"])
def test_the_model_state_is_untouched(kind):
    from conftest import make_model, same_state, snapshot

    model = make_model((3, 6, 6), classes=4)  # BatchNorm, dropout, a frozen layer, existing .grad, train mode
    before = snapshot(model)
    data = TensorDataset(torch.rand(10, 3, 6, 6), torch.randint(0, 4, (10,)))
    if kind == "robustify":
        af.robustify(model, data, steps=3, progress=False)
    else:
        af.nonrobustify(model, data, steps=3, progress=False)
    assert same_state(before, snapshot(model))


def test_a_custom_representation_and_float64_inputs():
    data = TensorDataset(torch.rand(6, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()
    d = af.robustify(model, data, representation=lambda x: model(x).softmax(1), steps=5, progress=False)
    assert d.config["representation"] == "test_a_custom_representation_and_float64_inputs.<locals>.<lambda>"
    x, _ = d.tensors()
    assert x.shape == (6, 1, 4, 4) and x.min() >= 0 and x.max() <= 1


def test_keep_correct_makes_bugs_that_keep_the_other_models_right(trained):
    """Nakkiran's bugs: the perturbation fools the source towards t while the kept models keep the true label."""
    p, std, rob = trained
    src = Subset(p.train, range(300))
    y = p.train.labels[:300]
    torch.manual_seed(5)
    other = af.models.PlantedNet()
    af.adversarial_train(other, DataLoader(p.train, batch_size=128, shuffle=True), method="standard", epochs=30,
                         lr=0.1, progress=False)
    plain = af.nonrobustify(std, src, mode="det", eps=1.0, progress=False)
    # the bugs' rule (replicate's controls_steps): the default's constant eps/4 steps reach fewer of these targets
    bugs = af.nonrobustify(std, src, mode="det", eps=1.0, keep_correct=[other], progress=False,
                           rule=af.steps.Cosine(), step_size=1.0, steps=25)
    assert bugs.config["keep_correct"] and "keep_correct" not in plain.config  # recorded, only when given
    with torch.no_grad():
        kept = (other(bugs.tensors()[0]).argmax(1) == y).double().mean()
        fooled_plain = (other(plain.tensors()[0]).argmax(1) == plain.labels).double().mean()
    assert bugs.meta["target_reached"].double().mean() > 0.9
    assert kept > 0.9 and fooled_plain > 0.5  # the plain examples transfer to it, the bugs do not
    with pytest.raises(TypeError, match="keep_correct must be a sequence of nn.Modules"):
        af.nonrobustify(std, src, keep_correct=["model"], progress=False)  # type: ignore[list-item]


def test_shortcut_relabels_like_nonrobustify_with_class_keyed_patterns(trained, tmp_path):
    p, std, _ = trained
    src = Subset(p.train, range(200))
    x, y = p.train.tensors()
    for mode in ("det", "rand"):
        d = af.nonrobustify(std, src, mode=mode, steps=2, progress=False, seed=3)
        s = af.controls.shortcut(std, src, mode=mode, eps=0.5, seed=3, progress=False, out=tmp_path / mode)
        assert torch.equal(s.labels, d.labels)  # the same targets for the same mode and seed
        delta = s.tensors()[0] - x[:200]
        moved = delta.flatten(1).norm(dim=1) > 0
        with torch.no_grad():
            already = std(x[:200]).argmax(1) == s.labels
        assert torch.equal(moved, ~already)  # added only where the model does not already predict the target
        # one pattern per target class: the same direction for every sample of a class (up to the box clamp)
        t0 = s.labels[moved][0]
        same = moved & (s.labels == t0)
        cos = torch.nn.functional.cosine_similarity(delta[same].flatten(1), delta[same][0].flatten()[None])
        assert (cos > 0.9).all() and (s.meta["perturbation_norm"][moved] <= 0.5 + 1e-5).all()


def test_the_leakage_probe_finds_what_is_there_and_only_that():
    """A probe on features that carry the label learns it; on D_det-like labels (y + 1) it learns y + 1."""
    torch.manual_seed(0)
    data = af.data.planted(2000, 500, seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))
    with torch.no_grad():  # logits = the robust feature coefficients: a "robust model"
        model[1].weight.copy_(data.robust_directions)
        model[1].bias.copy_(-0.5 * data.robust_directions.sum(1))
    assert af.controls.leakage_probe(model, data.train, data.test, epochs=20) > 0.7
    x, y = data.train.tensors()
    shifted = TensorDataset(x, (y + 1) % 10)
    assert af.controls.leakage_probe(model, shifted, data.test, epochs=20) < 0.05
