"""Threat models: projection into ball and box, random init, step directions, validation, equality."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

import advfeat as af
from advfeat.threat import ball

shapes = st.sampled_from([(5, 7), (3, 1, 4, 4), (4, 3, 5, 6), (1, 12), (6, 2, 3, 3)])
norms = st.sampled_from(["l2", "linf"])


def norm_of(d: torch.Tensor, norm: str) -> torch.Tensor:
    d = d.flatten(1)
    return d.norm(dim=1) if norm == "l2" else d.abs().amax(dim=1)


@given(shape=shapes, norm=norms, eps=st.floats(0.0, 3.0), per_sample=st.booleans(), seed=st.integers(0, 10**6))
def test_projection_lands_in_ball_and_box(shape, norm, eps, per_sample, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    e = torch.rand(shape[0], generator=g) * eps if per_sample else eps
    threat = ball(norm, e)
    b = threat.bounds(x)
    z = x + 3 * torch.randn(shape, generator=g)
    threat.project_(z, x, b)
    limit = e if per_sample else torch.full((shape[0],), eps)
    assert (norm_of(z - x, norm) <= limit * (1 + 1e-5) + 1e-6).all()
    assert z.min() >= 0 and z.max() <= 1


@given(shape=shapes, seed=st.integers(0, 10**6))
def test_per_channel_box(shape, seed):
    if len(shape) != 4:
        return
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(shape[1], 1, 1, generator=g) * 0.4
    hi = lo + 0.2
    x = lo + (hi - lo) * torch.rand(shape, generator=g)
    threat = af.L2Ball(0.3, lower=lo, upper=hi)
    z = x + torch.randn(shape, generator=g)
    threat.project_(z, x, threat.bounds(x))
    assert (z >= lo).all() and (z <= hi).all()


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_l2_random_init_uniform_in_ball_by_volume(d):
    """In a ball of dimension d, P(radius <= r) = (r / eps)^d: so (radius / eps)^d is uniform on [0, 1]."""
    n, eps = 20000, 0.5
    threat = af.L2Ball(eps, lower=-10.0, upper=10.0)
    x = torch.zeros(n, d, dtype=torch.float64)
    z = threat.init(x, threat.bounds(x), torch.Generator().manual_seed(0))
    u = ((z - x).norm(dim=1) / eps) ** d
    assert u.max() <= 1 + 1e-9
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):  # the empirical CDF of u at q is q (4 sigma: 0.014)
        assert abs((u <= q).double().mean().item() - q) < 0.015
    if d >= 2:  # directions are isotropic: the mean direction is near 0
        assert (z / z.norm(dim=1, keepdim=True)).mean(0).norm() < 0.05


def test_linf_and_box_random_init():
    x = torch.full((4000, 3), 0.5)
    z = af.LinfBall(0.1).init(x, af.LinfBall(0.1).bounds(x), torch.Generator().manual_seed(0))
    d = z - x
    assert d.abs().max() <= 0.1 + 1e-6 and abs(d.mean()) < 0.005 and d.std() > 0.05
    box = af.Box(lower=-1.0, upper=3.0)
    z = box.init(x, box.bounds(x), torch.Generator().manual_seed(0))
    assert z.min() >= -1 and z.max() <= 3 and abs(z.mean() - 1.0) < 0.05


def test_directions():
    g = torch.randn(6, 2, 3, 3)
    d2 = af.L2Ball(1.0).direction(g.clone())
    assert torch.allclose(d2.flatten(1).norm(dim=1), torch.ones(6))
    assert torch.equal(af.LinfBall(1.0).direction(g.clone()), g.sign())
    assert torch.allclose(af.Box().direction(g.clone()), d2)
    zero = af.L2Ball(1.0).direction(torch.zeros(2, 3))  # a zero gradient stays zero, no NaN
    assert torch.equal(zero, torch.zeros(2, 3))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), torch.tensor([0.1, -1.0]), torch.tensor([float("nan")])])
def test_bad_eps(bad):
    with pytest.raises(ValueError, match="eps"):
        af.L2Ball(bad)
    with pytest.raises(ValueError, match="eps"):
        af.L2PGD(bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm"):
        ball("l1", 0.5)
    with pytest.raises(ValueError, match="norm"):
        af.FGSM(0.1, norm="l0")
    with pytest.raises(ValueError, match="lower"):
        af.Box(lower=1.0, upper=0.0)
    with pytest.raises(TypeError, match="eps"):
        af.L2Ball("0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        af.L2Ball(torch.ones(3)).bounds(torch.rand(4, 2))
    with pytest.raises(ValueError, match="lower"):
        af.L2Ball(0.1, lower=torch.zeros(3)).bounds(torch.rand(4, 2))


def test_infinite_eps_is_box_only():
    x = torch.rand(3, 5)
    z = x + 10 * torch.randn(3, 5)
    af.L2Ball(math.inf).project_(z, x, af.L2Ball(math.inf).bounds(x))
    assert z.min() >= 0 and z.max() <= 1


def test_equality_hash_and_repr():
    assert af.L2Ball(0.5) == af.L2Ball(0.5) and af.L2Ball(0.5) != af.LinfBall(0.5)
    assert hash(af.L2Ball(torch.ones(3))) == hash(af.L2Ball(torch.ones(3)))
    assert af.L2Ball(torch.ones(3)) != af.L2Ball(torch.zeros(3))
    assert repr(af.L2Ball(0.5)) == "L2Ball(0.5)"
    assert repr(af.Box(lower=-1.0, upper=1.0)) == "Box(lower=-1, upper=1)"
    e = torch.ones(2)
    t = af.L2Ball(e)
    e.fill_(5.0)  # the threat model keeps its own copy
    assert torch.equal(t.eps, torch.ones(2))
