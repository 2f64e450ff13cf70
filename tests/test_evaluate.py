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
