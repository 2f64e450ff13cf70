"""End to end: the default ``advfeat replicate`` on planted data shows the paper's pattern; reruns skip stages."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from advfeat.cli import main
from advfeat.replicate import ROWS


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("replication")
    assert main(["replicate", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_the_table_shows_the_papers_pattern(run):
    _, res = run
    r = {k: (v["clean"], v["robust"]["0.5"]) for k, v in res["rows"].items()}
    # measured (seed 0): standard 100.0/0.0, robust 83.7/62.5, D_R 83.0/57.4, D_NR 99.6/0.0,
    # D_rand 99.8, D_det 39.0, control 99.6/0.4 (clean / L2 eps 0.5, %)
    assert r["standard"][0] > 0.95 and r["standard"][1] < 0.1  # accurate, not robust
    assert r["robust"][0] > 0.7 and r["robust"][1] > 0.5  # robust
    assert r["d_r"][0] > 0.7 and r["d_r"][1] > r["standard"][1] + 0.3  # D_R gives robustness ...
    assert r["d_r"][1] > r["control"][1] + 0.3  # ... that a same-size real set does not
    assert r["d_nr"][0] > 0.8 and r["d_nr"][1] < 0.1  # D_NR: accurate, not robust
    assert r["d_rand"][0] > 0.5  # "mislabelled" images generalise to the real test set
    assert r["d_det"][0] > 0.25  # chance is 0.10
    c = res["rows"]
    assert c["d_det"]["construction"]["targets_reached"] > 0.9
    assert c["d_r"]["construction"]["rel_distance_median"] < 0.1


def test_outputs_exist_and_the_report_agrees_with_the_json(run):
    out, res = run
    for name in ("D", "D_R", "D_NR", "D_DET"):
        assert (out / "grids" / f"{name}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    report = (out / "report.md").read_text()
    eps = [f"{e:g}" for e in res["settings"]["eval_eps"]]
    for key, label, _ in ROWS:
        line = next(ln for ln in report.splitlines() if ln.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        row = res["rows"][key]
        assert float(cells[2]) == pytest.approx(100 * row["clean"], abs=0.05)
        for i, e in enumerate(eps):
            assert float(cells[3 + i]) == pytest.approx(100 * row["robust"][e], abs=0.05)
    assert re.search(r"\| d_det \| 5000 \| targets_reached \| ", report)


def test_a_rerun_skips_finished_stages(run, capsys):
    out, res = run
    stamp = (out / "stages" / "standard.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["replicate", "--out", str(out), "--no-progress"]) == 0
    log = capsys.readouterr().out
    assert "running" not in log and log.count("skipped") == len(list((out / "stages").glob("*.json")))
    assert (out / "stages" / "standard.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    assert main(["replicate", "--dataset", "mnist", "--out", str(tmp_path / "o")]) == 2
    assert "--root is required for mnist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["replicate", "--scale", "huge"])
