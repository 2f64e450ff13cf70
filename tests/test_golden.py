"""Behaviour kept bit for bit: what the library computes on planted data against ``tests/golden/golden.json``.

See ``tests/golden_outputs.py`` for what is recorded and how to record it anew. On the platform that recorded the
file (the whole signature: CPU vendor and model, library versions, threads) every hash and number must be equal;
elsewhere tensors agree within a relative 1e-3 and numbers within 5 points. The replication's part is compared only
when the suite's run is the recorded one (seed 0, one thread).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import REPLICATION_THREADS, SEED
from golden_outputs import GOLDEN, RECORDED_RUN, compute, signature

TOLERANT = 0.05
"""Off the recording platform: numbers within 5 points (64 test samples: a sample is 1.6 points)."""
PLATFORM_BOUND = {"sha256", "shards", "datasets", "model", "data", "teacher", "keep_correct", "rows"}
"""What is compared only on the recording platform: hashes, fingerprints (of trained models: ``keep_correct``), and
the replication's rows (the suite asserts its claims on those in test_replicate.py)."""


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def now(planted_run: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return compute(tmp_path_factory.mktemp("golden"), planted_run[0])


def _differences(want: Any, got: Any, exact: bool, where: str = "") -> list[str]:
    """Where ``got`` differs from ``want``: exactly, or (``exact=False``) tensors by their sums and numbers as
    accuracies, hashes left out."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{where}: {got!r} is not a mapping"]
        out = [f"{where}/{k}: missing" for k in want if k not in got]
        out += [f"{where}/{k}: unexpected" for k in got if k not in want]
        if not exact and {"sha256", "sum", "abs_sum"} <= set(want):
            return out + [f"{where}/{k}: {got[k]} != {want[k]}" for k in ("sum", "abs_sum")
                          if not math.isclose(got[k], want[k], rel_tol=1e-3, abs_tol=1e-3)]
        for k in want:
            if k in got and (exact or k not in PLATFORM_BOUND):
                out += _differences(want[k], got[k], exact, f"{where}/{k}")
        return out
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{where}: {got!r} != {want!r}"]
        return [d for i, (a, b) in enumerate(zip(want, got, strict=True)) for d in _differences(a, b, exact,
                                                                                            f"{where}[{i}]")]
    if not exact and isinstance(want, float) and isinstance(got, float):
        return [] if abs(want - got) <= TOLERANT * max(1.0, abs(want)) else [f"{where}: {got} != {want}"]
    return [] if want == got else [f"{where}: {got!r} != {want!r}"]


def bitwise(recorded: dict[str, str], here: dict[str, str]) -> bool:
    """Whether the outputs here must equal the recorded ones bit for bit: every key of the signature the same."""
    return recorded == here


@pytest.mark.parametrize("part", ["model", "attacks", "evaluate", "training", "constructions", "replicate"])
def test_outputs_are_the_recorded_ones(golden, now, part):
    if part == "replicate" and {"seed": SEED, "threads": REPLICATION_THREADS} != RECORDED_RUN:
        pytest.skip(f"the golden holds the replication at seed {RECORDED_RUN['seed']}, "
                    f"{RECORDED_RUN['threads']} thread; this suite's is another draw (seed {SEED}, "
                    f"{REPLICATION_THREADS} threads)")
    exact = bitwise(golden["signature"], signature())
    diff = _differences(golden[part], now[part], exact, part)
    assert not diff, ("bitwise" if exact else "tolerant") + " differences:\n" + "\n".join(diff[:20])
    if exact:  # the tolerant comparison is what another machine runs: it must pass wherever the bitwise one does
        assert not _differences(golden[part], now[part], False, part)


@pytest.mark.parametrize("key", ["cpu", "cpu_capability", "machine", "numpy", "python", "torch", "threads"])
def test_another_platform_compares_tolerantly(golden, key):
    """A signature that differs in any one key (another CPU of the same capability included) falls back to the
    tolerant comparison, which passes a rounding-level change and fails a real one; a signature recorded without a
    key (an older golden file) is another platform too."""
    here = signature()
    assert set(here) == set(golden["signature"])  # recorded with the whole signature
    assert not bitwise({**here, key: here[key] + " (another)"}, here)
    assert not bitwise({k: v for k, v in here.items() if k != key}, here)
    nudged = json.loads(json.dumps(golden["attacks"]))
    for record in nudged.values():  # another CPU's rounding: every tensor's bytes differ, its sums barely
        record["sha256"], record["sum"], record["abs_sum"] = "f" * 64, record["sum"] * (1 + 1e-7), record["abs_sum"]
    assert _differences(golden["attacks"], nudged, exact=True)
    assert not _differences(golden["attacks"], nudged, exact=False)


def test_the_comparison_fails_on_a_changed_bit(golden):
    """The check itself: one flipped hash, or a sum off by more than the tolerance, is reported."""
    changed = json.loads(json.dumps(golden["attacks"]))
    changed["l2pgd"]["sha256"] = "0" * 64
    assert _differences(golden["attacks"], changed, exact=True) == [f"/l2pgd/sha256: {'0' * 64!r} != "
                                                                   f"{golden['attacks']['l2pgd']['sha256']!r}"]
    changed["l2pgd"]["sum"] *= 1.01
    assert len(_differences(golden["attacks"], changed, exact=False)) == 1
