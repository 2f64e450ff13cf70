"""Defects a hostile user found in the surfaces of version 0.2, one test each: the caller's loader read once per
epoch, a collate function or batch sampler that would silently change a construction, non-finite models stopped
by every attack, per-sample budgets through APGD-T, full disks named with the bytes needed, robustify's start
images covered by the resume check, and the command line's OpenMP waiting policy."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tqdm.auto
import tqdm.std
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset, default_collate

import advfeat as af
import advfeat.construct.shards
import advfeat.progress
from advfeat.construct.store import finished_shards

ROOT = Path(__file__).resolve().parents[1]


def _data(n: int = 64) -> TensorDataset:
    return af.data.planted(n, 16, seed=1).train


def _model() -> nn.Module:
    torch.manual_seed(0)
    return af.models.PlantedNet(hidden=16)


# -- 1. the caller's loader is read once per epoch, whichever progress bar is installed ---------------------------

class _CountingLoader(DataLoader):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.reads = 0

    def __iter__(self) -> Iterator[object]:
        self.reads += 1
        return super().__iter__()


@pytest.mark.parametrize("progress", [True, False])
def test_the_trainer_and_evaluate_read_a_shuffling_worker_loader_once_per_epoch(monkeypatch, progress):
    """tqdm.auto (used where ipywidgets is installed) calls iter() on what it is given: the trainer and evaluate
    must not hand it the caller's loader. The run's weights are the same with either bar."""
    weights = {}
    for name, bar in (("std", tqdm.std.tqdm), ("auto", tqdm.auto.tqdm)):
        monkeypatch.setattr(advfeat.progress, "tqdm", bar)
        loader = _CountingLoader(_data(), batch_size=16, shuffle=True, num_workers=2,
                                 generator=torch.Generator().manual_seed(0))
        model = _model()
        af.adversarial_train(model, loader, method="standard", epochs=3, lr=0.05, progress=progress)
        assert loader.reads == 3, name
        weights[name] = [p.detach().clone() for p in model.parameters()]
        loader.reads = 0
        af.evaluate(model, loader, {}, progress=progress)
        assert loader.reads == 1, name
    assert all(torch.equal(a, b) for a, b in zip(weights["std"], weights["auto"], strict=True))


# -- 2 and 3. a construction refuses a loader that would silently change what it builds ---------------------------

def test_a_collate_function_that_drops_samples_is_refused():
    loader = DataLoader(_data(40), batch_size=8, collate_fn=lambda b: default_collate(b[1:]))
    with pytest.raises(ValueError, match=r"collate_fn returned 1 samples for the 2 samples 0\.\.1"):
        af.nonrobustify(_model(), loader, eps=0.5, steps=2, progress=False)


@pytest.mark.parametrize("sampler", ["lists", "random", "subset"])
def test_a_batch_sampler_that_shuffles_or_subsets_is_refused(sampler):
    ds = _data(16)
    batches = {"lists": [[0, 1], [2, 3]], "random": BatchSampler(RandomSampler(ds), 4, False),
               "subset": BatchSampler(SequentialSampler(range(8)), 4, False)}[sampler]
    with pytest.raises(ValueError, match="batch_sampler"):
        af.nonrobustify(_model(), DataLoader(ds, batch_sampler=batches), eps=0.5, steps=2, progress=False)
    # the batch sampler a DataLoader makes itself from batch_size is the plain one, and is accepted
    ds_ok = af.nonrobustify(_model(), DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 4, False)),
                            eps=0.5, steps=2, progress=False)
    assert len(ds_ok) == 16


# -- 4 and 5. every attack stops a non-finite model; APGD-T takes a per-sample budget -----------------------------

class _NaN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1)) * float("nan")


@pytest.mark.parametrize("attack", [
    af.LinfPGD(0.1, steps=3), af.FGSM(0.1), af.APGD(0.1, steps=3), af.APGD(0.1, steps=3, loss=af.dlr,
                                                                            n_target_classes=3),
    af.L2PGD(0.5, steps=3), af.Restarts(af.LinfPGD(0.1, steps=2), 2), af.FAB(0.1, steps=3, n_target_classes=3),
    af.AutoAttack("linf", 0.1, steps=3, queries=5),
], ids=["linf", "fgsm", "apgd", "apgd-t", "l2", "restarts", "fab-t", "autoattack"])
def test_every_attack_stops_a_model_with_non_finite_logits(attack):
    x, y = _data(8).tensors()
    with pytest.raises(FloatingPointError, match="non-finite"):
        attack(_NaN(), x, y)


@pytest.mark.parametrize("batched", [False, True])
def test_apgd_t_takes_a_per_sample_budget_as_broken_samples_drop_out(batched):
    model = _model()
    af.adversarial_train(model, DataLoader(_data(2000), batch_size=64, shuffle=True), method="standard", epochs=3,
                         lr=0.1, progress=False)
    x, y = _data(64).tensors()
    right = af.guard.predict(model, x) == y
    x, y = x[right][:8], y[right][:8]
    assert len(y) == 8
    eps = torch.tensor([3.0] * 4 + [1e-3] * 4)  # the first four break at the first target, the rest never
    attack = af.APGD(eps, norm="l2", steps=5, loss=af.dlr, n_target_classes=3, batched=batched)
    x_adv = attack(model, x, y, generator=torch.Generator().manual_seed(0))
    assert ((x_adv - x).flatten(1).norm(dim=1) <= eps + 1e-5).all()
    assert (af.guard.predict(model, x_adv[:4]) != y[:4]).all()


# -- 6 and 7. a full disk: one line naming the folder and the bytes needed, nothing partial trusted ---------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (mounting needs root: skipped with the reason where it is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a small tmpfs is not allowed here ({done.stderr.decode().strip() or 'not root'}): "
                    "the full-disk tests need one")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_under_the_trainer_names_the_folder_and_the_bytes(small_disk):
    model = af.models.PlantedNet(hidden=256)  # a checkpoint of about 150 KB: more than the disk holds
    with pytest.raises(OSError, match=rf"no space left on the device of {small_disk}: .*needs about [\d,]+ bytes"):
        af.adversarial_train(model, DataLoader(_data(32), batch_size=16), method="standard", epochs=1,
                             checkpoint=small_disk / "run.pt", progress=False)
    assert [p.name for p in small_disk.iterdir()] == [".run.pt.lock"]  # the lock alone: nothing a resume reads


def test_a_full_disk_under_robustify_names_the_folder_and_the_bytes(small_disk):
    out = small_disk / "d_r"
    with pytest.raises(OSError, match=rf"no space left on the device of {out}: .*needs about [\d,]+ bytes"):
        af.robustify(_model(), _data(256), steps=2, out=out, shard_size=128, progress=False)
    assert finished_shards(out, verify=True) == {}  # no shard a resume would trust
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_under_replicate_exits_1_with_one_line(small_disk):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "advfeat", "replicate", "--out", str(small_disk / "run"),
                           "--no-progress"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("advfeat replicate: error: ")
    assert "no space left on the device of" in last and "bytes" in last
    assert "Traceback" not in done.stderr


# -- 8. robustify's resume checks the start images its finished shards were built from ----------------------------

def test_a_changed_start_image_of_a_finished_shard_is_refused_on_resume(tmp_path, monkeypatch):
    """robustify(init="other") starts sample i from another image of the source, often one of an unfinished shard:
    a resume must check those images too. The build is stopped after its first shard is written."""
    n, shard = 200, 50
    x, y = _data(n).tensors()
    out = tmp_path / "d_r"
    real = advfeat.construct.shards.write_shard

    def write_then_stop(*args: object, **kwargs: object) -> None:
        real(*args, **kwargs)  # type: ignore[arg-type]
        raise RuntimeError("stopped after the first shard")

    def build(images: torch.Tensor, folder: Path | None = out) -> af.ConstructedDataset:
        return af.robustify(_model(), TensorDataset(images, y), steps=2, out=folder, shard_size=shard,
                            progress=False)

    monkeypatch.setattr(advfeat.construct.shards, "write_shard", write_then_stop)
    with pytest.raises(RuntimeError, match="stopped after the first shard"):
        build(x)
    monkeypatch.setattr(advfeat.construct.shards, "write_shard", real)
    starts = np.load(out / finished_shards(out)[0]["files"]["start_index"]).tolist()
    sampled = set(torch.linspace(0, n - 1, 64).round().long().tolist())  # the data fingerprint's samples
    outside = next(i for i in starts if i >= shard and i not in sampled)  # in an unfinished shard, unsampled
    changed = x.clone()
    changed[outside, 0, 0, 0] = 1.0 - changed[outside, 0, 0, 0]
    with pytest.raises(ValueError, match="the start images of samples 0..49"):
        build(changed)
    assert torch.equal(build(x).tensors()[0], build(x, None).tensors()[0])  # the original data resumes bitwise


# -- 9. the command line runs with OpenMP's passive waiting unless the user chose ---------------------------------

@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_the_command_line_runs_with_passive_openmp_waiting_unless_told(given):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-m", "advfeat", "env"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert f"OMP_WAIT_POLICY={given or 'PASSIVE'}" in done.stdout


# -- also worth fixing: one line naming the argument ----------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: af.data.planted(-5), "n_train must be >= 1"),
    (lambda: af.data.planted(10, 10, seed=1.5), "seed must be an int"),
    (lambda: af.robustify(_model(), _data(8), seed=1.5, steps=1, progress=False), "seed must be an int"),
    (lambda: af.nonrobustify(_model(), _data(8), seed=2**70, steps=1, progress=False), r"seed must be in \[0"),
    (lambda: af.robustify(_model(), _data(8), steps=1, device="meta", progress=False), "'meta' holds no values"),
], ids=["planted-n", "planted-seed", "robustify-seed", "nonrobustify-seed", "meta-device"])
def test_bad_arguments_are_named(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


@pytest.mark.parametrize("flags, match", [
    (["--out", ""], "--out must name a folder"), (["--seed", str(2**70)], r"--seed must be in \[0"),
    (["--device", "meta"], "'meta' holds no values"),
], ids=["empty-out", "huge-seed", "meta"])
def test_bad_replicate_flags_exit_2_naming_the_flag(flags, match, capsys, tmp_path, monkeypatch):
    from advfeat.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["replicate", *flags])
    assert done.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []  # nothing written


# -- the "also worth fixing" list: raw errors and silent acceptance, each now one message naming the argument -------

from dataclasses import dataclass  # noqa: E402


@dataclass(frozen=True, eq=False)
class _Yields(af.TrainingMethod):
    """A user's method that says one optimiser step per batch and takes two."""

    how: str = "steps"

    def loss(self, model, x, y, ctx):
        logits = model(x)
        return nn.functional.cross_entropy(logits, y), logits

    def batch(self, model, x, y, ctx):
        yield self.loss(model, x, y, ctx)
        if self.how == "steps":  # says one step per batch, takes two
            yield self.loss(model, x, y, ctx)

    @property
    def steps_per_batch(self):
        return 1


@dataclass(frozen=True, eq=False)
class _NaNLogits(af.TrainingMethod):
    def loss(self, model, x, y, ctx):
        logits = model(x)
        return nn.functional.cross_entropy(logits, y), torch.full_like(logits, float("nan"))


@dataclass(frozen=True, eq=False)
class _ShapeShifter(af.TrainingMethod):
    def loss(self, model, x, y, ctx):
        logits = model(x)
        shown = logits if ctx.state.setdefault("calls", 0) == 0 else logits[:, :5]
        ctx.state["calls"] += 1
        return nn.functional.cross_entropy(logits, y), shown


def _train(method, data=None, **kw):
    loader = DataLoader(data if data is not None else _data(32), batch_size=8)
    return af.adversarial_train(_model(), loader, method=method, epochs=1, progress=False, **kw)


def _idx(path: Path, kind: int, array: np.ndarray) -> Path:
    """An IDX file of uint8 ``array`` (kind 8), as MNIST's."""
    path.write_bytes(bytes([0, 0, kind, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
                     + array.astype(np.uint8).tobytes())
    return path


def _mnist_with_label(root: Path, label: int) -> Path:
    root.mkdir()
    _idx(root / "train-images-idx3-ubyte", 8, np.zeros((2, 28, 28)))
    _idx(root / "train-labels-idx1-ubyte", 8, np.array([1, label]))
    return root


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))


@pytest.mark.parametrize("call, match", [
    (lambda: af.L2PGD(0.5, steps=2)(_model().eval(), torch.rand(2, 1, 16, 16).half(), torch.tensor([0, 1])),
     r"x has dtype torch.float16 but the model's parameters are torch.float32"),
    (lambda: af.evaluate(_model(), [(torch.rand(2, 1, 16, 16).bfloat16(), torch.tensor([0, 1]))], progress=False),
     r"loader, batch 0: x has dtype torch.bfloat16"),
    (lambda: af.L2PGD(0.5, steps=2)(_model().to("meta"), torch.rand(2, 1, 16, 16), torch.tensor([0, 1])),
     r"x is on cpu but the model's parameters are on meta"),
    (lambda: af.adversarial_train(_bn_model(), DataLoader(_data(9), batch_size=4), method="standard", epochs=1,
                                  progress=False),
     r"batch 3: a batch of one sample cannot train a model with BatchNorm"),
    (lambda: af.adversarial_train(_model(), [(torch.rand(0, 1, 16, 16), torch.zeros(0, dtype=torch.long))],
                                  method="standard", epochs=1, progress=False, schedule="constant"),
     r"batch 1: an empty batch \(0 samples\)"),
    (lambda: _train("standard", keys=("img", "lab")), r"keys=\('img', 'lab'\) names a mapping's keys"),
    (lambda: af.evaluate(_model(), [{"image": [[0.0]], "label": torch.tensor([0])}], progress=False),
     r"images are a Python list.*with_format\('torch'\)"),
    (lambda: _train(_Yields("steps")), r"_Yields.batch yielded more than its steps_per_batch = 1"),
    (lambda: _train(_ShapeShifter()), r"_ShapeShifter.batch yielded logits of shape \(8, 5\) at epoch 1, batch 2"),
    (lambda: _train(_NaNLogits()), r"non-finite training loss or logits at epoch 1, batch 1"),
    (lambda: af.data.ImageDataset(torch.full((2, 1, 4, 4), 7.0), torch.tensor([0, 1])),
     r"images must be pixels in \[0, 1\].*found values in \[7, 7\]"),
    (lambda: af.models.SmallResNet(width=-8), "width must be >= 1, got -8"),
    (lambda: af.models.PlantedNet(hidden=0), "hidden must be >= 1, got 0"),
], ids=["fp16-attack", "bf16-evaluate", "meta-model", "bn-batch-of-one", "empty-batch", "keys-on-tuples",
        "hf-list", "method-steps", "method-logits-shape", "method-nan-logits", "pixels-7", "width-8", "hidden-0"])
def test_more_bad_input_is_named(call, match):
    with pytest.raises((TypeError, ValueError, FloatingPointError), match=match):
        call()


def test_bad_files_are_named(tmp_path):
    """A damaged gzip, an MNIST label of 250, out= an existing file, a corrupt or FIFO settings.json."""
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ValueError, match=rf"{re.escape(str(gz))} is a damaged gzip file"):
        af.data.read_idx(gz)
    root = _mnist_with_label(tmp_path / "mnist", 250)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: labels must be class indices in \[0, 10\), "
                                         r"found \[1, 250\]"):
        af.data.mnist(root)
    file = tmp_path / "a-file"
    file.write_text("mine")
    with pytest.raises(ValueError, match="is an existing file, not a folder"):
        af.nonrobustify(_model(), _data(8), steps=1, out=file, progress=False)
    assert file.read_text() == "mine"
    from advfeat.replicate import replicate

    for name, make in (("corrupt", lambda f: f.write_text("{not json")), ("fifo", lambda f: os.mkfifo(f))):
        out = tmp_path / name
        out.mkdir()
        make(out / "settings.json")
        what = "is damaged" if name == "corrupt" else "is not a regular file"
        with pytest.raises(ValueError, match=rf"settings.json {what}"):
            replicate(out=out, progress=False, log=lambda line: None)


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_kept(tmp_path, capsys):
    class Stop(af.train.Callback):
        def on_batch(self, trainer, x, y):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match="before its first epoch finished: nothing was kept"):
        _train("standard", checkpoint=tmp_path / "ck.pt", callbacks=[Stop()])
    assert not (tmp_path / "ck.pt").exists()


def test_weights_are_never_cast_silently_nor_loaded_with_nan(tmp_path):
    from safetensors.torch import save_file

    state = af.models.PlantedNet().state_dict()
    for name, weights, match in (
        ("half", {k: v.half() for k, v in state.items()}, r"6 weights are of another dtype.*float16, the model's is "
                                                          r"float32"),
        ("int", {k: (v * 100).long() for k, v in state.items()}, r"int64, the model's is float32"),
        ("nan", {k: v.clone().fill_(float("nan")) for k, v in state.items()}, r"6 weights hold NaN or inf"),
    ):
        save_file(weights, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ValueError, match=match):
            af.models.load_safetensors(af.models.PlantedNet(), tmp_path / f"{name}.safetensors")
    net = af.models.CifarResNet((2, 2, 2, 2), bottleneck=False, width=8)
    torch.save({"model": {f"module.model.{k}": v.half() if v.is_floating_point() else v
                          for k, v in net.state_dict().items()}}, tmp_path / "half.pt")
    with pytest.raises(ValueError, match="another dtype than the model's"):
        af.models.from_robustness(tmp_path / "half.pt", arch="resnet18", width=8)


@pytest.mark.parametrize("images, labels, match", [
    (torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.int16), torch.arange(4), r"CIFAR_ims: expected uint8 pixels"),
    (torch.rand(4, 3, 8, 8, dtype=torch.complex64), torch.arange(4), r"CIFAR_ims: expected uint8 pixels"),
    (torch.rand(4, 3, 8, 8), torch.tensor([True, False, True, False]), r"CIFAR_lab: expected integer class labels"),
], ids=["int16-0-255", "complex", "bool-labels"])
def test_a_release_of_other_dtypes_is_refused(tmp_path, images, labels, match):
    torch.save([images], tmp_path / "CIFAR_ims")
    torch.save([labels], tmp_path / "CIFAR_lab")
    with pytest.raises(ValueError, match=match):
        af.data.from_release(tmp_path)


def test_an_object_array_in_a_shard_is_named_not_unpickled(tmp_path):
    out = tmp_path / "d"
    af.nonrobustify(_model(), _data(8), steps=1, out=out, progress=False)
    labels = next(out.glob("shard-*.labels.npy"))
    np.save(labels, np.array([{"x": 1}] * 8, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=rf"{re.escape(str(labels))}: not a plain numeric .npy array"):
        af.ConstructedDataset.load(out, verify=False)


def test_batched_restarts_hold_one_calls_starts_whatever_their_number(monkeypatch):
    """Restarts(batched=True, max_batch=...) bounds memory as its docs say: the starts of the 200 runs are drawn
    call by call, so no more than one call's starts are alive when the model runs (all 200 were before)."""
    import weakref

    alive: weakref.WeakSet = weakref.WeakSet()
    most, calls = [0], [0]
    init = af.L2Ball.init

    def counted(self, x, bounds, generator):
        start = init(self, x, bounds, generator)
        alive.add(start)
        return start

    class Watching(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _model()

        def forward(self, x):
            most[0], calls[0] = max(most[0], len(alive)), calls[0] + 1
            return self.inner(x)

    monkeypatch.setattr(af.L2Ball, "init", counted)
    x, y = torch.rand(16, 1, 16, 16), torch.randint(0, 10, (16,))
    af.Restarts(af.L2PGD(0.5, steps=2, random_start=True), 200, batched=True, max_batch=32)(Watching(), x, y)
    assert calls[0] > 0 and most[0] <= 2
