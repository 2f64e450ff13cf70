"""CPU speed: let glibc's malloc keep the memory PyTorch frees, instead of faulting it in again every pass.

On CPU, every forward and backward pass allocates its activations and frees them at the end. glibc serves
large blocks with ``mmap`` (above a threshold it adapts, at most 32 MiB) and unmaps them on ``free``, and it
trims the top of its heap back to the system once more than a threshold lies free there; the next pass then
page-faults the same memory in again and the kernel zeroes it. Measured on the 2-core CI machine
(docs/benchmarks.md): 6,000-12,000 page faults per 3-step attack of a small CNN at batch 64, a quarter of
the CPU time spent in the kernel; after ``tune`` none are left, and the constructors on such a
model ran 1.2-1.5x faster (attacks and training make the same passes). A model whose activations are
small, like the planted MLP, gains little: the default ``advfeat replicate`` took 92 s instead of 95 s.

``tune`` raises glibc's mmap and trim thresholds for the whole process (with ``mallopt``). The price: the
process keeps its peak heap instead of returning it to the system. It changes no result (the arithmetic is the
same, bit for bit). ``advfeat replicate``, the benchmarks and the test suite call it; a library import does
not. The same settings from the shell, before Python starts:

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_TOP_PAD_=268435456 python ...

(or preload tcmalloc / jemalloc, which behave like this by default). On other C libraries (macOS, Windows,
musl) ``tune`` does nothing and returns False.

Examples:
    >>> import advfeat as af
    >>> af.allocator.tune() in (True, False)
    True
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["tune"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's <malloc.h>
_SETTINGS = ((_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, (1 << 31) - 1), (_M_TOP_PAD, 256 << 20))


def tune() -> bool:
    """Keep freed memory in the process (glibc only); True when glibc took every setting, else False."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
