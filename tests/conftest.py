"""Shared fixtures: a fixed hypothesis profile for CI and small models with every kind of state."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

import advfeat

settings.register_profile(  # the same examples on every machine: no clock, no seed, no saved examples
    "ci", deadline=None, max_examples=25, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HANG_GUARD_S = 600
"""How long a test waits for a subprocess before calling it hung. Not a speed assumption: the work it guards
takes seconds; the guard only turns a deadlock into a failure well inside CI's 90 minutes."""

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
"""How many pytest-xdist workers share the machine (pyproject's addopts: ``-n auto``, at most 4)."""
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS, torch.get_num_threads()))
torch.set_num_threads(THREADS)
if WORKERS > 1:  # the subprocesses the tests start (ranks, kernels, crash tests) share the cores the same way
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
advfeat.allocator.tune()  # faster on CPU, same results (see advfeat/allocator.py)



def _env_int(name: str, default: int, lo: int, hi: int) -> int:
    text = os.environ.get(name, str(default))
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise pytest.UsageError(f"{name} must be a whole number in [{lo}, {hi}], got {text!r}")
    return int(text)


SEED = _env_int("ADVFEAT_TEST_SEED", 0, 0, 2**63 - 1)
"""The seed of the suite's planted replication (the README's main job): another seed is another draw, and every
claim the suite makes of it holds on all of them (advfeat.replicate.claims)."""
REPLICATION_THREADS = _env_int("ADVFEAT_TEST_THREADS", 1, 1, 256)
"""The threads that replication runs at (1 or 2 in the published spread)."""


class FlatNet(nn.Module):
    """(N, D) -> (N, C): Linear-BatchNorm-ReLU-Dropout-Linear, first layer frozen."""

    def __init__(self, d: int, c: int = 4) -> None:
        super().__init__()
        self.frozen = nn.Linear(d, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(16, c)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.bn(self.frozen(x)))))


class ConvNet(nn.Module):
    """(N, C, H, W) -> (N, classes): Conv-BatchNorm-ReLU-Dropout-pool-Linear, first conv frozen."""

    def __init__(self, cin: int, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, c)
        self.conv.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.head(h.mean(dim=(2, 3)))


def make_model(shape: tuple[int, ...], classes: int = 4, dtype: torch.dtype = torch.float32,
               seed: int = 0) -> nn.Module:
    """A model for per-sample inputs of ``shape`` with non-trivial BatchNorm statistics, in train mode,
    whose trainable parameters already hold a ``.grad``."""
    torch.manual_seed(seed)
    model: nn.Module = FlatNet(shape[0], classes) if len(shape) == 1 else ConvNet(shape[0], classes)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        model(torch.rand(8, *shape))
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    return model.to(dtype)


def snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
    }


def same_state(a: dict[str, object], b: dict[str, object]) -> bool:
    if a["training"] != b["training"] or a["requires_grad"] != b["requires_grad"]:
        return False
    for key in ("params", "buffers", "grads"):
        for u, v in zip(a[key], b[key], strict=True):  # type: ignore[call-overload]
            if (u is None) != (v is None) or (u is not None and not torch.equal(u, v)):
                return False
    return True


def bf16_supported() -> bool:
    try:
        m = make_model((3, 4, 4), dtype=torch.bfloat16).eval()
        x = torch.rand(2, 3, 4, 4, dtype=torch.bfloat16, requires_grad=True)
        torch.autograd.grad(m(x).float().sum(), x)
        return True
    except RuntimeError:
        return False


FIRST_FILE = "test_replicate.py"
"""The file that goes first under pytest-xdist: the longest (the replication run and most of what reads it). The
other file that reads the run, test_golden.py, comes later in file order, when the run is done."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest file first, the rest in file order (pyproject's ``--dist loadfile`` keeps each file on one
    worker, so its module fixtures are built once)."""
    items.sort(key=lambda item: item.path.name != FIRST_FILE)  # stable


@pytest.fixture(scope="session")
def planted_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    """The README's main job (``advfeat replicate`` on planted data) at seed ``SEED`` and ``REPLICATION_THREADS``
    threads (default: seed 0, one thread), run once for the session under umask 022: the end-to-end tests and the
    golden outputs read it. Under pytest-xdist the workers
    share one run: the first to need it makes it, in the session's shared temporary folder, and the others wait
    for it on a file lock."""
    import json

    from filelock import FileLock
    from golden_outputs import run_replicate

    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent  # the folder above every worker's own
    out = shared / "replication"
    with FileLock(shared / "replication.lock"):
        if not (out / "results.json").exists():
            old = os.umask(0o022)
            try:
                run_replicate(out, SEED, REPLICATION_THREADS)
            finally:
                os.umask(old)
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; none is available here")
    return torch.device("cuda")


@contextmanager
def reaped(*procs: subprocess.Popen[str]) -> Iterator[None]:
    """Kill whichever of ``procs`` still runs when the block ends: a failed assertion in a multi-process test
    must not leave a rank waiting for its peers forever."""
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def rendezvous(tmp_path: Path) -> Path:
    """A file for a gloo process group to meet at (``init_method=file://...``): no TCP port to pick, so no
    race with other processes for a free one."""
    return tmp_path / "rendezvous"
