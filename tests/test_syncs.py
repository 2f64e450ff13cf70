"""No host synchronisation inside a loop, counted on the CPU with the engine's accelerator schedule
forced on (early-stop checks at steps 1, 2, 4, 8, ... as on a GPU). A sync is any call that needs a tensor's value
on the host: ``item``, ``bool``, ``float``, ``int``, ``tolist``, ``nonzero`` / ``argwhere`` without a size,
``cpu``, ``numpy`` and printing. The trainer's checks of the loader's CPU copy of a batch (before it moves to the
device) cost no device sync and are not counted."""

from __future__ import annotations

import contextlib
import math
import traceback
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import advfeat as af
from advfeat import engine

SYNCS = ["item", "__bool__", "__float__", "__int__", "tolist", "nonzero", "argwhere", "cpu", "numpy", "__repr__",
         "__format__"]


@contextlib.contextmanager
def counting(monkeypatch):
    """Count the host syncs made inside the block, by call site (file:function)."""
    sites: Counter[str] = Counter()
    saved = {n: getattr(torch.Tensor, n) for n in SYNCS}

    def wrap(name, f):
        def counted(self, *args, **kwargs):
            if not (name in ("nonzero", "argwhere") and kwargs.get("size") is not None):
                frames = [fr for fr in traceback.extract_stack()[:-1] if "/advfeat/" in fr.filename]
                where = [f"{fr.filename.rsplit('/', 1)[-1]}:{fr.name}" for fr in frames[-2:]]
                if not (where and where[-1].startswith("_checks.py") and "trainer.py:batch_on_device" in where):
                    sites[" <- ".join(reversed(where)) or "outside advfeat"] += 1
            return f(self, *args, **kwargs)
        return counted

    with monkeypatch.context() as m:
        for n in SYNCS:
            m.setattr(torch.Tensor, n, wrap(n, saved[n]))
        m.setattr(engine, "_accelerated", lambda device: True)  # the accelerator schedule
        yield sites


def _model():
    torch.manual_seed(0)
    return af.models.PlantedNet().eval()


def _batch(n=64):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


ATTACKS = {
    "pgd": lambda s: af.L2PGD(0.5, steps=s),
    "pgd-early-stop": lambda s: af.L2PGD(0.5, steps=s).for_evaluation(True),
    "pgd-keep-best": lambda s: af.L2PGD(0.5, steps=s).for_evaluation(False),
    "fgsm": lambda s: af.FGSM(0.03),
    "apgd-ce": lambda s: af.APGD(0.5, norm="l2", steps=s),
    "apgd-dlr": lambda s: af.APGD(0.5, norm="l2", steps=s, loss=af.dlr),
    "apgd-t": lambda s: af.APGD(0.5, norm="l2", steps=s, n_target_classes=3),
    "restarts": lambda s: af.Restarts(af.L2PGD(0.5, steps=s, random_start=True), 3),
    "worst-of": lambda s: af.WorstOf(af.L2PGD(0.5, steps=s), af.LinfPGD(0.03, steps=s)),
    "fab-t": lambda s: af.FAB(0.5, norm="l2", steps=s, n_target_classes=3),
    "autoattack": lambda s: af.AutoAttack("l2", 0.5, steps=s, queries=4),  # Square's queries fixed: steps vary
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_an_attack_of_s_steps_syncs_at_most_log2_s_plus_a_constant(name, monkeypatch):
    """Measured before (S = 32, PlantedNet, batch 64): PGD 9 (8 from re-checking float bounds through tensors),
    with early stopping 14, restarts x3 17; after: 3, 8, 5."""
    model, (x, y) = _model(), _batch()
    counts = {}
    for s in (8, 64):
        with counting(monkeypatch) as sites:
            ATTACKS[name](s)(model, x, y)
        counts[s] = sum(sites.values())
    # gradient runs that each sync log2(S) times: APGD-T's targets; the cascade's APGD-CE and 9 APGD-T targets
    targets = {"apgd-t": 3, "autoattack": 10}.get(name, 1)
    # and a constant: the cascade adds one sync per part, per FAB-T target and per Square query (CPU schedule)
    constant = 6 + (4 + 9 + 4 if name == "autoattack" else 0)
    assert counts[64] <= targets * math.ceil(math.log2(64)) + constant, counts
    assert counts[64] - counts[8] <= targets * (math.log2(64) - math.log2(8)), counts  # log2 growth at most


def test_evaluate_syncs_a_constant_per_batch_plus_log2_steps(monkeypatch):
    model, (x, y) = _model(), _batch(128)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    counts = {}
    for s in (8, 64):
        with counting(monkeypatch) as sites:
            af.evaluate(model, loader, {"a": af.L2PGD(0.5, steps=s)}, progress=False)
        counts[s] = sum(sites.values())
    assert counts[64] - counts[8] <= 4 * 3, counts  # 4 batches, log2(64) - log2(8) check steps each


@pytest.mark.parametrize("method", ["standard", "pgd", "fgsm-rs", "free", "trades", "mart"])
def test_a_training_step_makes_no_host_sync(method, monkeypatch):
    """Measured before (4 batches of 16, PGD-4): standard 13, pgd 64, fgsm-rs 65, free 91, trades 40, mart 64
    (the loss's finiteness every step, the attack's checks of its batch and labels); after: the same constant per
    epoch for every method and any number of batches."""
    x, y = _batch(128)
    counts = {}
    for n_batches in (4, 8):
        loader = DataLoader(TensorDataset(x[: 16 * n_batches], y[: 16 * n_batches]), batch_size=16)
        with counting(monkeypatch) as sites:
            af.adversarial_train(af.models.PlantedNet(), loader, method=method,
                                 attack=None if method == "standard" else af.L2PGD(0.5, steps=4), epochs=1,
                                 progress=False, schedule="constant")
        counts[n_batches] = dict(sites)
    assert sum(counts[8].values()) == sum(counts[4].values()), counts  # per epoch, not per step
    assert sum(counts[8].values()) <= 12, counts  # FGSM-RS adds its guard's attack once per epoch


@pytest.mark.parametrize("build", ["robustify", "nonrobustify"])
def test_a_construction_batch_syncs_a_constant_whatever_its_steps(build, monkeypatch):
    model, (x, y) = _model(), _batch(64)
    data = TensorDataset(x, y)
    counts = {}
    for steps in (4, 32):
        with counting(monkeypatch) as sites:
            getattr(af, build)(model, data, steps=steps, batch_size=32, progress=False)
        counts[steps] = sum(sites.values())
    assert counts[32] == counts[4], counts
