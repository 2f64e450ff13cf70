"""The trainer: the science on planted data, every method, crash-resume, DDP, AMP and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD_S, reaped
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import advfeat as af
from advfeat.train import read_checkpoint

WORKER = Path(__file__).parent / "workers" / "train_worker.py"


@pytest.fixture(scope="module")
def planted() -> af.data.Planted:
    return af.data.planted(4000, 1000, seed=0)


def _robust(model: nn.Module, data: af.data.Planted) -> tuple[float, float]:
    r = af.evaluate(model, DataLoader(data.test, batch_size=500), {"l2": af.L2PGD(0.5, steps=20)}, progress=False)
    return r.clean_accuracy, r.robust_accuracy("l2")


def test_pgd_training_is_robust_where_standard_training_is_not(planted):
    loader = DataLoader(planted.train, batch_size=128, shuffle=True)
    torch.manual_seed(0)
    std = af.models.PlantedNet()
    af.adversarial_train(std, loader, method="standard", epochs=30, lr=0.1, progress=False)
    torch.manual_seed(0)
    rob = af.models.PlantedNet()
    hist = af.adversarial_train(rob, loader, method="pgd", attack=af.L2PGD(0.5, steps=5), epochs=10, lr=0.1,
                                progress=False, eval_loader=DataLoader(planted.test, batch_size=500),
                                eval_attack=af.L2PGD(0.5, steps=10))
    std_clean, std_rob = _robust(std, planted)
    rob_clean, rob_rob = _robust(rob, planted)
    # measured: standard 99.1% clean / 0.4% robust; PGD 82.6% / 62.3%
    assert std_clean > 0.95 and std_rob < 0.1, (std_clean, std_rob)
    assert rob_clean > 0.7 and rob_rob > 0.5, (rob_clean, rob_rob)
    assert rob_rob > std_rob + 0.4
    assert len(hist) == 10 and hist[-1]["robust_accuracy"] > 0.5


def test_mart_is_at_least_as_robust_as_pgd_training_at_the_same_budget(planted):
    loader = DataLoader(planted.train, batch_size=128, shuffle=True)
    results = {}
    for name, method in (("pgd", af.PGDTraining(af.L2PGD(0.5, steps=5))), ("mart", af.MART(af.L2PGD(0.5, steps=5)))):
        torch.manual_seed(0)
        m = af.models.PlantedNet()
        af.adversarial_train(m, loader, method=method, epochs=10, lr=0.1, progress=False)
        results[name] = _robust(m, planted)
    # measured (seeds 0 / 1): PGD 82.1 / 62.4 and 82.5 / 61.4; MART 81.7 / 63.2 and 82.2 / 63.0 (clean / L2 0.5, %)
    assert results["mart"][1] >= results["pgd"][1] - 0.02, results
    assert results["mart"][0] > 0.75, results


def test_a_name_is_its_methods_defaults():
    data = af.data.planted(128, 8, seed=3).train
    attack = af.L2PGD(0.5, steps=2)
    weights = []
    for method in ("trades", af.TRADES(attack, beta=6.0)):
        torch.manual_seed(0)
        m = af.models.PlantedNet(hidden=16)
        torch.manual_seed(1)
        af.adversarial_train(m, DataLoader(data, batch_size=32, shuffle=True), method=method,
                             attack=attack if isinstance(method, str) else None, epochs=1, progress=False)
        weights.append(m.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert af.methods.from_name("free", attack, replays=3) == af.FreeTraining(attack, replays=3)
    assert repr(af.methods.from_name("mart", attack)) == "MART(attack=L2PGD(eps=0.5, steps=2), beta=6.0)"


def test_the_trainer_names_no_method():
    """The trainer's code (its loop, epoch and callbacks) has no branch on a method: every method's code lives in
    its own class."""
    import ast
    import inspect

    import advfeat.train.callbacks
    import advfeat.train.epoch
    import advfeat.train.trainer

    tree = ast.parse("\n".join(inspect.getsource(m) for m in (advfeat.train.trainer, advfeat.train.epoch,
                                                                advfeat.train.callbacks)))
    words: set[str] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value,
                                                                                              ast.Constant):
            body[0].value.value = ""  # drop docstrings: they document the shorthands
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            words.add(node.value.lower())
        elif isinstance(node, (ast.Name, ast.Attribute)):
            words.add((node.id if isinstance(node, ast.Name) else node.attr).lower())
    named = {w for w in words for m in ("pgd", "fgsm", "free", "trades", "mart", "replays", "beta") if m in w}
    assert not named, named


def test_method_options_belong_to_the_method_object():
    model, loader = _tiny()
    attack = af.L2PGD(0.1)
    with pytest.raises(ValueError, match=r"beta: set it on the method object \(TRADES"):
        af.adversarial_train(model, loader, method=af.TRADES(attack), beta=3.0, epochs=1)
    with pytest.raises(ValueError, match="attack, replays: set these on the method object"):
        af.adversarial_train(model, loader, method=af.FreeTraining(attack), attack=attack, replays=2, epochs=1)
    with pytest.raises(TypeError, match="attack must be an advfeat Attack for MART"):
        af.MART("pgd")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="FGSMRS takes its ball"):
        af.FGSMRS(af.WorstOf(attack))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="FreeTraining needs a ball"):
        af.FreeTraining(af.PGD(af.Box(), step_size=0.1))
    with pytest.raises(TypeError, match="method must be a TrainingMethod or one of"):
        af.adversarial_train(model, loader, method=3, epochs=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"beta: not an option of method='pgd' \(its options: none\)"):
        af.adversarial_train(model, loader, method="pgd", attack=attack, beta=3.0, epochs=1)


@pytest.mark.parametrize("method", ["fgsm-rs", "free", "trades"])
def test_fast_methods_are_robust_too(planted, method):
    loader = DataLoader(planted.train, batch_size=128, shuffle=True)
    torch.manual_seed(0)
    m = af.models.PlantedNet()
    hist = af.adversarial_train(m, loader, method=method, attack=af.L2PGD(0.5, steps=5),
                                epochs=2 if method == "free" else 8, lr=0.1, progress=False)
    clean, rob = _robust(m, planted)
    assert rob > 0.45 and clean > 0.7, (method, clean, rob)
    if method == "fgsm-rs":
        assert all("guard_accuracy" in h for h in hist)


def test_bn_stays_in_eval_mode_during_the_attack_by_default():
    seen: list[bool] = []

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled() or x.requires_grad:
                seen.append(self.training)
            return self.fc(self.bn(x))

    data = TensorDataset(torch.rand(16, 4), torch.randint(0, 2, (16,)))
    for mode in (True, False):
        seen.clear()
        af.adversarial_train(Spy(), DataLoader(data, batch_size=8), attack=af.L2PGD(0.1, steps=2), epochs=1,
                             progress=False, attack_eval_mode=mode)
        assert seen and all(s is (not mode) for s in seen)


def _run(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(WORKER), str(out), *args], capture_output=True, text=True,
                          timeout=HANG_GUARD_S)


@pytest.mark.parametrize("method", ["standard", "pgd", "fgsm-rs", "free", "trades", "mart", "custom"])
def test_resume_after_sigkill_gives_the_same_weights(tmp_path, method):
    """Every built-in method and a user's (tests/workers/train_worker.py: Smoothed) resume bitwise; FGSM-RS with
    its guard's held batch, best accuracy and best weights in the checkpoint (before 0.2 it restored another
    "best epoch" after a resume)."""
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    full.mkdir()
    crashed.mkdir()
    assert _run(full, "--method", method).returncode == 0
    # 256 images / 32 = 8 batches per epoch: die in the middle of epoch 2, then in the middle of epoch 3
    r = _run(crashed, "--kill-after", "11", "--method", method)
    assert r.returncode == -9, r.stderr
    assert read_checkpoint(crashed / "ckpt.pt")["epoch"] == 1
    r = _run(crashed, "--kill-after", "12", "--method", method)
    assert r.returncode == -9, r.stderr
    assert read_checkpoint(crashed / "ckpt.pt")["epoch"] == 2
    r = _run(crashed, "--method", method)
    assert r.returncode == 0, r.stderr
    a, b = torch.load(full / "final.pt"), torch.load(crashed / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(s) for s in (crashed / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in lines] == [1, 2, 3]


def test_ddp_matches_one_process_on_the_same_global_batches(tmp_path, rendezvous):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    r = _run(one, "--ddp", "0", "1", str(tmp_path / "rendezvous-one"), "--batch", "32")
    assert r.returncode == 0, r.stderr
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(two), "--ddp", str(rank), "2", str(rendezvous),
                               "--batch", "16"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    with reaped(*procs):
        for p in procs:
            _, err = p.communicate(timeout=HANG_GUARD_S)
            assert p.returncode == 0, err
    a, b = torch.load(one / "final.pt"), torch.load(two / "final.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_one_trainer_per_checkpoint_and_a_killed_trainer_blocks_nothing(tmp_path):
    holder = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), "--pause-after", "3"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with reaped(holder):
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "paused"  # it holds the checkpoint now
        r = _run(tmp_path)
        assert r.returncode == 1
        ck = str(tmp_path / "ckpt.pt")
        assert f"InUseError: checkpoint={ck!r} is in use by another process (pid {holder.pid} " in r.stderr
    # reaped: SIGKILLed while holding the checkpoint
    assert _run(tmp_path).returncode == 0  # the SIGKILLed holder left nothing that blocks


def test_amp_bf16_path_runs():
    data = af.data.planted(256, 64, seed=2)
    m = af.models.PlantedNet(hidden=32)
    hist = af.adversarial_train(m, DataLoader(data.train, batch_size=64), method="pgd", amp="bf16",
                                attack=af.L2PGD(0.5, steps=2), epochs=1, progress=False)
    assert torch.isfinite(torch.tensor(hist[0]["train_loss"]))
    assert all(p.dtype == torch.float32 for p in m.parameters())


def _tiny() -> tuple[nn.Module, DataLoader]:
    data = TensorDataset(torch.rand(24, 1, 4, 4), torch.randint(0, 3, (24,)))
    return af.models.PlantedNet((1, 4, 4), num_classes=3, hidden=8), DataLoader(data, batch_size=8)


def test_checkpoint_of_another_config_or_model_is_refused(tmp_path):
    model, loader = _tiny()
    ck = tmp_path / "ck.pt"
    af.adversarial_train(model, loader, method="standard", epochs=1, checkpoint=ck, progress=False)
    with pytest.raises(FileExistsError, match="resume=True"):
        af.adversarial_train(model, loader, method="standard", epochs=1, checkpoint=ck, progress=False)
    with pytest.raises(ValueError, match="another model or configuration.*method"):
        af.adversarial_train(model, loader, method="pgd", attack=af.L2PGD(0.1), epochs=1, checkpoint=ck,
                             resume=True, progress=False)
    other = af.models.PlantedNet((1, 4, 4), num_classes=3, hidden=9)
    with pytest.raises(ValueError, match="parameters"):
        af.adversarial_train(other, loader, method="standard", epochs=1, checkpoint=ck, resume=True,
                             progress=False)
    # a finished run resumes to a no-op with the same history
    hist = af.adversarial_train(model, loader, method="standard", epochs=1, checkpoint=ck, resume=True,
                                progress=False)
    assert len(hist) == 1


def test_bad_input_names_the_problem(tmp_path):
    model, loader = _tiny()
    with pytest.raises(ValueError, match="method must be one of"):
        af.adversarial_train(model, loader, method="fast", epochs=1)
    with pytest.raises(TypeError, match="attack must be an advfeat Attack"):
        af.adversarial_train(model, loader, method="pgd", epochs=1)
    with pytest.raises(TypeError, match=r"epoch 1, batch 1: the loader must yield \(x, y, \.\.\.\)"):
        af.adversarial_train(model, [torch.rand(8, 1, 4, 4)], method="standard", epochs=1, schedule="constant",
                             progress=False)
    with pytest.raises(ValueError, match="epoch 1, batch 1.*y must have shape"):
        af.adversarial_train(model, [(torch.rand(8, 1, 4, 4), torch.zeros(7, dtype=torch.long))],
                             method="standard", epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"labels in \[0, C\) = \[0, 3\)"):
        af.adversarial_train(model, [(torch.rand(8, 1, 4, 4), torch.full((8,), 5))], method="standard",
                             epochs=1, progress=False)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        af.adversarial_train(model, loader, method="standard", epochs=0)


def test_non_finite_loss_stops_with_epoch_and_batch_and_keeps_the_checkpoint(tmp_path):
    class Breaks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 3)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            out = self.fc(x.flatten(1))
            return out * float("nan") if self.calls == 5 else out

    _, loader = _tiny()  # 3 batches per epoch: the 5th forward is epoch 2, batch 2
    ck = tmp_path / "ck.pt"
    with pytest.raises(FloatingPointError, match="epoch 2, batch 2.*last good checkpoint"):
        af.adversarial_train(Breaks(), loader, method="standard", epochs=3, checkpoint=ck, progress=False)
    assert read_checkpoint(ck)["epoch"] == 1


@pytest.mark.parametrize("method", ["trades", "mart"])
def test_methods_that_attack_after_a_clean_forward_train_a_batchnorm_model(method):
    """The attack's model guard used to write every buffer back, bumping the version of BatchNorm's running
    statistics that autograd holds for the clean forward's backward: TRADES failed on any BatchNorm model."""
    data = TensorDataset(torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,)))
    torch.manual_seed(0)
    model = af.models.SmallResNet()
    history = af.adversarial_train(model, DataLoader(data, batch_size=16), method=method,
                                   attack=af.L2PGD(0.5, steps=2), epochs=1, progress=False)
    assert len(history) == 1 and history[0]["train_loss"] == history[0]["train_loss"]


class _Counting(af.train.Callback):
    """A user's callback with memory to resume: counts batches, adds the count to every epoch's record."""

    state_key = "counting"

    def __init__(self) -> None:
        self.batches, self.calls = 0, []

    def on_fit_start(self, trainer):
        self.calls.append("fit_start")

    def on_batch(self, trainer, x, y):
        self.batches += 1

    def on_epoch_end(self, trainer, record):
        self.calls.append("epoch_end")
        record["batches_so_far"] = self.batches

    def on_epoch_saved(self, trainer, record):
        self.calls.append("saved")
        assert trainer.history[-1] is record

    def on_fit_end(self, trainer):
        self.calls.append("fit_end")

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state):
        self.batches = state["batches"]


def test_a_users_callback_gets_every_hook_in_order_and_its_state_survives_a_resume(tmp_path):
    data = af.data.planted(96, 32, seed=0)
    loader = DataLoader(data.train, batch_size=32)
    ck = tmp_path / "ck.pt"
    first = _Counting()
    torch.manual_seed(0)
    hist = af.adversarial_train(af.models.PlantedNet(hidden=8), loader, method="standard", epochs=2, progress=False,
                                callbacks=[first], checkpoint=ck, history_file=tmp_path / "h.jsonl")
    assert first.calls == ["fit_start", "epoch_end", "saved", "epoch_end", "saved", "fit_end"]
    assert [h["batches_so_far"] for h in hist] == [3, 6]
    assert [json.loads(line)["batches_so_far"] for line in (tmp_path / "h.jsonl").read_text().splitlines()] == [3, 6]
    assert read_checkpoint(ck)["counting"] == {"batches": 6}
    resumed = _Counting()
    more = af.adversarial_train(af.models.PlantedNet(hidden=8), loader, method="standard", epochs=2, progress=False,
                                callbacks=[resumed], checkpoint=ck, resume=True)
    assert resumed.batches == 6 and resumed.calls == ["fit_start", "fit_end"] and more == hist
    with pytest.raises(TypeError, match="callbacks must be advfeat.train.Callback"):
        af.AdversarialTrainer(af.models.PlantedNet(), loader, method="standard", callbacks=[print])


@pytest.mark.parametrize("isolate", [True, False])
def test_a_learning_curve_that_isolates_the_rng_does_not_change_the_training(isolate):
    """EpochEvaluation(isolate_rng=True) measures without drawing from the training's random streams: the weights
    are bitwise those of a run without it; without isolation the evaluation's loader draws a seed and the shuffles
    that follow differ (the check itself)."""
    data = af.data.planted(256, 64, seed=0)

    def weights(callbacks):
        torch.manual_seed(0)
        model = af.models.PlantedNet(hidden=8)
        af.adversarial_train(model, DataLoader(data.train, batch_size=32, shuffle=True), method="standard", epochs=3,
                             progress=False, callbacks=callbacks)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    curve = af.train.EpochEvaluation(DataLoader(data.test, batch_size=64), prefix="test_", isolate_rng=isolate)
    assert torch.equal(weights([curve]), weights([])) == isolate
