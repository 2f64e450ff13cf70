"""advfeat.allocator.tune: glibc keeps freed memory, so repeated passes stop faulting pages in; same results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import advfeat as af

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="advfeat.allocator.tune acts on glibc's malloc only")

# The baseline is set explicitly, so that neither the environment nor the glibc version decides it: glibc's
# documented static defaults (mmap above 128 KiB, trim above 128 KiB, no top pad). Setting the mmap threshold
# also turns off glibc's dynamic threshold, which would otherwise depend on the allocation history.
PROBE = """
import ctypes, json, resource, sys, torch, advfeat as af
if sys.argv[1] == "tuned":
    tuned = af.allocator.tune()
else:
    mallopt = ctypes.CDLL(None).mallopt
    tuned = [mallopt(p, v) for p, v in ((-3, 128 * 1024), (-1, 128 * 1024), (-2, 0))] == [1, 1, 1] and None
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


def _clean_env() -> dict[str, str]:
    """The environment without what changes malloc: MALLOC_* variables, GLIBC_TUNABLES, a preloaded allocator."""
    return {k: v for k, v in os.environ.items()
            if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD"))}


def _huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def _probe(mode: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=_clean_env())
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@glibc
@pytest.mark.skipif(_huge_pages_always(), reason="transparent huge pages are 'always' on this kernel: large blocks "
                    "fault in 2 MiB at a time, so page faults no longer count what tune() changes")
def test_tune_stops_page_faults_and_changes_no_result() -> None:
    default, tuned = _probe("default"), _probe("tuned")
    assert tuned["tuned"] is True and default["tuned"] is None  # both settings taken
    assert isinstance(default["faults"], int) and isinstance(tuned["faults"], int)
    assert default["faults"] > 1000  # glibc as it is: the activations are faulted in again every pass
    assert tuned["faults"] < default["faults"] / 10
    assert tuned["sum"] == default["sum"]  # bit for bit the same attack


@glibc
def test_tune_can_be_called_again() -> None:
    assert af.allocator.tune() is True  # conftest has called it already; glibc takes the settings again
