"""An evaluation that audits itself: each flag raised by a model built to raise it and by no healthy one; the
best-known accuracy; every attack's passes counted; MALT's targets; the randomness frozen."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import advfeat as af
from advfeat.attacks.apgd import malt_targets
from advfeat.audit import CHECKS
from advfeat.cost import counting


@functools.cache
def _models() -> tuple[nn.Module, nn.Module, af.data.Planted]:
    """A standard and a PGD-trained planted MLP (shared by the tests: they must not train them)."""
    data = af.data.planted(2000, 400, seed=0)

    def trained(method: str, epochs: int) -> nn.Module:
        torch.manual_seed(0)
        m = af.models.PlantedNet()
        af.adversarial_train(m, DataLoader(data.train, batch_size=128, shuffle=True), method=method,
                             attack=af.L2PGD(0.5, steps=5), epochs=epochs, progress=False)
        return m.eval()

    return trained("standard", 30), trained("pgd", 10), data


class _Quantised(nn.Module):
    """Rounds its input to 8 levels: zero gradients almost everywhere."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(torch.round(x * 8) / 8)


class _Noisy(_Quantised):
    """Gaussian noise on the input at every forward: a randomised defence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m((x + 0.05 * torch.randn_like(x)).clamp(0, 1))


class _Shattered(_Quantised):
    """A fine sine added to the input: gradients that do not point anywhere (Athalye et al.'s shattering)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m((x + 0.2 * torch.sin(5000 * x)).clamp(0, 1))


class _NaNGradient(_Quantised):
    """The forward is the model's; the input gradient is NaN where a pixel is below 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x + 0 * torch.sqrt(x - 0.5).nan_to_num(0.0))


def _audit(model: nn.Module, **kw: object) -> af.AuditReport:
    _, _, data = _models()
    return af.audit(model, data.test, af.L2Ball(0.5), n=200, steps=20, queries=300, **kw)  # type: ignore[arg-type]


def test_a_standard_and_a_pgd_trained_model_raise_no_flag():
    standard, robust, _ = _models()
    for model in (standard, robust):
        report = _audit(model)
        assert report.flags == [] and report.ok, str(report)
        assert report.measurements["curve"][-1][1] == 0.0  # nothing survives a budget spanning the box


@pytest.mark.parametrize("wrap, flags", [
    (_Quantised, {"zero-gradients", "gradient-free-breaks-more", "not-zero-at-unbounded-eps"}),
    (_Noisy, {"stochastic"}),
    (_Shattered, {"accuracy-rises-with-eps"}),
    (_NaNGradient, {"non-finite-gradients"}),
], ids=["quantised", "noisy", "shattered", "nan-gradient"])
def test_each_broken_evaluation_raises_its_flags(wrap, flags):
    _, robust, _ = _models()
    report = _audit(wrap(robust).eval())
    assert {f.check for f in report.flags} >= flags, str(report)
    assert all(f.check in CHECKS for f in report.flags)
    for f in report.flags:
        assert f.evidence and f.remedy


def test_a_surrogate_that_breaks_more_than_the_white_box_is_flagged():
    """The quantised model's own gradients are zero; PGD through its unquantised twin breaks it."""
    _, robust, _ = _models()
    report = _audit(_Quantised(robust).eval(), surrogate=robust)
    assert "transfer-breaks-more" in {f.check for f in report.flags}
    assert "transfer-breaks-more" not in {f.check for f in _audit(robust, surrogate=robust).flags}


def test_the_binarization_test_runs_and_passes_a_healthy_evaluation():
    _, robust, _ = _models()
    report = _audit(robust, binarization=True)
    b = report.measurements["binarization"]
    assert b["tested"] >= 10 and b["failed"] == 0 and report.ok


def test_the_report_prints_writes_strict_json_and_draws():
    _, robust, _ = _models()
    report = _audit(_Quantised(robust).eval())
    text = str(report)
    assert text.startswith("audit of _Quantised in L2Ball(0.5) on 200 samples: 3 flags") and "remedy:" in text
    record = json.loads(report.to_json())
    assert record["ok"] is False and {f["check"] for f in record["flags"]} == {f.check for f in report.flags}
    fig = report.figure()
    assert len(fig.axes) == 2 and "zero-gradients" in fig._suptitle.get_text()


def test_audit_refuses_what_it_cannot_check():
    _, robust, data = _models()
    with pytest.raises(TypeError, match="threat must be an L2Ball or LinfBall with a float eps"):
        af.audit(robust, data.test, af.Box())
    with pytest.raises(ValueError, match="n must be a whole number >= 1"):
        af.audit(robust, data.test, af.L2Ball(0.5), n=0)


# -- best-known accuracy ----------------------------------------------------------------------------------------

def test_best_known_is_the_per_sample_worst_case_over_results_and_sets():
    _, robust, data = _models()
    loader = DataLoader(data.test, batch_size=200)
    a = af.evaluate(robust, loader, {"apgd": af.APGD(0.5, norm="l2", steps=10)}, per_sample=True, progress=False)
    b = af.evaluate(robust, loader, {"square": af.Square(0.5, norm="l2", queries=300, seed=0)}, per_sample=True,
                    progress=False)
    x, y = data.test.tensors()
    x_adv = af.L2PGD(0.5, steps=10, random_start=True, seed=3)(robust, x, y)
    own = robust(x_adv).argmax(1) == y
    best = af.EvalResult.best_known(a, b, own)
    assert best.samples is not None
    worst = a.samples["apgd"] & b.samples["square"] & own & a.samples["clean"]
    assert best.worst_correct == int(worst.sum()) <= min(a.worst_correct, b.worst_correct)
    assert set(best.robust_correct) == {"apgd", "square", "set 2"}
    lo, hi = best.interval("worst")
    assert lo <= best.worst_accuracy <= hi
    assert af.compare(best, a, paired=True).only_b >= 0
    assert best.passes["apgd"].total == a.passes["apgd"].total  # the costs travel with their attacks
    twice = af.EvalResult.best_known(a, a)
    assert set(twice.robust_correct) == {"0:apgd", "1:apgd"} and twice.worst_correct == a.worst_correct


def test_best_known_refuses_results_of_other_samples():
    a = af.EvalResult.from_samples({"clean": torch.ones(4, dtype=torch.bool), "p": torch.ones(4, dtype=torch.bool)})
    b = af.EvalResult.from_samples({"clean": torch.ones(5, dtype=torch.bool), "q": torch.ones(5, dtype=torch.bool)})
    with pytest.raises(ValueError, match="must hold the same 4 samples"):
        af.EvalResult.best_known(a, b)
    c = af.EvalResult.from_samples({"clean": torch.ones(4, dtype=torch.bool)}, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="same samples in the same order"):
        af.EvalResult.best_known(a, c)
    with pytest.raises(ValueError, match="per-sample results"):
        af.EvalResult.best_known(af.EvalResult(total=4, clean_correct=4))


# -- passes per image ---------------------------------------------------------------------------------------------

def test_every_attack_counts_its_forward_and_backward_passes():
    """A PGD step is one forward and one backward per image; APGD-T's targets, FAB's gradients, EOT's draws and
    the cascade's parts are each counted as they run."""
    _, robust, data = _models()
    x, y = data.test.tensors()
    x, y = x[:50], y[:50]
    with counting() as p:
        af.L2PGD(0.5, steps=7)(robust, x, y)
    assert (p.forward, p.backward) == (7 * 50, 7 * 50)
    with counting() as p:
        af.EOT(af.L2PGD(0.5, steps=3), draws=4)(robust, x, y)
    assert (p.forward, p.backward) == (3 * 4 * 50, 3 * 4 * 50)
    with counting() as p:
        af.Square(0.5, norm="l2", queries=20, seed=0)(robust, x, y)
    assert p.backward == 0 and 0 < p.forward <= 21 * 50
    r = af.evaluate(robust, [(x, y)], {"aa": af.AutoAttack("l2", 0.5, steps=5, queries=20, seed=0)}, progress=False)
    parts = r.passes["aa"].parts
    assert list(parts) == ["apgd-ce", "apgd-t", "fab-t", "square"][:len(parts)] and len(parts) >= 2
    aa = r.passes["aa"]  # beside its parts, the cascade's own forwards that judge each part's points
    assert aa.backward == sum(q.backward for q in parts.values())
    assert aa.forward > sum(q.forward for q in parts.values())
    assert r.passes_per_image("aa") == r.passes["aa"].total / 50
    assert "passes per image" in str(r) and "apgd-ce" in str(r)
    again = af.EvalResult.from_json(r.to_json())
    assert again.passes["aa"].as_dict() == r.passes["aa"].as_dict()
    with pytest.raises(KeyError, match="no passes counted"):
        r.passes_per_image("pgd")


# -- MALT -----------------------------------------------------------------------------------------------------------

def test_malt_orders_targets_by_the_linearised_distance_to_their_boundary():
    """A linear model: MALT's order is the exact order of the distances to each class's boundary, whatever the
    confidences say."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 5)
    x = torch.rand(8, 16)
    y = lin(x).argmax(1)
    order = malt_targets(lin, x, y, af.LinfBall(0.1))
    z = lin(x).detach()
    w = lin.weight.detach()
    for i in range(8):
        dist = [(z[i, y[i]] - z[i, t]) / (w[y[i]] - w[t]).abs().sum() if t != y[i] else float("inf")
                for t in range(5)]
        assert order[i].tolist() == sorted(range(5), key=lambda t: float(dist[t]))


@pytest.mark.parametrize("norm, eps", [("l2", 0.5), ("linf", 0.05)])
def test_malts_cascade_is_within_a_point_of_the_standard_one_at_a_fraction_of_its_passes(norm, eps):
    _, robust, data = _models()
    x, y = data.test.tensors()
    x, y = x[:200], y[:200]
    attacks = {"standard": af.AutoAttack(norm, eps, steps=20, queries=300, seed=0),
               "malt": af.AutoAttack(norm, eps, version="malt", steps=20, seed=0)}
    r = af.evaluate(robust, [(x, y)], attacks, progress=False)
    assert r.robust_accuracy("malt") <= r.robust_accuracy("standard") + 0.01
    assert r.passes_per_image("malt") < r.passes_per_image("standard")
    assert [name for name, _ in attacks["malt"].parts(10)] == ["apgd-ce", "apgd-t", "fab-t"]
    assert af.APGD(eps, norm=norm, targets="malt", n_target_classes=3) != af.APGD(eps, norm=norm, n_target_classes=3)
    with pytest.raises(ValueError, match="targets must be one of 'confidence', 'malt'"):
        af.APGD(eps, targets="closest")


# -- fixed randomness -------------------------------------------------------------------------------------------------

def test_fixed_randomness_attacks_one_draw_and_leaves_the_callers_generator_alone():
    """Against a noisy model, the attack on a frozen draw finds points that also fool the random model; the global
    generator is where it was."""
    _, robust, data = _models()
    noisy = _Noisy(robust).eval()
    x, y = data.test.tensors()
    x, y = x[:200], y[:200]
    attacks = {"apgd": af.APGD(0.5, norm="l2", steps=20, seed=0),
               "fixed": af.FixedRandomness(af.APGD(0.5, norm="l2", steps=20, seed=0)),
               "eot": af.EOT(af.APGD(0.5, norm="l2", steps=20, seed=0), draws=5)}
    torch.manual_seed(1)
    state = torch.get_rng_state()
    fixed = af.FixedRandomness(af.APGD(0.5, norm="l2", steps=5, seed=0))
    fixed(noisy, x, y)
    after = torch.get_rng_state()
    assert torch.equal(state, after)
    torch.manual_seed(1)
    r = af.evaluate(noisy, [(x, y)], attacks, progress=False)
    assert r.robust_accuracy("fixed") <= r.robust_accuracy("apgd") + 0.03
    assert "FixedRandomness(attack=APGD(" in repr(fixed) and fixed.box == (0.0, 1.0)
