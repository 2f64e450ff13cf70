"""Behaviour kept bit for bit: what the library computes on planted data against ``tests/golden/golden.json``.

See ``tests/golden_outputs.py`` for what is recorded and how to record it anew. On the platform that recorded the
file every hash and number must be equal; elsewhere (another CPU or torch) tensors agree within a relative 1e-3 and
numbers within 5 points.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from golden_outputs import GOLDEN, compute, signature

TOLERANT = 0.05
"""Off the recording platform: numbers within 5 points (64 test samples: a sample is 1.6 points)."""
PLATFORM_BOUND = {"sha256", "shards", "datasets", "model", "data", "teacher", "rows"}
"""What is compared only on the recording platform: hashes, fingerprints, and the replication's rows (the suite
checks those against the published table, within its own tolerances, in test_replicate.py)."""


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


@pytest.mark.parametrize("part", ["model", "attacks", "evaluate", "training", "constructions", "replicate"])
def test_outputs_are_the_recorded_ones(golden, now, part):
    exact = golden["signature"] == signature()
    diff = _differences(golden[part], now[part], exact, part)
    assert not diff, ("bitwise" if exact else "tolerant") + " differences:\n" + "\n".join(diff[:20])


def test_the_comparison_fails_on_a_changed_bit(golden):
    """The check itself: one flipped hash, or a sum off by more than the tolerance, is reported."""
    changed = json.loads(json.dumps(golden["attacks"]))
    changed["l2pgd"]["sha256"] = "0" * 64
    assert _differences(golden["attacks"], changed, exact=True) == [f"/l2pgd/sha256: {'0' * 64!r} != "
                                                                   f"{golden['attacks']['l2pgd']['sha256']!r}"]
    changed["l2pgd"]["sum"] *= 1.01
    assert len(_differences(golden["attacks"], changed, exact=False)) == 1
