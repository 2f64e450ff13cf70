"""advfeat.allocator.tune: glibc keeps freed memory, so repeated passes stop faulting pages in; same results."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

import advfeat as af

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="advfeat.allocator.tune acts on glibc's malloc only")

PROBE = """
import json, resource, sys, torch, advfeat as af
tuned = af.allocator.tune() if sys.argv[1] == "tuned" else None
torch.manual_seed(0)
torch.set_num_threads(1)
model = af.models.SmallCNN().eval()
x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
attack = af.L2PGD(1.0, steps=3)
attack(model, x, y)  # warm up (twice: the heap grows to its peak)
attack(model, x, y)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x_adv = attack(model, x, y)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tuned": tuned, "faults": faults, "sum": float(x_adv.double().sum())}))
"""


def _probe(mode: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@glibc
def test_tune_stops_page_faults_and_changes_no_result() -> None:
    default, tuned = _probe("default"), _probe("tuned")
    assert tuned["tuned"] is True
    assert isinstance(default["faults"], int) and isinstance(tuned["faults"], int)
    assert default["faults"] > 1000  # glibc as it is: the activations are faulted in again every pass
    assert tuned["faults"] < default["faults"] / 10
    assert tuned["sum"] == default["sum"]  # bit for bit the same attack


@glibc
def test_tune_can_be_called_again() -> None:
    assert af.allocator.tune() is True  # conftest has called it already; glibc takes the settings again
