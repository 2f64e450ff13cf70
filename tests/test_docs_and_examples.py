"""Every Python code block in README.md and docs/ runs, and every example runs in its small mode."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def blocks():
    for doc in DOCS:
        for i, code in enumerate(BLOCK.findall(doc.read_text())):
            yield pytest.param(code, doc.name == "README.md", id=f"{doc.name}-{i}")


@pytest.mark.parametrize("code, strict", list(blocks()))
def test_code_block_runs(code, strict, tmp_path, monkeypatch):
    """Each block runs; the README's without a warning (a new user copying the quickstart would take one for
    something wrong)."""
    import warnings

    monkeypatch.chdir(tmp_path)
    script = tmp_path / "block.py"
    script.write_text(code)
    with warnings.catch_warnings():
        if strict:
            warnings.simplefilter("error")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="(?!advfeat)")  # third-party
        runpy.run_path(str(script), run_name="__doc_block__")


@pytest.mark.parametrize("script", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_runs(script):
    out = subprocess.run([sys.executable, str(script), "--small"], capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr[-3000:]


def test_the_torch_floor_is_stated_once_and_enforced():
    """pyproject.toml and README.md state the floor advfeat._version declares (torch 2.3: torch.amp.GradScaler with a
    device type), and importing advfeat with an older torch fails naming both versions."""
    import re

    from advfeat._version import TORCH_FLOOR, check_torch

    floor = ".".join(map(str, TORCH_FLOOR))
    assert f'"torch>={floor}"' in (ROOT / "pyproject.toml").read_text()
    assert f"needs torch >= {floor}" in (ROOT / "README.md").read_text()
    assert not re.search(r"torch >= ?2\.[0-2]\b", (ROOT / "README.md").read_text())
    check_torch("2.13.0+cpu")
    check_torch(f"{floor}.0")
    with pytest.raises(ImportError, match=rf"advfeat needs torch >= {floor}, found torch 2.2.2"):
        check_torch("2.2.2")
    import torch

    assert hasattr(torch.amp, "GradScaler")  # what the floor is for
