"""benchmarks/gpu_check.py runs end to end on the CPU at tiny sizes, so the GPU run cannot fail on a typo."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_on_the_cpu_at_tiny_sizes(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path), "--device", "cpu", "--tiny"]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["cuda tests"] == {"note": "skipped: not a CUDA device"}
    attacks = [r for r in result["attacks"] if "ours_ratio" in r]
    assert {r["model"] for r in attacks} == {"SmallCNN", "SmallResNet", "ResNet-18"}
    assert all(r["ours_ratio"] > 0 and r["floor_ms"] > 0 for r in attacks)
    assert [r["attack"] for r in result["batched"]] == ["Restarts(L2PGD, 5)", "APGD-T, 9 targets"]
    assert all(r["batched_over_sequential"] > 0 for r in result["batched"])
    assert {(r["construction"]) for r in result["constructors"]} == {"robustify", "nonrobustify"}
    assert [r["method"] for r in result["trainer"]] == ["standard", "pgd", "fgsm-rs", "free", "trades", "mart"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("## GPU check:") and "| model | batch | precision | mode |" in md
