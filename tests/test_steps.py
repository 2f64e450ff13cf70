"""Step rules: the constant rule is today's engine bit for bit; every rule stays in the set, keeps the model's
state, is deterministic, compacts its per-sample state under early stopping, and finds known optima."""

from __future__ import annotations

import dataclasses
import math

import hypothesis.strategies as st
import pytest
import torch
from conftest import make_model, same_state, snapshot
from hypothesis import given
from torch import Tensor

import advfeat as af
from advfeat.engine import optimize
from advfeat.steps import APGDStep, Constant, Cosine, Linear, Momentum, StepContext

RULES = [Constant(), Momentum(0.9), af.steps.Adam(), APGDStep(), Cosine(), Linear(Momentum(0.5), final=0.1),
         Cosine(af.steps.Adam(), final=0.05), af.steps.RelativeToStart(Cosine())]
THREATS = [af.L2Ball(0.5), af.LinfBall(0.05), af.Box()]
rules = st.sampled_from(RULES)
threats = st.sampled_from(THREATS)
seeds = st.integers(0, 2**31 - 1)


def oracle(objective, x, threat, steps, step_size, maximize=True, start=None, early_stop=False):
    """The engine as it was before step rules (the paper's recipe): z <- P(z +- a * direction(grad)), with
    early stopping masking finished samples' steps. No compaction: used with per-sample objectives."""
    wdt = torch.promote_types(x.dtype, torch.float32)
    xc = x.detach().to(wdt)
    bounds = threat.bounds(xc)
    sign = 1.0 if maximize else -1.0
    step = step_size.to(wdt).reshape(-1, *[1] * (x.ndim - 1)) * sign if isinstance(step_size, Tensor) \
        else float(step_size) * sign
    z = xc.clone() if start is None else start.detach().to(wdt).clone()
    threat.project_(z, xc, bounds)
    done = torch.zeros(x.shape[0], dtype=torch.bool)
    for _ in range(steps):
        z.requires_grad_(True)
        loss, success = objective(z.to(x.dtype), None)
        (grad,) = torch.autograd.grad(loss.sum(), z)
        z = z.detach()
        d = threat.direction(grad.to(wdt))
        if early_stop:
            done |= success
            d.mul_((~done).to(wdt).reshape(-1, *[1] * (x.ndim - 1)))
        z.add_(d.mul_(step))
        threat.project_(z, xc, bounds)
    return z


def classification(model, y):
    def objective(z, index):
        logits = model(z)
        yi = y if index is None else y[index]
        return torch.nn.functional.cross_entropy(logits, yi, reduction="none"), logits.argmax(1) != yi
    return objective


@given(threat=threats, maximize=st.booleans(), per_sample=st.booleans(), shape=st.sampled_from([(6,), (3, 4, 4)]),
       seed=seeds)
def test_the_constant_rule_is_the_old_engine_bit_for_bit(threat, maximize, per_sample, shape, seed):
    model = make_model(shape, seed=seed % 5).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((5, *shape), generator=g)
    y = torch.randint(0, 4, (5,), generator=g)
    start = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    step = torch.rand(5, generator=g) * 0.2 + 0.01 if per_sample else 0.07
    objective = classification(model, y)
    with af.frozen_model(model):
        new = optimize(objective, x, threat, steps=6, step_size=step, maximize=maximize, start=start).x
        old = oracle(objective, x, threat, 6, step, maximize, start)
        default = optimize(objective, x, threat, steps=6, step_size=step, maximize=maximize, start=start,
                           rule=Constant()).x
    assert torch.equal(new, old) and torch.equal(default, old)


def test_the_constant_rule_with_early_stopping_is_the_old_engine_bit_for_bit():
    torch.manual_seed(0)
    w, x = torch.randn(30, 8, dtype=torch.float64), torch.rand(30, 8, dtype=torch.float64) * 0.2 + 0.4
    threshold = torch.rand(30, dtype=torch.float64) * 0.3

    def objective(z, index):
        wi, ti, xi = (w, threshold, x) if index is None else (w[index], threshold[index], x[index])
        gain = ((z - xi) * wi).sum(1)
        return gain, gain > ti

    for threat in (af.L2Ball(0.4), af.LinfBall(0.1)):
        new = optimize(objective, x, threat, steps=12, step_size=0.04, early_stop=True).x
        assert torch.equal(new, oracle(objective, x, threat, 12, 0.04, early_stop=True))


def test_the_defaults_of_attacks_and_constructors():
    assert af.L2PGD(0.5).rule == Constant() and repr(af.L2PGD(0.5)) == "L2PGD(eps=0.5)"
    assert repr(af.L2PGD(0.5, rule=Momentum())) == "L2PGD(eps=0.5, rule=Momentum(momentum=0.9))"
    assert af.robustify.__kwdefaults__["rule"] == af.steps.RelativeToStart(Cosine())  # chosen by measurement
    # chosen by what D_det teaches per pass (docs/benchmarks.md): 50 constant steps of eps/4
    assert af.nonrobustify.__kwdefaults__["rule"] == Constant() and af.nonrobustify.__kwdefaults__["steps"] == 50


@given(rule=rules, threat=threats, shape=st.sampled_from([(6,), (1, 5, 5), (3, 4, 4)]), targeted=st.booleans(),
       seed=seeds)
def test_every_rule_stays_in_the_set_keeps_the_model_and_is_deterministic(rule, threat, shape, targeted, seed):
    model = make_model(shape, seed=seed % 7)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((6, *shape), generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    attack = af.PGD(threat, steps=7, step_size=0.1, random_start=True, targeted=targeted, rule=rule, seed=seed)
    before = snapshot(model)
    out = attack(model, x, y)
    assert same_state(before, snapshot(model))
    assert out.min() >= 0 and out.max() <= 1
    eps = getattr(threat, "eps", None)
    d = (out - x).flatten(1)
    if isinstance(threat, af.L2Ball):
        assert (d.norm(dim=1) <= eps * (1 + 1e-5)).all()
    elif isinstance(threat, af.LinfBall):
        assert (d.abs().amax(1) <= eps + 1e-6).all()
    assert torch.equal(out, attack(model, x, y))  # the same seed, the same result


def _first_success(objective, x, threat, rule, steps, step_size, start):
    """Run every step on the whole batch and record each sample's first successful iterate."""
    first = x.clone()
    found = torch.zeros(x.shape[0], dtype=torch.bool)

    def spy(z, index):
        loss, success = objective(z, index)
        new = success & ~found
        first[new] = z.detach()[new].to(first.dtype)
        found[new] = True
        return loss, success

    optimize(spy, x, threat, steps=steps, step_size=step_size, rule=rule, start=start)
    return first, found


@pytest.mark.parametrize("rule", RULES, ids=repr)
@pytest.mark.parametrize("schedule", ["cpu", "accelerator"])
def test_early_stopping_compacts_the_rules_state(rule, schedule, monkeypatch):
    """Samples finish at different steps and are dropped from the batch; if a rule's state were not dropped
    with them, the samples left would continue from another sample's state. They must end exactly where they
    end when nothing is dropped."""
    if schedule == "accelerator":
        monkeypatch.setattr(af.engine, "_accelerated", lambda device: True)
    torch.manual_seed(1)
    n = 48
    w = torch.randn(n, 10, dtype=torch.float64)
    x = torch.rand(n, 10, dtype=torch.float64) * 0.2 + 0.4
    threshold = torch.linspace(0.0, 3.0, n, dtype=torch.float64)[torch.randperm(n)]  # the highest: never

    def objective(z, index):
        wi, ti, xi = (w, threshold, x) if index is None else (w[index], threshold[index], x[index])
        gain = ((z - xi) * wi).sum(1) - 0.3 * ((z - xi) ** 2).sum(1)
        return gain, gain > ti

    threat, steps = af.L2Ball(0.5), 24
    start = x + 0.05 * torch.randn(x.shape, dtype=x.dtype)  # away from x, so RelativeToStart moves too
    step = 1.0 if isinstance(rule, af.steps.RelativeToStart) else 0.05  # a fraction of the ~0.16 to travel
    first, found = _first_success(objective, x, threat, rule, steps, step, start)
    early = optimize(objective, x, threat, steps=steps, step_size=step, rule=rule, early_stop=True, start=start).x
    assert 0.2 < found.double().mean() < 1.0  # some finish, at different steps; some never do
    assert torch.allclose(early[found], first[found], atol=1e-12, rtol=0)


@pytest.mark.parametrize("rule", [Constant(), Momentum(0.5), APGDStep(), Cosine(), Linear(), Cosine(Momentum())],
                         ids=repr)
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_known_answer_a_linear_score_in_a_ball(rule, norm):
    """The best move for <w, x> is eps w / ||w|| (L2) or eps sign(w) (Linf); the box never binds here."""
    torch.manual_seed(0)
    w = torch.randn(4, 12, dtype=torch.float64)
    x = torch.full((4, 12), 0.5, dtype=torch.float64)
    eps = 0.1 if norm == "l2" else 0.02
    threat = af.L2Ball(eps) if norm == "l2" else af.LinfBall(eps)
    best = eps * w / w.norm(dim=1, keepdim=True) if norm == "l2" else eps * w.sign()
    res = optimize(lambda z, i: ((z * w).sum(1), None), x, threat, steps=40, step_size=eps / 4, rule=rule)
    assert torch.allclose(res.x - x, best, atol=1e-6), (res.x - x - best).abs().max()


@pytest.mark.parametrize(("rule", "step"), [(Constant(), 0.01), (Momentum(0.5), 0.01), (Cosine(), 0.1),
                                            (af.steps.Adam(), 0.003), (Cosine(af.steps.Adam()), 0.05),
                                            (APGDStep(), 0.1), (af.steps.RelativeToStart(Cosine()), 0.1)],
                         ids=repr)
def test_known_answer_quadratic_representation_matching(rule, step):
    """min ||A z - A x|| / ||A x|| over the box, from another point: the optimum is z = x (distance 0), the
    problem robustify solves through a linear representation. Fixed steps settle within about their own
    length of it, decaying and adaptive ones closer."""
    torch.manual_seed(0)
    a = torch.randn(16, 24, dtype=torch.float64) / 4
    x = torch.rand(8, 24, dtype=torch.float64) * 0.6 + 0.2
    start = torch.rand(8, 24, dtype=torch.float64)
    target = x @ a.T

    def distance(z, index):
        t = target if index is None else target[index]
        return (z @ a.T - t).norm(dim=1) / t.norm(dim=1), None

    res = optimize(distance, x, af.Box(), steps=300, step_size=step, maximize=False, start=start, rule=rule)
    before, after = distance(start, None)[0], distance(res.x, None)[0]
    assert (after < 0.02).all() and (after < before / 20).all(), after


def test_relative_to_start_scales_each_samples_step_by_its_distance_to_travel():
    x = torch.zeros(3, 4)
    start = torch.tensor([[1.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 0]])
    seen = []

    @dataclasses.dataclass(frozen=True, eq=False)
    class Spy(af.steps.StepRule):
        def step(self, z, grad, score, state, ctx):
            seen.append(ctx.step_size.flatten().tolist())
            return z

    optimize(lambda z, i: (-(z * z).sum(1), None), x, af.Box(lower=-5.0, upper=5.0), steps=2, step_size=0.5,
             start=start, rule=af.steps.RelativeToStart(Spy()))
    assert seen == [[0.5, 1.5, 0.0]] * 2  # fixed at the first step's distance; a sample starting at x stays


def test_apgd_halves_the_step_and_restarts_from_the_best_point_where_the_score_stalls():
    rule = APGDStep()
    threat = af.Box(lower=-100.0, upper=100.0)
    x = torch.zeros(2, 3)
    bounds = threat.bounds(x)
    state: dict[str, Tensor] = {}
    z = torch.zeros(2, 3)
    grad = torch.ones(2, 3)
    best_z = None
    for t in range(23):  # 100 steps: the first checkpoint is after step 22
        # sample 0 never improves after step 0; sample 1 improves every step
        score = torch.tensor([1.0 if t == 0 else 0.5, float(t)])
        if t == 0:
            best_z = z.clone()
        ctx = StepContext(t, 100, 1.0, x, threat, bounds)
        z = rule.step(z.clone(), grad.clone(), score, state, ctx)
        if t == 20:
            prev = z.clone()  # the input of step 21: APGD's momentum at step 22 is taken against it
    assert state["eta"].tolist() == [0.5, 1.0]  # halved where the score stalled only
    assert state["halved"].tolist() == [True, False]
    # sample 0 restarted from its best point (the start) and took a half step from there
    assert best_z is not None and torch.allclose(z[0], best_z[0] + 0.5 * grad[0] / math.sqrt(3) * 0.75
                                                 + 0.25 * (best_z[0] - prev[0]))


def test_a_wrapper_may_share_the_state_dict_with_the_rule_it_wraps():
    """A wrapper that keeps state of its own must not make the wrapped rule think its first step is past."""
    @dataclasses.dataclass(frozen=True, eq=False)
    class Counted(af.steps.StepRule):
        rule: af.steps.StepRule

        def step(self, z, grad, score, state, ctx):
            state["calls"] = state["calls"] + 1 if "calls" in state else torch.ones_like(score)
            return self.rule.step(z, grad, score, state, ctx)

    torch.manual_seed(0)
    w, x = torch.randn(5, 8), torch.full((5, 8), 0.5)
    for rule in (APGDStep(), Momentum(), af.steps.Adam(), Cosine(APGDStep())):
        bare = optimize(lambda z, i: ((z * w).sum(1), None), x, af.L2Ball(0.3), steps=12, step_size=0.1, rule=rule)
        wrapped = optimize(lambda z, i: ((z * w).sum(1), None), x, af.L2Ball(0.3), steps=12, step_size=0.1,
                           rule=Counted(rule))
        assert torch.equal(bare.x, wrapped.x), rule


def test_apgd_checkpoints_follow_the_reference_schedule():
    assert af.steps.apgd_checkpoints(100) == (22, 41, 57, 70, 80, 87, 93, 99)
    assert af.steps.apgd_checkpoints(10) == (2, 3, 4, 5, 6, 7, 8, 9)
    assert af.steps.apgd_checkpoints(1) == ()


def test_rules_are_immutable_comparable_printable():
    assert Momentum(0.5) == Momentum(0.5) and Momentum(0.5) != Momentum(0.6)
    assert hash(Cosine(af.steps.Adam())) == hash(Cosine(af.steps.Adam()))
    assert repr(Cosine(Constant(), final=0.1)) == "Cosine(rule=Constant(), final=0.1)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        Momentum().momentum = 0.1  # type: ignore[misc]


@pytest.mark.parametrize(("make", "err", "match"), [
    (lambda: Momentum(1.0), ValueError, r"momentum must be in \[0, 1\)"),
    (lambda: af.steps.Adam(beta2=1.5), ValueError, "beta2"),
    (lambda: af.steps.Adam(eps=0.0), ValueError, "eps"),
    (lambda: APGDStep(rho=-0.1), ValueError, "rho"),
    (lambda: Cosine(final=2.0), ValueError, "final"),
    (lambda: Cosine("adam"), TypeError, "rule must be an advfeat StepRule"),
    (lambda: af.L2PGD(0.5, rule="adam"), TypeError, "rule must be an advfeat StepRule"),
    (lambda: optimize(lambda z, i: (z.sum(1), None), torch.rand(2, 3), af.Box(), steps=1, step_size=0.1,
                      rule=Momentum), TypeError, "rule must be an advfeat StepRule"),
    (lambda: af.robustify(af.models.PlantedNet(), af.data.planted(4, 2).train, rule=0.1), TypeError, "rule must be"),
])
def test_bad_rules_are_refused_with_the_argument_named(make, err, match):
    with pytest.raises(err, match=match):
        make()


def test_a_rule_keeping_non_per_sample_state_is_told_so():
    @dataclasses.dataclass(frozen=True, eq=False)
    class Counting(af.steps.StepRule):
        def step(self, z, grad, score, state, ctx):
            state["count"] = torch.tensor(ctx.t)
            return z.add_(ctx.direction(grad).mul_(ctx.step_size))

    x = torch.rand(4, 3)
    with pytest.raises(TypeError, match=r"Counting keeps state\['count'\].*per-sample tensors"):
        optimize(lambda z, i: (z.sum(1), torch.arange(z.shape[0]) == 0), x, af.L2Ball(0.5), steps=3,
                 step_size=0.1, early_stop=True, rule=Counting())
