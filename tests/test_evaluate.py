"""evaluate(): counts, the worst case, early stopping that reports the accuracy of running every step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, same_state, snapshot
from torch.utils.data import DataLoader, TensorDataset

import advfeat as af


def trained_model_and_loader(seed: int = 0):
    """A small model trained on an easy task: most samples correct clean, many broken by the attack."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(4, 1, 6, 6, generator=g)
    y = torch.randint(0, 4, (256,), generator=g)
    x = (0.6 * protos[y] + 0.4 * torch.rand(256, 1, 6, 6, generator=g)).clamp(0, 1)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, DataLoader(TensorDataset(x, y), batch_size=64)


@pytest.mark.parametrize("schedule", ["cpu", "accelerator"])
def test_early_stop_reports_the_same_accuracy_as_every_step(schedule, monkeypatch):
    if schedule == "accelerator":
        monkeypatch.setattr(af.engine, "_accelerated", lambda device: True)
    model, loader = trained_model_and_loader()
    attacks = {"l2": af.L2PGD(0.5, steps=12), "linf": af.LinfPGD(0.05, steps=12, random_start=True)}
    fast = af.evaluate(model, loader, attacks, early_stop=True, progress=False,
                       generator=torch.Generator().manual_seed(0))
    full = af.evaluate(model, loader, attacks, early_stop=False, progress=False,
                       generator=torch.Generator().manual_seed(0))
    assert fast.as_dict() == full.as_dict()
    assert fast.clean_accuracy > 0.9
    assert 0 < fast.robust_correct["l2"] < fast.clean_correct  # the attack breaks some, not all


def test_counts_and_worst_case():
    model, loader = trained_model_and_loader(1)
    before = snapshot(model)
    res = af.evaluate(model, loader, [af.L2PGD(0.3, steps=5), af.LinfPGD(0.04, steps=5)], progress=False)
    assert res.total == 256
    assert set(res.robust_correct) == {"L2PGD(eps=0.3, steps=5)", "LinfPGD(eps=0.04, steps=5)"}
    assert res.worst_correct is not None
    assert res.worst_correct <= min(res.robust_correct.values()) <= max(res.robust_correct.values())
    assert max(res.robust_correct.values()) <= res.clean_correct
    assert "clean:" in str(res) and '"total": 256' in res.to_json()
    assert same_state(before, snapshot(model))


def test_robust_accuracy_matches_a_direct_attack_with_keep_best():
    model, loader = trained_model_and_loader(2)
    attack = af.L2PGD(0.4, steps=6)
    res = af.evaluate(model, loader, {"a": attack}, progress=False)
    x, y = loader.dataset.tensors  # type: ignore[attr-defined]
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    x_adv = af.L2PGD(0.4, steps=6, keep_best=True)(model, x, y)
    with torch.no_grad():
        robust = (model(x_adv).argmax(1) == y) & clean
    assert res.clean_correct == int(clean.sum()) and res.robust_correct["a"] == int(robust.sum())


def test_clean_only_and_empty():
    model, loader = trained_model_and_loader()
    res = af.evaluate(model, loader, progress=False)
    assert res.worst_correct is None and res.robust_correct == {} and res.total == 256
    with pytest.raises(ValueError, match="loader yielded no samples"):  # no accuracy to report (was NaN)
        af.evaluate(model, [], {"a": af.L2PGD(0.1)}, progress=False)


def test_bad_input():
    model = make_model((6,))
    with pytest.raises(ValueError, match="targeted"):
        af.evaluate(model, [], af.L2PGD(0.1, targeted=True), progress=False)
    with pytest.raises(TypeError, match="attacks"):
        af.evaluate(model, [], {"a": "pgd"}, progress=False)  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"loader must yield \(x, y, \.\.\.\) tuples or mappings"):
        af.evaluate(model, [torch.rand(2, 6)], progress=False)
    with pytest.raises(ValueError, match="y must have shape"):
        af.evaluate(model, [(torch.rand(2, 6), torch.zeros(3, dtype=torch.long))], progress=False)


class Stripes(torch.nn.Module):
    """1-D inputs whose class flips every ~0.1: a big step can jump into a wrong band and out again."""

    def forward(self, x):
        s = torch.sin(30 * x.flatten(1).sum(1))
        return torch.stack([torch.zeros_like(s), 4 * s], 1)


@pytest.mark.parametrize("step_size", [0.07, 0.13, 0.2])
def test_a_sample_counts_as_broken_if_any_iterate_is_misclassified(step_size):
    """Reference: iterate k of a run equals the end of a k-step run (fixed step, no random start)."""
    model = Stripes()
    x = torch.linspace(0, 1, 400)[:, None]
    y = (torch.sin(30 * x[:, 0]) > 0).long()
    broken = torch.zeros(400, dtype=torch.bool)
    for k in range(1, 7):
        broken |= model(af.L2PGD(0.3, steps=k, step_size=step_size)(model, x, y)).argmax(1) != y
    last = model(af.L2PGD(0.3, steps=6, step_size=step_size)(model, x, y)).argmax(1) == y
    attack = {"a": af.L2PGD(0.3, steps=6, step_size=step_size)}
    for early_stop in (True, False):
        res = af.evaluate(model, [(x, y)], attack, early_stop=early_stop, progress=False)
        assert res.clean_correct == 400
        assert res.robust_correct["a"] == int((~broken).sum())
    assert int((~broken).sum()) < int(last.sum())  # last-iterate accuracy would overstate robustness


# -- per-sample results, intervals, paired comparison, curves, ranks -----------------------------------------------

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from conftest import HANG_GUARD_S, reaped  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "evaluate_worker.py"


def test_per_sample_results_agree_with_the_counts_and_round_trip_through_json():
    model, loader = trained_model_and_loader()
    attacks = {"l2": af.L2PGD(0.5, steps=5), "linf": af.LinfPGD(0.1, steps=5)}
    counts = af.evaluate(model, loader, attacks, progress=False)
    r = af.evaluate(model, loader, attacks, progress=False, per_sample=True)
    assert r.as_dict() == counts.as_dict()  # keeping the flags changes no count
    assert r.samples is not None and set(r.samples) == {"clean", "l2", "linf", "worst"}
    assert all(v.shape == (256,) and v.dtype == torch.bool for v in r.samples.values())
    assert int(r.samples["l2"].sum()) == r.robust_correct["l2"] and int(r.samples["worst"].sum()) == r.worst_correct
    assert not (r.samples["l2"] & ~r.samples["clean"]).any()  # broken clean means broken
    assert torch.equal(r.samples["worst"], r.samples["l2"] & r.samples["linf"])
    back = af.EvalResult.from_json(r.to_json())
    assert back.as_dict() == r.as_dict() and all(torch.equal(back.samples[k], r.samples[k]) for k in r.samples)
    lo, hi = r.interval("l2")
    assert lo <= r.robust_accuracy("l2") <= hi and json.loads(r.to_json())["interval_95"]["l2"] == [lo, hi]
    assert "95% CI" in str(r)
    merged = af.EvalResult.merge(r, r)
    assert merged.total == 512 and merged.robust_correct["l2"] == 2 * r.robust_correct["l2"]
    assert merged.samples["clean"].shape == (512,)


@given(p=st.floats(0.05, 0.95), n=st.integers(30, 400), seed=st.integers(0, 2**31 - 1))
def test_the_95_percent_interval_covers_the_true_accuracy_about_95_percent_of_the_time(p, n, seed):
    """Simulated: 2,000 binomial draws; Wilson's interval must cover p at least 90% of the time (its coverage
    oscillates around 95%; a normal interval at z = 1 would cover about 68%, and fail)."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.binomial(torch.full((2000,), float(n)), torch.full((2000,), p), generator=g).long().tolist()
    covered = sum(lo <= p <= hi for lo, hi in (af.stats.wilson(k, n) for k in draws))
    assert covered / 2000 >= 0.90


def test_mcnemar_and_compare_pair_two_models_on_the_same_samples():
    assert af.stats.mcnemar(12, 2) == 0.0129 and af.stats.mcnemar(0, 0) == 1.0 and af.stats.mcnemar(5, 5) == 1.0
    assert af.stats.mcnemar(0, 10) == round(2 * 0.5**10, 4)
    model, loader = trained_model_and_loader()
    other, _ = trained_model_and_loader(seed=1)
    attack = {"l2": af.L2PGD(0.5, steps=5)}
    a = af.evaluate(model, loader, attack, progress=False, per_sample=True)
    b = af.evaluate(other, loader, attack, progress=False, per_sample=True)
    c = af.compare(a, b, "l2", paired=True)  # one unshuffled loader: the same samples in the same order
    assert c.only_a - c.only_b == a.robust_correct["l2"] - b.robust_correct["l2"]
    assert c.p_value == af.stats.mcnemar(c.only_a, c.only_b) and af.compare(a, a, "l2", paired=True).p_value == 1.0
    with pytest.raises(ValueError, match="per-sample results"):
        af.compare(af.evaluate(model, loader, attack, progress=False), b)


def test_a_robustness_curve_in_one_pass_reuses_what_smaller_budgets_broke():
    model, loader = trained_model_and_loader()
    eps = [0.1, 0.3, 0.6, 1.0]
    curve = af.robustness_curve(model, loader, lambda e: af.L2PGD(e, steps=5), eps, progress=False)
    alone = [af.evaluate(model, loader, {"a": af.L2PGD(e, steps=5)}, progress=False).robust_accuracy("a")
             for e in eps]
    assert list(curve.accuracy) == sorted(curve.accuracy, reverse=True)  # monotone by construction
    assert curve.accuracy[0] == alone[0]  # the first budget is a plain evaluation
    assert all(c <= a for c, a in zip(curve.accuracy, alone, strict=True))  # a worse-or-equal attack at every budget
    assert curve.clean == af.evaluate(model, loader, progress=False).clean_accuracy and curve.total == 256
    assert all(lo <= acc <= hi for acc, (lo, hi) in zip(curve.accuracy, curve.intervals, strict=True))
    assert curve.figure().axes[0].get_xlabel() == "budget (eps)"
    with pytest.raises(ValueError, match="ascending"):
        af.robustness_curve(model, loader, lambda e: af.L2PGD(e), [0.5, 0.1])


def test_evaluate_and_its_curve_under_two_gloo_ranks_equal_one_process_exactly(tmp_path, rendezvous):
    """37 samples on 2 ranks: DistributedSampler (shuffled) pads one rank with a repeated sample, which must be
    counted once; every rank returns the global result, sample for sample the one process's."""
    one = subprocess.run([sys.executable, str(WORKER), str(tmp_path), "0", "1", "-"], capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert one.returncode == 0, one.stderr
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / f"r{r}"), str(r), "2", str(rendezvous)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for r in range(2):
        (tmp_path / f"r{r}").mkdir()
    with reaped(*procs):
        for p in procs:
            _, err = p.communicate(timeout=HANG_GUARD_S)
            assert p.returncode == 0, err
    alone = af.EvalResult.from_json((tmp_path / "rank0.json").read_text())
    for r in range(2):
        ranked = af.EvalResult.from_json((tmp_path / f"r{r}" / f"rank{r}.json").read_text())
        assert ranked.total == alone.total == 37 and ranked.as_dict() == alone.as_dict()
        assert ranked.indices.tolist() == list(range(37))
        assert all(torch.equal(ranked.samples[k], alone.samples[k]) for k in alone.samples)
        curve = json.loads((tmp_path / f"r{r}" / f"curve{r}.json").read_text())
        assert curve == json.loads((tmp_path / "curve0.json").read_text())  # the robustness curve too


def test_evaluate_checks_each_batch_once_and_freezes_the_model_once(monkeypatch):
    """The tally checks a batch once (box, labels, device, logits); the attacks it runs check only their result
    and logits, and the model's state is saved and restored once per evaluation, not once more per attack."""
    import advfeat.attacks.base as base
    import advfeat.guard as guard
    import advfeat.tally as tally

    checked, frozen = [], []
    real_check, real_frozen = tally.check_batch, guard._frozen
    monkeypatch.setattr(tally, "check_batch", lambda *a, **k: checked.append(1) or real_check(*a, **k))
    monkeypatch.setattr(base, "check_batch", lambda *a, **k: checked.append(2) or real_check(*a, **k))
    monkeypatch.setattr(guard, "_frozen", lambda *a, **k: frozen.append(1) or real_frozen(*a, **k))
    model, loader = trained_model_and_loader()
    attacks = {"a": af.L2PGD(0.5, steps=2), "b": af.LinfPGD(0.05, steps=2), "c": af.APGD(0.05, steps=2)}
    r = af.evaluate(model, loader, attacks, progress=False)
    batches = len(list(loader))
    assert checked == [1] * batches and len(frozen) == 1 and r.total > 0
