"""Generate docs/api.md from the docstrings of the public names (``python scripts/api_docs.py``).

``--check`` exits 1 when docs/api.md differs from what the docstrings give (a test runs it).
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import advfeat as af

OUT = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def entry(name: str, obj: object) -> str:
    doc = inspect.getdoc(obj) or "(no docstring)"
    try:
        sig = str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        sig = ""
    kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "object"
    return f"### `{name}{sig}`\n\n*{kind}*\n\n{doc}\n"


def render() -> str:
    parts = ["# API reference", "",
             "Generated from the docstrings by `python scripts/api_docs.py`; a test fails when it is out of step.",
             ""]
    parts.append("## advfeat\n")
    for name in af.__all__:
        obj = getattr(af, name)
        if inspect.ismodule(obj) or name == "__version__":
            continue
        parts.append(entry(f"advfeat.{name}", obj))
    for mod in ("data", "models", "allocator"):
        m = getattr(af, mod)
        parts.append(f"## advfeat.{mod}\n")
        for name in m.__all__:
            parts.append(entry(f"advfeat.{mod}.{name}", getattr(m, name)))
    parts.append("## advfeat.engine\n")
    for name in ("optimize", "OptimizeResult"):
        parts.append(entry(f"advfeat.engine.{name}", getattr(af.engine, name)))
    return "\n".join(parts)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of step with the docstrings: run python scripts/api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
