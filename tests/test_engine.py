"""The engine: known answers, best-iterate bookkeeping, early stopping, per-sample parameters."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import advfeat as af
from advfeat.engine import optimize


def linear(w: Tensor):
    return lambda z, index: ((z * w).flatten(1).sum(1), None)


@pytest.mark.parametrize("maximize", [True, False])
def test_known_answer_linear_l2_and_linf(maximize):
    """For f(x) = <w, x> the best L2 move is eps w / ||w|| and the best Linf move is eps sign(w)."""
    torch.manual_seed(0)
    w = torch.randn(4, 10, dtype=torch.float64)
    x = torch.full((4, 10), 0.5, dtype=torch.float64)
    eps = 0.05  # small enough that the box never binds
    sign = 1 if maximize else -1
    r2 = optimize(linear(w), x, af.L2Ball(eps), steps=10, step_size=0.02, maximize=maximize)
    assert torch.allclose(r2.x - x, sign * eps * w / w.norm(dim=1, keepdim=True), atol=1e-10)
    rinf = optimize(linear(w), x, af.LinfBall(eps), steps=3, step_size=0.03, maximize=maximize)
    assert torch.allclose(rinf.x - x, sign * eps * w.sign(), atol=1e-10)


def test_keep_best_returns_best_iterate_including_start():
    """Ascending -||z - c||^2 with an overshooting step: the start is the best point seen."""
    x = torch.zeros(3, 2, dtype=torch.float64)
    c = torch.tensor([[0.01, 0.0]] * 3, dtype=torch.float64)

    def objective(z, index):
        return -((z - c) ** 2).sum(1), None

    res = optimize(objective, x, af.Box(lower=-5.0, upper=5.0), steps=3, step_size=1.0, keep_best=True)
    assert torch.equal(res.x, x)
    assert res.loss is not None and torch.allclose(res.loss, torch.full((3,), -1e-4, dtype=torch.float64))
    last = optimize(objective, x, af.Box(lower=-5.0, upper=5.0), steps=3, step_size=1.0)
    assert not torch.equal(last.x, x)


def test_keep_best_prefers_success_then_loss():
    x = torch.zeros(2, 1)

    def objective(z, index):  # loss grows with z; success only while z < 0.25
        v = z.flatten()
        return v, v < 0.25

    res = optimize(objective, x, af.Box(lower=0.0, upper=1.0), steps=3, step_size=0.2, keep_best=True)
    assert torch.allclose(res.x, torch.full((2, 1), 0.2))  # the highest loss among successful iterates
    assert res.success is not None and res.success.all()


@pytest.mark.parametrize("schedule", ["cpu", "accelerator"])
def test_early_stop_freezes_finished_samples_and_matches_full_run(schedule, monkeypatch):
    if schedule == "accelerator":  # the power-of-two compaction schedule used off CPU
        monkeypatch.setattr(af.engine, "_accelerated", lambda device: True)
    torch.manual_seed(0)
    n = 40
    w = torch.randn(n, 6)
    x = torch.rand(n, 6) * 0.2 + 0.4
    threshold = torch.rand(n) * 0.3  # sample i succeeds once <w_i, z - x> exceeds its own threshold
    seen: list[int] = []

    def objective(z, index):
        wi = w if index is None else w[index]
        ti = threshold if index is None else threshold[index]
        xi = x if index is None else x[index]
        seen.append(z.shape[0])
        gain = ((z - xi) * wi).sum(1)
        return gain, gain > ti

    kw = dict(steps=16, step_size=0.05, maximize=True)
    full = optimize(objective, x, af.L2Ball(0.4), keep_best=True, **kw)
    sizes_full = list(seen)
    seen.clear()
    early = optimize(objective, x, af.L2Ball(0.4), early_stop=True, **kw)
    gain_early = ((early.x - x) * w).sum(1)
    assert full.success is not None
    assert torch.equal(gain_early > threshold, full.success)  # same samples broken
    assert sum(seen) < sum(sizes_full)  # and less work
    assert seen[0] == n and seen[-1] < n
    assert ((early.x - x).norm(dim=1) <= 0.4 + 1e-6).all()
    # a finished sample is frozen at its first successful iterate: one step past the threshold at most
    ok = gain_early > threshold
    assert (gain_early[ok] <= threshold[ok] + 0.05 * w[ok].norm(dim=1) + 1e-5).all()


def test_early_stop_all_done_returns_full_batch():
    x = torch.rand(5, 3)
    res = optimize(lambda z, i: (z.sum(1), torch.ones(z.shape[0], dtype=torch.bool)), x, af.L2Ball(0.1),
                   steps=8, step_size=0.05, early_stop=True)
    assert res.x.shape == x.shape and torch.allclose(res.x, x)


def test_per_sample_eps_and_step_size():
    w = torch.ones(3, 4, dtype=torch.float64)
    x = torch.full((3, 4), 0.5, dtype=torch.float64)
    eps = torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64)
    res = optimize(linear(w), x, af.L2Ball(eps), steps=5, step_size=eps / 2)
    assert torch.allclose((res.x - x).norm(dim=1), eps)


def test_start_is_projected_and_used():
    x = torch.full((2, 3), 0.5)
    start = torch.full((2, 3), 3.0)
    res = optimize(lambda z, i: (z.sum(1) * 0, None), x, af.L2Ball(0.1), steps=1, step_size=0.01, start=start)
    d = res.x - x
    assert torch.allclose(d.norm(dim=1), torch.full((2,), 0.1)) and (d > 0).all()


def test_working_precision_is_float32_for_half_inputs():
    seen = []
    x = torch.rand(2, 3).to(torch.bfloat16)

    def objective(z, index):
        seen.append(z.dtype)
        return z.float().sum(1), None

    res = optimize(objective, x, af.L2Ball(0.1), steps=2, step_size=0.05)
    assert seen == [torch.bfloat16, torch.bfloat16] and res.x.dtype == torch.float32


@given(n=st.integers(1, 70), finish=st.data())
def test_accelerator_compaction_uses_powers_of_two_and_changes_no_result(n, finish):
    """Whatever step each sample finishes at, the accelerator schedule hands the objective only N or powers of
    two (at most log2(N) + 2 sizes), and every sample's result is the CPU schedule's (exact compaction)."""
    steps = 20
    at = torch.tensor(finish.draw(st.lists(st.integers(1, steps + 2), min_size=n, max_size=n)))  # > steps: never
    x = torch.rand(n, 3, generator=torch.Generator().manual_seed(n))
    w = torch.randn(n, 3, generator=torch.Generator().manual_seed(n + 1))

    def run(accelerated: bool) -> tuple[Tensor, set[int]]:
        sizes: set[int] = set()
        count = torch.zeros(n, dtype=torch.long)

        def objective(z: Tensor, index: Tensor | None) -> tuple[Tensor, Tensor]:
            i = torch.arange(n) if index is None else index
            sizes.add(z.shape[0])
            count[i] += 1  # calls seen by each sample: it succeeds at its own call number
            return ((z - x[i]) * w[i]).sum(1), count[i] >= at[i]

        original = af.engine._accelerated
        af.engine._accelerated = lambda device: accelerated
        try:
            return optimize(objective, x, af.L2Ball(0.5), steps=steps, step_size=0.05, early_stop=True).x, sizes
        finally:
            af.engine._accelerated = original

    exact, _ = run(False)
    bucketed, sizes = run(True)
    assert sizes <= {n} | {2**k for k in range(7)}, sizes
    assert len(sizes) <= math.log2(n) + 2, sizes
    assert torch.allclose(bucketed, exact, atol=1e-6)
