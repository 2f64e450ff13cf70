"""Compiled models (torch.compile) through the attacks, the constructors and the trainer: the number of graphs
dynamo compiles stays bounded whatever the pattern in which early stopping drops samples (CPU, ``backend="eager"``:
the recompiles are dynamo's, the same under inductor or CUDA graphs)."""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader

import advfeat as af


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


@pytest.fixture
def fresh():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return af.models.SmallCNN().eval()


@pytest.mark.parametrize("schedule", ["cpu", "accelerator"])
def test_pgd_with_early_stopping_compiles_a_bounded_number_of_graphs(schedule, fresh, monkeypatch):
    """Several attacks, each stopping its samples in its own pattern: with ``dynamic=False`` (a graph per shape,
    as CUDA graphs record one per shape) the accelerator schedule's powers of two bound the graphs by
    log2(N) + 2; on the CPU schedule (exact sizes every step) dynamo's automatic dynamic shapes bound them."""
    n = 64
    if schedule == "accelerator":
        monkeypatch.setattr(af.engine, "_accelerated", lambda device: True)
    dynamic = False if schedule == "accelerator" else None
    model = torch.compile(_model(), backend="eager", dynamic=dynamic)
    x, y = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1)), torch.randint(0, 10, (n,))
    sizes: set[int] = set()
    hook = model.register_forward_pre_hook(lambda m, args: sizes.add(args[0].shape[0]))
    for eps in (0.3, 0.6, 1.0, 1.5, 2.5):
        adv = af.L2PGD(eps, steps=16, early_stop=True)(model, x, y)
        assert adv.shape == x.shape
    hook.remove()
    assert len(sizes) > 3, sizes  # early stopping did shrink the batch, in more than one pattern
    if schedule == "accelerator":
        assert sizes <= {n} | {2**k for k in range(7)}, sizes
        assert graphs() <= math.log2(n) + 2, graphs()
    else:
        assert graphs() <= 3, graphs()


def test_robustify_and_nonrobustify_run_a_compiled_model_with_a_fixed_number_of_graphs(fresh):
    """The graphs come from the calls' kinds (a 2-sample class probe, grad mode on and off, robustify's
    representation hook), never from the amount of work: more samples, batches and steps add none."""
    torch.manual_seed(0)
    model = torch.compile(af.models.PlantedNet(hidden=16).eval(), backend="eager")
    counts = []
    for n, steps in ((100, 3), (230, 12)):
        data = af.data.planted(n, 8, seed=n).train
        af.robustify(model, data, steps=steps, batch_size=32, progress=False)
        af.nonrobustify(model, data, eps=3.0, steps=steps, batch_size=32, progress=False)
        counts.append(graphs())
    assert counts[0] == counts[1] <= 6, counts


def test_robustify_through_a_compiled_model_is_robustify_through_the_model(fresh):
    """The penultimate hook on a compiled model: dynamo does not guard on hooks added after it compiled a graph,
    so the capture runs eagerly (``set_stance("force_eager")``); twice, with compiled calls between, it is still
    the eager result."""
    data = af.data.planted(40, 8, seed=0).train
    torch.manual_seed(0)
    eager = af.models.PlantedNet(hidden=16).eval()
    model = torch.compile(eager, backend="eager")
    ref = af.robustify(eager, data, steps=3, progress=False)
    for _ in range(2):
        got = af.robustify(model, data, steps=3, progress=False)
        af.nonrobustify(model, data, steps=2, progress=False)
        assert torch.equal(got.tensors()[0], ref.tensors()[0])
    probe = af.controls.leakage_probe(model, data, data, features="penultimate", epochs=2)
    assert probe == af.controls.leakage_probe(eager, data, data, features="penultimate", epochs=2)


@pytest.mark.parametrize("method", ["pgd", "fgsm-rs", "trades", "mart"])
def test_the_trainer_runs_a_compiled_model_with_a_fixed_number_of_graphs(method, fresh):
    torch.manual_seed(0)
    model = torch.compile(af.models.PlantedNet(hidden=16), backend="eager")
    counts = []
    for n, epochs in ((96, 1), (200, 3)):  # 200: a short last batch (8), also seen again every epoch
        data = af.data.planted(n, 8, seed=n).train
        af.adversarial_train(model, DataLoader(data, batch_size=32), method=method,
                             attack=af.L2PGD(0.5, steps=3), epochs=epochs, lr=0.05, progress=False)
        counts.append(graphs())
    assert counts[1] - counts[0] <= 2 and counts[1] <= 8, counts  # the short batch: at most a static-to-dynamic
