"""The machine a number was computed on: what must match for two runs to agree bit for bit.

Floating-point kernels sum in an order that depends on the CPU (its vendor, model and instruction set), on the
libraries' versions and on the thread count, so a bitwise comparison holds only where all of these match
(DESIGN.md, principle 11). :func:`signature` is that platform signature; :func:`describe` is the one line the
benchmarks and results print beside their numbers.

    >>> sorted(signature(threads=1))
    ['cpu', 'cpu_capability', 'machine', 'numpy', 'python', 'threads', 'torch']
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["signature", "cpu_name", "describe"]


def cpu_name() -> str:
    """The CPU's vendor and model: ``/proc/cpuinfo``'s ``vendor_id``, ``model name`` and family / model / stepping
    numbers on Linux (a virtual machine may show a generic model name: the numbers tell generations apart), else
    what ``platform.processor()`` reports."""
    info: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    try:
        text = cpuinfo.read_text() if cpuinfo.exists() else ""
    except OSError:
        text = ""
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor describes them all
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    if "vendor_id" in info or "model name" in info:
        numbers = ", ".join(f"{k} {info[k]}" for k in ("cpu family", "model", "stepping") if k in info)
        name = f"{info.get('vendor_id', '?')} {info.get('model name', '?')}"
        return f"{name} ({numbers})" if numbers else name
    return platform.processor() or platform.machine() or "unknown"


def signature(threads: int) -> dict[str, str]:
    """What must match for results computed at ``threads`` threads to be equal bit for bit: the CPU (vendor and
    model), torch's CPU capability, the architecture, and the versions of Python, torch and numpy."""
    import numpy
    import torch

    return {"torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version(),
            "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "threads": str(threads)}


def describe() -> str:
    """One line naming the machine: cores, CPU, capability, architecture, torch and Python versions."""
    s = signature(threads=1)
    return (f"{os.cpu_count()} cores, {s['cpu']}, {s['cpu_capability']}, {s['machine']}, torch {s['torch']}, "
            f"numpy {s['numpy']}, Python {s['python']}")
