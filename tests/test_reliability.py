"""The reliability defects a hostile tester found: nothing written through a planted symbolic link,
hand-edited manifests and linked shard files refused, a full disk named, clear errors instead of raw tracebacks."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import advfeat as af
from advfeat._io import LinkRefused, append_text, atomic_write
from advfeat._lock import file_lock, folder_lock


def _data(n: int = 12) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, 16, 16, generator=g), torch.arange(n) % 10)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return af.models.PlantedNet()


def _victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim.txt"
    v.write_text("precious\n")
    return v


# -- symbolic links ---------------------------------------------------------------------------------------------

def test_a_constructor_does_not_write_its_lock_through_a_planted_link(tmp_path):
    victim, out = _victim(tmp_path), tmp_path / "out"
    out.mkdir()
    folder_lock(out).symlink_to(victim)
    with pytest.raises(LinkRefused, match="symbolic link"):
        af.robustify(_model(), _data(), steps=1, out=out, progress=False)
    assert victim.read_text() == "precious\n"


def test_the_trainer_does_not_write_its_lock_or_history_through_links(tmp_path):
    victim = _victim(tmp_path)
    loader = [(torch.rand(4, 1, 16, 16), torch.arange(4))]
    ck = tmp_path / "ck.pt"
    file_lock(ck).symlink_to(victim)
    with pytest.raises(LinkRefused):
        af.adversarial_train(_model(), loader, method="standard", epochs=1, checkpoint=ck, progress=False)
    file_lock(ck).unlink()
    history = tmp_path / "history.jsonl"
    history.symlink_to(victim)
    with pytest.raises(LinkRefused, match="history.jsonl is a symbolic link"):
        af.adversarial_train(_model(), loader, method="standard", epochs=1, history_file=history, progress=False)
    assert victim.read_text() == "precious\n"


def test_appends_and_atomic_writes_never_follow_a_link(tmp_path):
    victim = _victim(tmp_path)
    link = tmp_path / "log.jsonl"
    link.symlink_to(victim)
    with pytest.raises(LinkRefused):
        append_text(link, "x\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(LinkRefused, match="not a regular file"):
        append_text(fifo, "x\n")
    # atomic_write replaces the link itself (rename over it): the file it pointed to is untouched
    atomic_write(link, lambda f: f.write(b"new"))
    assert not link.is_symlink() and link.read_bytes() == b"new" and victim.read_text() == "precious\n"


def test_a_linked_shard_file_is_refused_on_load(tmp_path):
    out = tmp_path / "d"
    af.nonrobustify(_model(), _data(), mode="det", eps=0.5, steps=1, shard_size=4, out=out, progress=False)
    target = out / "shard-00001.labels.npy"
    outside = tmp_path / "outside.npy"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(ValueError, match="shard-00001.labels.npy is a symbolic link"):
        af.ConstructedDataset.load(out)


# -- manifests ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, match", [({"shards": 2}, "does not match its checksum"),
                                         ({"fields": []}, "does not match its checksum")])
def test_a_hand_edited_manifest_is_refused(tmp_path, edit, match):
    out = tmp_path / "d"
    kw = dict(mode="det", eps=0.5, steps=1, shard_size=4, out=out, progress=False)
    af.nonrobustify(_model(), _data(), **kw)
    m = out / "manifest.json"
    manifest = json.loads(m.read_text())
    m.write_text(json.dumps({**manifest, **edit}))
    with pytest.raises(ValueError, match=match):
        af.ConstructedDataset.load(out)
    with pytest.raises(ValueError, match=match):  # and a resume does not use it either
        af.nonrobustify(_model(), _data(), **kw)
    # without the checksum (a manifest of advfeat 0.1) the cross-checks still catch both edits
    unsigned = {k: v for k, v in {**manifest, **edit}.items() if k != "sha256"}
    m.write_text(json.dumps(unsigned))
    with pytest.raises(ValueError, match="changed by hand"):
        af.ConstructedDataset.load(out)


# -- full disks ---------------------------------------------------------------------------------------------------

def test_a_full_disk_names_the_folder(tmp_path):
    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=rf"no space left on the device of {tmp_path}.*free some space"):
        atomic_write(tmp_path / "shard.npy", full)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left


# -- model outputs ---------------------------------------------------------------------------------------------

class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)), x


class _Nan(nn.Module):  # NaN from the representation on: logits, loss and gradient
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(256, 10)

    def forward(self, x):
        return self.fc(x.flatten(1) * float("nan"))


def test_an_attack_names_the_accepted_output_forms():
    with pytest.raises(TypeError, match=r"mapping with 'logits'.*\.logits tensor.*got tuple of 2"):
        af.L2PGD(0.5, steps=1)(_Pair(), torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("method", ["standard", "pgd", "trades", "mart", "fgsm-rs", "free"])
def test_every_method_names_a_tuple_output(method):
    Pair = _Pair
    with pytest.raises(TypeError, match=r"must return logits of shape \(N, C\).*got tuple of 2"):
        af.adversarial_train(Pair(), [(torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))], method=method,
                             attack=None if method == "standard" else af.L2PGD(0.5, steps=1), epochs=1,
                             progress=False)


# -- trainer checkpoints and loaders -----------------------------------------------------------------------------

def _train(tmp_path: Path, epochs: int = 2, **kw):
    data = _data(32)
    loader = DataLoader(data, batch_size=8)
    return af.adversarial_train(_model(), loader, method="standard", epochs=epochs, lr=0.05, progress=False,
                                checkpoint=tmp_path / "ck.pt", resume=True, **kw)


@pytest.mark.parametrize("damage", ["truncate", "empty", "random", "flip"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    _train(tmp_path)
    ck = tmp_path / "ck.pt"
    data = ck.read_bytes()
    if damage == "truncate":
        ck.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        ck.write_bytes(b"")
    elif damage == "random":
        ck.write_bytes(os.urandom(4096))
    else:  # one bit of a weight's bytes, deep inside the file
        state = torch.load(ck, weights_only=True)
        w = state["state"]["model"]["net.1.weight"] if "net.1.weight" in state["state"]["model"] else \
            next(v for v in state["state"]["model"].values() if v.is_floating_point())
        w.view(torch.int32).view(-1)[3] ^= 1 << 30
        torch.save(state, ck)
    with pytest.raises(ValueError, match=rf"checkpoint {ck} is damaged.*delete it.*ck\.pt\.prev") as e:
        _train(tmp_path, epochs=3)
    assert "weights_only" not in str(e.value)
    assert (tmp_path / "ck.pt.prev").is_file()  # the previous epoch's checkpoint, kept


def test_a_loader_that_changes_its_length_is_refused(tmp_path):
    class Growing:
        def __init__(self):
            self.epoch = 0

        def __len__(self):
            return 2

        def __iter__(self):
            self.epoch += 1
            for _ in range(2 if self.epoch == 1 else 3 if self.epoch == 2 else 1):
                yield torch.rand(4, 1, 16, 16), torch.arange(4)

    with pytest.raises(ValueError, match=r"more batches in epoch 2 than its len\(\) = 2"):
        af.adversarial_train(_model(), Growing(), method="standard", epochs=3, progress=False)
    g = Growing()
    g.epoch = 2  # its first epoch here yields 1 batch
    with pytest.raises(ValueError, match=r"yielded 1 batches in epoch 1, 1 fewer than its len\(\) = 2"):
        af.adversarial_train(_model(), g, method="standard", epochs=3, progress=False)


def test_a_non_finite_loss_stops_training_without_a_per_step_sync(tmp_path):
    Nan = _Nan
    loader = [(torch.rand(4, 1, 16, 16), torch.arange(4))] * 3
    with pytest.raises(FloatingPointError, match="non-finite training loss or logits at epoch 1, batch 1"):
        af.adversarial_train(Nan(), loader, method="standard", epochs=1, progress=False,
                             checkpoint=tmp_path / "ck.pt")
    assert not (tmp_path / "ck.pt").exists()  # nothing non-finite is saved


def test_non_finite_models_are_refused_by_attacks_evaluate_and_constructors(tmp_path):
    Nan = _Nan
    x, y = torch.rand(4, 1, 16, 16), torch.zeros(4, dtype=torch.long)
    with pytest.raises(FloatingPointError, match="non-finite logits .* batch 0"):
        af.evaluate(Nan(), [(x, y)], progress=False)
    with pytest.raises(FloatingPointError, match="L2PGD on _Nan: .*non-finite"):
        af.L2PGD(0.5, steps=2)(Nan(), x, y)
    with pytest.raises(FloatingPointError, match="samples 0..3 .*non-finite"):
        af.robustify(Nan(), TensorDataset(x, y), steps=2, out=tmp_path / "r", progress=False)
    assert not list((tmp_path / "r").glob("shard-*"))  # nothing non-finite is written
    with pytest.raises(FloatingPointError, match="non-finite"):
        af.nonrobustify(Nan(), TensorDataset(x, y), steps=2, progress=False)
    with pytest.raises(ValueError, match="eps must be finite.*af.PGD\\(af.Box\\(\\)"):
        af.L2PGD(eps=float("inf"))


def test_a_bad_label_found_while_streaming_names_the_samples_and_what_was_kept(tmp_path):
    class NoLabels(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return torch.full((1, 16, 16), 0.5), torch.tensor(12 if i == 11 else i % 10)

    with pytest.raises(ValueError, match=r"samples 8..11 \(2 finished shards are kept: fix the labels"):
        af.robustify(_model(), NoLabels(), steps=1, shard_size=4, out=tmp_path / "d", progress=False)
    assert len(list((tmp_path / "d").glob("shard-*.json"))) == 2


# -- the CLI and small inputs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, says", [
    (["--out", "FILE"], "--out .* is a file, not a folder"),
    (["--device", "foo"], "--device must be a device such as 'cpu'"),
    (["--root", "NOWHERE"], "--root .* is not a readable folder"),
    (["--checkpoint-width", "-5"], "--checkpoint-width must be a positive number"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], r"--device='cuda': no such CUDA device here")]))
def test_bad_cli_flags_get_one_line_and_status_2(tmp_path, capsys, flags, says):
    from advfeat.cli import main

    (tmp_path / "FILE").write_text("x")
    flags = [str(tmp_path / f) if f in ("FILE", "NOWHERE") else f for f in flags]
    args = ["replicate", *flags] + ([] if "--out" in flags else ["--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()[-1]) > 0
    import re
    assert re.search(says, err), err


def test_a_run_that_fails_on_its_data_leaves_no_settings(tmp_path):
    from advfeat.replicate import replicate

    with pytest.raises(ValueError, match="--root is required for mnist"):
        replicate("mnist", out=tmp_path / "out", progress=False, log=lambda s: None)
    assert not (tmp_path / "out" / "settings.json").exists()


def test_small_bad_inputs_are_named():
    model = _model()
    with pytest.raises(ValueError, match="loader yielded no samples"):
        af.evaluate(model, [], progress=False)
    with pytest.raises(TypeError, match="attacks must be an advfeat Attack, a list of them or a dict"):
        af.evaluate(model, [], "l2", progress=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        af.evaluate(model, [(torch.rand(2, 1, 16, 16), [0, 1])], progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        af.robustify(model, _data(), batch_size=0, progress=False)
    with pytest.raises(ValueError, match=r"box \[lower, upper\] = \[0, 1\]"):
        af.adversarial_train(model, [(torch.rand(4, 1, 16, 16) * 255, torch.arange(4))], method="standard",
                             epochs=1, progress=False)
    if not torch.cuda.is_available():
        for call in (lambda: af.robustify(model, _data(), device="cuda", progress=False),
                     lambda: af.evaluate(model, [], device="cuda", progress=False),
                     lambda: af.adversarial_train(model, [], method="standard", device="cuda", epochs=1,
                                                  progress=False)):
            with pytest.raises(ValueError, match=r"device='cuda': no such CUDA device here \(devices: cpu\)"):
                call()


def test_a_release_with_nan_images_or_bad_labels_is_refused(tmp_path):
    for name, images, labels, says in [("nan", torch.full((2, 3, 4, 4), float("nan")), torch.tensor([0, 1]), "NaN"),
                                       ("big", torch.rand(2, 3, 4, 4), torch.tensor([0, 99]), r"\[0, 99\]"),
                                       ("neg", torch.rand(2, 3, 4, 4), torch.tensor([-3, 1]), r"\[-3, 1\]")]:
        folder = tmp_path / name
        folder.mkdir()
        torch.save([images], folder / "CIFAR_ims")
        torch.save([labels], folder / "CIFAR_lab")
        with pytest.raises(ValueError, match=says):
            af.data.from_release(folder)


class _Interrupting(torch.utils.data.Dataset):
    def __init__(self, at: int) -> None:
        self.at, self.read = at, 0

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i):
        self.read += 1
        if self.read == self.at:
            raise KeyboardInterrupt
        return torch.full((1, 16, 16), 0.5), torch.tensor(i % 10)


def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path, capsys):
    probe = _Interrupting(10**9)
    af.robustify(_model(), probe, steps=1, shard_size=4, progress=False)
    before_work = probe.read - 12
    with pytest.raises(KeyboardInterrupt, match="finished shards are kept in"):
        af.robustify(_model(), _Interrupting(before_work + 8 + 1), steps=1, shard_size=4, out=tmp_path / "d",
                     progress=False)
    assert "call again with the same settings" in capsys.readouterr().err
    assert len(list((tmp_path / "d").glob("shard-*.json"))) == 2

    def interrupting(after: int):
        for _ in range(after):
            yield torch.rand(4, 1, 16, 16), torch.arange(4)
        raise KeyboardInterrupt

    class Loader:
        """Two batches an epoch; Ctrl-C after ``stop`` batches in all."""

        def __init__(self, stop: int) -> None:
            self.left = stop

        def __len__(self):
            return 2

        def __iter__(self):
            now, self.left = min(self.left, 2), self.left - 2
            return interrupting(now) if now < 2 else iter([(torch.rand(4, 1, 16, 16), torch.arange(4))] * 2)

    with pytest.raises(KeyboardInterrupt, match="before its first epoch finished: nothing was kept"):
        af.adversarial_train(_model(), Loader(1), method="standard", epochs=2, progress=False,
                             checkpoint=tmp_path / "ck.pt")
    with pytest.raises(KeyboardInterrupt, match="holds every finished epoch: call again with resume=True"):
        af.adversarial_train(_model(), Loader(3), method="standard", epochs=2, progress=False,
                             checkpoint=tmp_path / "ck2.pt")


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path):
    out = tmp_path / "d"
    kw = dict(mode="det", eps=0.5, steps=1, shard_size=4, out=out, progress=False)
    af.nonrobustify(_model(), _data(), **kw)
    stale = [out / ".manifest.json.1a2b3c4d.tmp", out / ".shard-00001.json.deadbeef.tmp"]
    for f in stale:
        f.write_bytes(b"half")
    (out / "shard-00002.json").unlink()
    af.nonrobustify(_model(), _data(), **kw)
    assert not any(f.exists() for f in stale)
    _train(tmp_path)
    ck_tmp = tmp_path / ".ck.pt.0badf00d.tmp"
    ck_tmp.write_bytes(b"half")
    _train(tmp_path)
    assert not ck_tmp.exists()


def test_nonrobustify_warns_when_it_reaches_few_targets():
    says = r"reached only \d+\.\d% of its targets .*eps=0.001.*raise eps"
    with pytest.warns(af.construct.LowTargetsWarning, match=says):
        d = af.nonrobustify(_model(), _data(), mode="det", eps=0.001, steps=1, progress=False)
    assert d.config["targets_reached"] < 0.5


@pytest.mark.parametrize("damage", [b"", b"\x00" * 10, os.urandom(2048)], ids=["empty", "zeros", "random"])
def test_damaged_release_files_name_the_file_and_never_advise_unsafe_loading(tmp_path, damage):
    ck = tmp_path / "cifar_l2_0_5.pt"
    ck.write_bytes(damage)
    with pytest.raises(ValueError, match=rf"path: {ck} is not a robustness-library checkpoint") as e:
        af.models.from_robustness(ck)
    folder = tmp_path / "d_robust_CIFAR"
    folder.mkdir()
    (folder / "CIFAR_ims").write_bytes(damage)
    (folder / "CIFAR_lab").write_bytes(damage)
    with pytest.raises(ValueError, match=r"folder: .*CIFAR_ims is not a list of tensors") as f:
        af.data.from_release(folder)
    assert "weights_only=False" not in str(e.value) + str(f.value)


def test_a_sample_changed_between_a_crash_and_a_resume_is_found(tmp_path):
    """The 64 fingerprinted samples miss most of a large source: every shard's record also holds the sha256 of
    all its source samples, streamed as they were read; a resume re-reads the finished shards and compares."""
    x, y = torch.rand(200, 1, 16, 16), torch.arange(200) % 10
    kw = dict(mode="det", eps=0.5, steps=1, shard_size=50, out=tmp_path / "d", progress=False)
    af.nonrobustify(_model(), TensorDataset(x, y), **kw)
    (tmp_path / "d" / "shard-00003.json").unlink()  # as if killed in the last shard
    changed = x.clone()
    changed[7, 0, 3, 3] = 1 - changed[7, 0, 3, 3]  # one pixel of a sample no fingerprint looks at
    picks = torch.linspace(0, 199, 64).round().long().tolist()
    assert 7 not in picks
    with pytest.raises(ValueError, match=r"samples 0..49 are not those shard 0 was built from"):
        af.nonrobustify(_model(), TensorDataset(changed, y), **kw)
    assert len(af.nonrobustify(_model(), TensorDataset(x, y), **kw)) == 200  # the original data resumes
