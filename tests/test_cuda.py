"""Every public path on CUDA (marked ``cuda``; skipped without a GPU). ``benchmarks/gpu_check.py`` runs them.

Each compares the GPU's result with the CPU's from the same start (attacks, evaluate), or checks that a crashed
run resumes to the same bits on the same device (constructors, the trainer with AMP). ``ADVFEAT_CUDA_TESTS_ON=cpu``
runs the same code with the CPU as the "device", which checks the tests themselves where no GPU is lent."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import advfeat as af

ON = os.environ.get("ADVFEAT_CUDA_TESTS_ON")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(ON is None and not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def dev() -> torch.device:
    return torch.device(ON or "cuda")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(af.Normalize([0.5], [0.25]), af.models.SmallCNN(size=16)).eval()


def _batch(n: int = 32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


ATTACKS = {
    "l2pgd": af.L2PGD(0.5, steps=5),
    "linfpgd": af.LinfPGD(0.03, steps=5),
    "fgsm": af.FGSM(0.03),
    "apgd-ce": af.APGD(0.5, norm="l2", steps=5, random_start=False),  # CPU and CUDA generators differ: no draws
    "apgd-dlr": af.APGD(0.03, steps=5, loss=af.dlr, random_start=False),
    "apgd-t": af.APGD(0.5, norm="l2", steps=5, n_target_classes=3, random_start=False),
    "apgd-t-batched": af.APGD(0.5, norm="l2", steps=5, n_target_classes=3, random_start=False, batched=True),
    "restarts": af.Restarts(af.L2PGD(0.5, steps=5), 2),
    "restarts-batched": af.Restarts(af.L2PGD(0.5, steps=5), 2, batched=True),
    "worst-of": af.WorstOf(af.L2PGD(0.5, steps=5), af.LinfPGD(0.03, steps=5)),
    "fab-t": af.FAB(0.5, norm="l2", steps=5, n_target_classes=3),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_each_attack_on_the_device_equals_the_cpu(name, dev):
    model, (x, y) = _model(), _batch()
    cpu = ATTACKS[name](model, x, y)
    out = ATTACKS[name](model.to(dev), x.to(dev), y.to(dev))
    assert out.device.type == dev.type and out.dtype == x.dtype
    assert torch.allclose(out.cpu(), cpu, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attacks_under_autocast_stay_in_the_ball(dtype, dev):
    model, (x, y) = _model().to(dev), _batch()
    x, y = x.to(dev), y.to(dev)
    with torch.autocast(dev.type, dtype=dtype):
        for attack in (af.L2PGD(0.5, steps=5, random_start=True, seed=0), af.APGD(0.5, norm="l2", steps=5)):
            out = attack(model, x, y)
            assert out.dtype == torch.float32 and torch.isfinite(out).all()
            assert (out - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-4


def test_evaluate_on_the_device_equals_the_cpu(dev):
    model, (x, y) = _model(), _batch(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    cpu = af.evaluate(model, loader, {"l2": af.L2PGD(0.5, steps=5)}, progress=False)
    gpu = af.evaluate(model.to(dev), loader, {"l2": af.L2PGD(0.5, steps=5)}, device=dev, progress=False)
    assert gpu.total == cpu.total and abs(gpu.clean_correct - cpu.clean_correct) <= 1
    assert abs(gpu.robust_correct["l2"] - cpu.robust_correct["l2"]) <= 1


def _digest(ds: af.ConstructedDataset) -> str:
    x, y = ds.tensors()
    return hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("build", ["robustify", "nonrobustify"])
def test_constructors_on_the_device_resume_to_the_same_bits(build, dev, tmp_path):
    model, (x, y) = _model().to(dev), _batch(48)
    data = TensorDataset(x, y)
    fn = getattr(af, build)
    whole = fn(model, data, steps=3, shard_size=16, out=tmp_path / "whole", device=dev, progress=False)
    fn(model, data, steps=3, shard_size=16, out=tmp_path / "part", device=dev, progress=False)
    (tmp_path / "part" / "shard-00001.json").unlink()  # as if killed while writing the second shard
    resumed = fn(model, data, steps=3, shard_size=16, out=tmp_path / "part", device=dev, progress=False)
    assert _digest(resumed) == _digest(whole)
    cpu = fn(_model(), data, steps=3, shard_size=16, progress=False)
    assert torch.allclose(cpu.tensors()[0], whole.tensors()[0], atol=1e-3)


class _StopAt:
    """A loader that raises KeyboardInterrupt at its ``at``-th batch (counted over epochs): a crash by progress."""

    def __init__(self, loader: DataLoader, at: int | None) -> None:
        self.loader, self.at, self.seen = loader, at, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.seen += 1
            if self.at is not None and self.seen == self.at:
                raise KeyboardInterrupt
            yield batch

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def generator(self):
        return self.loader.generator


@pytest.mark.parametrize("method", ["standard", "pgd", "fgsm-rs", "free", "trades", "mart"])
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_the_trainer_with_amp_resumes_bitwise_on_the_device(method, amp, dev, tmp_path):
    if amp == "fp16" and dev.type == "cpu":
        pytest.skip("fp16 autocast is a CUDA path")
    x, y = _batch(64)
    data = TensorDataset(x, y)

    def train(ck, at):
        torch.manual_seed(0)
        model = _model().to(dev).train()
        loader = _StopAt(DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)),
                         at)
        af.adversarial_train(model, loader, method=method, attack=None if method == "standard" else
                             af.L2PGD(0.5, steps=2), epochs=2, amp=amp, device=dev, checkpoint=ck, resume=True,
                             progress=False)
        return model

    whole = train(tmp_path / "whole.pt", None)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "part.pt", 6)  # in the second epoch
    resumed = train(tmp_path / "part.pt", None)
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_ddp_with_nccl_at_world_size_one(dev, monkeypatch, tmp_path):
    if dev.type != "cuda":
        pytest.skip("NCCL needs CUDA")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29533")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    torch.distributed.init_process_group("nccl")
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model().to(dev).train(), device_ids=[dev.index or 0])
        x, y = _batch(64)
        history = af.adversarial_train(model, DataLoader(TensorDataset(x, y), batch_size=16), method="pgd",
                                       attack=af.L2PGD(0.5, steps=2), epochs=1, device=dev,
                                       checkpoint=tmp_path / "ck.pt", progress=False)
        assert len(history) == 1
        d = af.nonrobustify(model.module, TensorDataset(x, y), steps=2, out=tmp_path / "d", device=dev,
                            progress=False)
        assert len(d) == 64
    finally:
        torch.distributed.destroy_process_group()
