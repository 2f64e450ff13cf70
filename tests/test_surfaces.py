"""Nothing silent in the newer surfaces (callbacks, curves, JSON results, compare, the map command, the attacks'
arguments): each defect a hostile user found, one test each, and the risks found beside them."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import advfeat as af
from advfeat.cli import main
from advfeat.train import Callback


def _data(n: int = 64) -> TensorDataset:
    return af.data.planted(n, 32, seed=1).train


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return af.models.PlantedNet(hidden=16)


def _trainer(tmp_path: Path, callbacks: Any, method: str = "standard", epochs: int = 2,
             **kw: Any) -> af.AdversarialTrainer:
    return af.AdversarialTrainer(_model(), DataLoader(_data(), batch_size=32), method=method, epochs=epochs,
                                 progress=False, checkpoint=tmp_path / "ck.pt", callbacks=callbacks, **kw)


class _Keyed(Callback):
    def __init__(self, key: str, value: Any = 0) -> None:
        self.state_key = key  # type: ignore[misc]
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


# -- 1. callback state keys that collide -------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["fingerprint", "epoch", "model", "optimizer", "scheduler", "scaler", "history",
                                 "rng"])
def test_a_callback_state_key_of_the_trainers_own_entries_is_refused_when_the_trainer_is_built(tmp_path, key):
    with pytest.raises(ValueError, match=f"state_key {key!r} of _Keyed is one of the trainer's own checkpoint"):
        _trainer(tmp_path, [_Keyed(key)])


def test_two_callbacks_with_one_state_key_and_a_key_the_guard_holds_are_refused(tmp_path):
    with pytest.raises(ValueError, match="_Keyed and _Keyed both save their state under 'mine'"):
        _trainer(tmp_path, [_Keyed("mine"), _Keyed("mine")])
    with pytest.raises(ValueError, match="_Keyed and Guard both save their state under 'guard'"):
        _trainer(tmp_path, [_Keyed("guard")], method="fgsm-rs", attack=af.LinfPGD(0.1))
    with pytest.raises(TypeError, match="state_key must be a non-empty string or None"):
        _trainer(tmp_path, [_Keyed("")])


# -- 2. callback states and records the checkpoint or the history cannot hold ------------------------------------

class _Opaque:
    pass


@pytest.mark.parametrize("value, kind", [(np.float64(1.5), "numpy.float64"), (np.zeros(3), "numpy.ndarray"),
                                         (_Opaque(), "_Opaque"), (torch.Generator(), "torch.Generator"),
                                         (lambda: 1, "function"), ((x for x in ()), "generator")])
def test_a_callback_state_the_checkpoint_cannot_read_back_is_refused_at_the_first_save(tmp_path, value, kind):
    """Refused before the first checkpoint is written, naming the callback, the key and the type: a checkpoint that
    a resume would call damaged (and its .prev with it) is never written."""
    with pytest.raises(TypeError, match=rf"_Keyed \(state_key 'mine'\)\.state_dict\(\)\['value'\] is a {kind}"):
        _trainer(tmp_path, [_Keyed("mine", value)]).fit()
    assert not (tmp_path / "ck.pt").exists()


def test_a_callback_state_of_tensors_numbers_and_strings_resumes(tmp_path):
    value = {"t": torch.arange(3), "n": [1, 2.5, None, True], "s": "text"}
    _trainer(tmp_path, [_Keyed("mine", value)], epochs=1).fit()
    again = _Keyed("mine", None)
    _trainer(tmp_path, [again], epochs=1, resume=True).fit()
    assert again.value["n"] == [1, 2.5, None, True] and torch.equal(again.value["t"], torch.arange(3))


class _Records(Callback):
    def __init__(self, value: Any) -> None:
        self.value = value

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        record["extra"] = self.value


@pytest.mark.parametrize("value, kind", [(torch.tensor(1.0), "torch.Tensor"), (np.float32(1.0), "numpy.float32"),
                                         ({1, 2}, "set"), (b"x", "bytes"), (float("nan"), "nan"),
                                         (float("inf"), "inf")])
def test_a_record_the_history_cannot_hold_is_refused_naming_the_callback_and_the_field(tmp_path, value, kind):
    with pytest.raises((TypeError, ValueError), match=rf"_Records put {kind}.* in the epoch's record as 'extra'"):
        _trainer(tmp_path, [_Records(value)], history_file=tmp_path / "h.jsonl").fit()


def test_callbacks_none_means_no_callbacks_and_a_lone_callback_is_named(tmp_path):
    assert len(_trainer(tmp_path, None, epochs=1).fit()) == 1
    with pytest.raises(TypeError, match="callbacks must be a list of advfeat.train.Callback objects"):
        _trainer(tmp_path / "b", _Keyed("x"))


def test_every_json_the_library_writes_is_strict():
    """NaN and inf are not JSON: an empty result's undefined accuracies are written as null."""
    text = af.EvalResult().to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert json.loads(text)["clean_accuracy"] is None


# -- 3. two threads attacking one shared model ---------------------------------------------------------------------

class _Dropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_two_threads_attacking_one_model_leave_it_as_found_and_each_gets_a_lone_runs_result():
    torch.manual_seed(0)
    model = _Dropout().train()
    before = [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()]
    x, y = _data(32).tensors()
    attack = af.L2PGD(0.5, steps=5, random_start=True)
    lone = attack(model, x, y, generator=torch.Generator().manual_seed(7))
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(30):
                results.append(attack(model, x, y, generator=torch.Generator().manual_seed(7)))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()] == before
    assert all(torch.equal(r, lone) for r in results)  # eval mode throughout: no dropout during any attack


def test_the_guard_holds_the_model_for_its_thread():
    model = _Dropout()
    lock = af.guard.model_lock(model)
    taken: list[bool] = []
    with af.guard.frozen_model(model), af.guard.frozen_model(model):  # re-entrant in one thread
        other = threading.Thread(target=lambda: taken.append(lock.acquire(blocking=False)))
        other.start()
        other.join()
    assert taken == [False] and lock.acquire(blocking=False)
    lock.release()


# -- 4, 5. robustness curves: one accuracy per budget, evaluate's checks ---------------------------------------------

def _planted() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = _model().eval()
    x, y = _data(32).tensors()
    return model, x, y


@pytest.mark.parametrize("eps", [[0.1, 0.1000001, 0.5], [0.3, 0.30000001]])
def test_a_curve_has_one_accuracy_per_budget_even_for_budgets_that_print_alike(eps):
    model, x, y = _planted()
    c = af.robustness_curve(model, [(x, y)], lambda e: af.L2PGD(e, steps=2), eps, progress=False)
    assert c.eps == tuple(eps) and len(c.accuracy) == len(eps) == len(c.intervals)


def test_a_curve_refuses_repeated_budgets():
    model, x, y = _planted()
    with pytest.raises(ValueError, match="eps must be budgets > 0 in strictly ascending order"):
        af.robustness_curve(model, [(x, y)], lambda e: af.L2PGD(e, steps=2), [0.1, 0.1, 0.5], progress=False)


class _NaNModel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 10), float("nan"))


def test_a_curve_checks_labels_and_logits_as_evaluate_does():
    model, x, y = _planted()
    small = nn.Sequential(nn.Flatten(), nn.Linear(256, 5))
    def curve(m: nn.Module, yy: torch.Tensor) -> af.RobustnessCurve:
        return af.robustness_curve(m, [(x, yy)], lambda e: af.L2PGD(e, steps=2), [0.5], progress=False)

    with pytest.raises(ValueError, match=r"y must hold labels in \[0, C\) = \[0, 5\), found \[7, 7\]"):
        curve(small, torch.full_like(y, 7))
    with pytest.raises(FloatingPointError, match="returned non-finite logits"):
        curve(_NaNModel(), y)


# -- 6. JSON results that contradict themselves ----------------------------------------------------------------------

def _result() -> af.EvalResult:
    model, x, y = _planted()
    return af.evaluate(model, [(x, y)], {"pgd": af.L2PGD(0.5, steps=2)}, per_sample=True, progress=False)


@pytest.mark.parametrize("change, field", [
    (lambda r: r.update(clean_correct=r["clean_correct"] + 1), "clean_correct"),
    (lambda r: r["samples"].update(clean=r["samples"]["clean"][:-1]), "samples"),
    (lambda r: r["samples"].update(clean="2" + r["samples"]["clean"][1:]), "samples"),
    (lambda r: r.update(total=40.7), "total"),
    (lambda r: r.update(total="40"), "total"),
    (lambda r: r.update(indices=[0] * r["total"]), "indices"),
    (lambda r: r.update(indices=[0, 1]), "indices"),
    (lambda r: r["robust_correct"].update(pgd=-1), "robust_correct"),
    (lambda r: r.update(worst_correct=r["total"] + 1), "worst_correct"),
    (lambda r: r.pop("robust_correct"), "robust_correct"),
    (lambda r: r.update(samples=[1, 2]), "samples"),
])
def test_a_json_result_that_contradicts_itself_is_refused_naming_the_field(change, field):
    record = json.loads(_result().to_json())
    record["indices"] = list(range(record["total"]))
    assert af.EvalResult.from_json(json.dumps(record)).total == record["total"]
    change(record)
    with pytest.raises(ValueError, match=f"EvalResult JSON: {field}"):
        af.EvalResult.from_json(json.dumps(record))


def test_compare_pairs_by_index_or_when_told_and_refuses_otherwise():
    a, b = _result(), _result()
    assert af.compare(a, b, paired=True).only_a == 0
    with pytest.raises(ValueError, match="compare: neither result knows its samples' indices"):
        af.compare(a, b)
    a.indices = b.indices = torch.arange(a.total)
    assert af.compare(a, b).p_value == 1.0
    b.indices = torch.arange(a.total).flip(0)
    with pytest.raises(ValueError, match="same samples"):
        af.compare(a, b)


# -- 7, 8. the map command: one line per error, cells checked before any work ----------------------------------------

def _map(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["map", *args])
    err = capsys.readouterr().err
    return code, err


def test_the_map_command_names_its_errors_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "nocells.json").write_text("{}")
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "settings.json").write_text("{}")
    (rep / "models").mkdir()
    (rep / "models" / "standard.pt").write_text("")
    cases = [
        (["--out", str(tmp_path / "file"), "--design", "axes", "--base", "mode=det"], "--out .* is a file"),
        (["--choose", str(tmp_path / "missing.json")], "--choose .*missing.json.*no such file"),
        (["--choose", str(tmp_path / "bad.json")], "--choose .*bad.json.* is not JSON"),
        (["--choose", str(tmp_path / "nocells.json")], "--choose .*nocells.json.* holds no 'cells'"),
        (["--from", str(rep), "--out", str(tmp_path / "o")], "--from .*settings.json.* holds no 'settings'"),
        (["--out", str(tmp_path / "o"), "--base", "eps=abc"], "--base eps=abc: eps must be a number"),
        (["--out", str(tmp_path / "o"), "--vary", "n=1,x"], "--vary n=1,x: n must be a whole number"),
        (["--out", str(tmp_path / "o"), "--base", "colour=red"], "--base colour=red: unknown axis 'colour'"),
    ]
    for args, match in cases:
        code, err = _map(args, capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (args, err)
        assert err.startswith("advfeat map: error: ") and __import__("re").search(match, err), (args, err)


def test_a_cell_of_more_images_than_the_dataset_is_refused_before_any_work(tmp_path, capsys):
    code, err = _map(["--out", str(tmp_path / "o"), "--dataset", "planted", "--scale", "quick", "--design", "axes",
                      "--base", "mode=det", "n=99999999", "source_epochs=1"], capsys)
    assert code == 2 and "n must be at most the 10,000 training images of planted" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("raised, code, said", [
    (KeyboardInterrupt(), 130, "interrupted; finished cells, sets and checkpoints are kept in --out"),
    (PermissionError(13, "Permission denied", "o/stages"), 1, "Permission denied"),
    (OSError(28, "No space left on device"), 1, "No space left on device")])
def test_the_map_command_ends_in_one_line_on_ctrl_c_and_on_the_machines_failures(tmp_path, capsys, monkeypatch,
                                                                                 raised, code, said):
    def fail(*args: Any, **kwargs: Any) -> None:
        raise raised

    monkeypatch.setattr(af.replicate.map_cli, "build_cells", fail)
    got, err = _map(["--out", str(tmp_path / "o"), "--design", "axes", "--base", "mode=det"], capsys)
    assert got == code and said in err and err.strip().count("\n") == 0 and "resume=True" not in err


@pytest.mark.parametrize("item, match", [("eps=nan", "eps must be a finite number > 0"),
                                          ("eps=inf", "eps must be a finite number > 0"),
                                          ("learner_epochs=0", "learner_epochs must be >= 1"),
                                          ("n=0", "n must be >= 1")])
def test_a_cell_that_cannot_run_is_refused_before_any_work(tmp_path, capsys, item, match):
    code, err = _map(["--out", str(tmp_path / "o"), "--dataset", "planted", "--scale", "quick", "--design", "axes",
                      "--base", "mode=det", "n=100", "source_epochs=1", item], capsys)
    assert code == 2 and match in err
    assert not (tmp_path / "o" / "stages").exists() or not any((tmp_path / "o" / "stages").iterdir())


# -- 9. attack arguments checked when the attack is made --------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda **k: af.Square(0.1, **k), lambda **k: af.FAB(0.1, **k),
                                  lambda **k: af.AutoAttack("linf", 0.1, **k), lambda **k: af.APGD(0.1, **k),
                                  lambda **k: af.L2PGD(0.5, **k), lambda **k: af.Restarts(af.L2PGD(0.5), 2, **k)])
@pytest.mark.parametrize("seed", [1.5, 2**64, -1, True, "3"])
def test_a_seed_is_checked_when_the_attack_is_made(make, seed):
    with pytest.raises((TypeError, ValueError), match="seed must be None or a whole number in \\[0, 2\\*\\*63\\)"):
        make(seed=seed)


@pytest.mark.parametrize("make, match", [
    (lambda: af.Square(0.1, targeted="no"), "targeted must be True or False"),
    (lambda: af.L2PGD(0.5, random_start=1), "random_start must be True or False"),
    (lambda: af.Square(0.1, lower=0.8, upper=0.2), "lower must be below upper"),
    (lambda: af.FAB(0.1, lower=0.8, upper=0.2), "lower must be below upper"),
    (lambda: af.Square(0.1, lower=float("nan")), "lower must not be NaN"),
])
def test_attack_flags_and_boxes_are_checked_when_the_attack_is_made(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


# -- the risks found beside them ------------------------------------------------------------------------------------

def test_two_attacks_that_print_alike_are_refused_rather_than_merged():
    model, x, y = _planted()
    with pytest.raises(ValueError, match="attacks: two attacks print as"):
        af.evaluate(model, [(x, y)], [af.L2PGD(0.5, steps=2), af.L2PGD(0.5, steps=2)], progress=False)


def test_trades_keeps_the_draws_of_an_eot_attack():
    """TRADES maximises its KL with its attack's steps, rule and draws: EOT's 3 draws make 3 forwards a step."""
    calls: list[int] = []

    def count(draws: int) -> int:
        model = _model()
        hook = model.register_forward_hook(lambda *a: calls.append(1))
        calls.clear()
        attack = af.EOT(af.L2PGD(0.5, steps=4), draws=draws)
        af.adversarial_train(model, DataLoader(_data(32), batch_size=32), method=af.TRADES(attack), epochs=1,
                             progress=False)
        hook.remove()
        return len(calls)

    one, three = count(1), count(3)
    assert three - one == 2 * 4  # 4 steps, 2 more forwards each; the loss's own forwards are the same


class _Vector(af.TrainingMethod):
    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: Any) -> Any:
        logits = model(x)
        return nn.functional.cross_entropy(logits, y, reduction="none"), logits


class _Float(af.TrainingMethod):
    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: Any) -> Any:
        return 1.0, model(x)


class _Bare(af.TrainingMethod):
    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: Any) -> Any:
        return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("method, match", [
    (_Vector(), r"_Vector.loss must return \(a scalar loss tensor, logits\); its loss has shape \(32,\)"),
    (_Float(), r"_Float.loss must return \(a scalar loss tensor, logits\); its loss is a float"),
    (_Bare(), r"_Bare.loss must return \(a scalar loss tensor, logits\); it returned a Tensor")])
def test_a_methods_loss_that_is_not_a_scalar_tensor_is_named(tmp_path, method, match):
    with pytest.raises(TypeError, match=match):
        af.adversarial_train(_model(), DataLoader(_data(), batch_size=32), method=method, epochs=1, progress=False)


def test_a_checkpoint_with_a_negative_batchnorm_variance_is_refused(tmp_path):
    from test_release import narrow, write_robustness_checkpoint  # the suite's robustness-library files

    net = narrow("resnet18")
    with torch.no_grad():
        next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d)).running_var[0] = -0.5
    write_robustness_checkpoint(tmp_path / "ck.pt", net)
    with pytest.raises(ValueError, match="running_var .*negative"):
        af.models.from_robustness(tmp_path / "ck.pt", arch="resnet18", width=4)


def test_a_per_sample_budget_evaluates_when_a_sample_is_misclassified_clean():
    model, x, y = _planted()
    y = y.clone()
    wrong = model(x).argmax(1).ne(y)
    y[~wrong][:1] = (y[~wrong][:1] + 1) % 10
    eps = torch.linspace(0.1, 1.0, len(y))
    r = af.evaluate(model, [(x, y)], {"pgd": af.L2PGD(eps, steps=2)}, progress=False)
    assert r.total == len(y) and not math.isnan(r.robust_accuracy("pgd"))


@pytest.mark.skipif(not __import__("conftest").bf16_supported(), reason="no bfloat16 autograd on this CPU")
@pytest.mark.parametrize("make, norm", [(lambda: af.LinfPGD(8 / 255, steps=5, random_start=True), "linf"),
                                        (lambda: af.APGD(8 / 255, steps=5), "linf"),
                                        (lambda: af.L2PGD(0.5, steps=5, random_start=True), "l2"),
                                        (lambda: af.FAB(8 / 255, steps=5, n_target_classes=2), "linf"),
                                        (lambda: af.Restarts(af.LinfPGD(8 / 255, steps=3, random_start=True), 2),
                                         "linf")])
def test_a_bfloat16_batch_stays_inside_its_ball_exactly(make, norm):
    """The iterate is computed in float32 and cast to the batch's bfloat16 by rounding each pixel towards the clean
    one: no sample leaves the ball, not even by one bfloat16 ulp (5.8% did at Linf 8/255 with nearest rounding)."""
    model = af.models.PlantedNet().to(torch.bfloat16).eval()
    x, y = af.data.planted(200, 16, seed=2).train.tensors()
    x = x.to(torch.bfloat16)
    attack = make()
    out = attack(model, x, y, generator=torch.Generator().manual_seed(0))
    d = (out.double() - x.double()).flatten(1)
    eps = attack.threat_model().eps if hasattr(attack, "threat_model") else 8 / 255
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert out.dtype == torch.bfloat16 and bool((size <= eps * (1 + 1e-6)).all()), float(size.max())
    assert out.min() >= 0 and out.max() <= 1
