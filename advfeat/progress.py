"""Progress bars for long work: tqdm, notebook aware (``tqdm.auto``: one widget per long call in Jupyter, where
ipywidgets is installed, as the ``report`` extra does), off when not wanted. Without ipywidgets the plain text bar
is used everywhere, with no warning."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

if importlib.util.find_spec("ipywidgets") is not None:  # tqdm.auto's notebook bar needs it, and warns without
    from tqdm.auto import tqdm
else:
    from tqdm import tqdm

__all__ = ["interrupted", "progress_bar"]

T = TypeVar("T")


@contextmanager
def progress_bar(iterable: Iterable[T] | None, *, desc: str, enabled: bool = True, **kwargs: Any) -> Iterator[Any]:
    """A tqdm bar over ``iterable`` that is closed however the block ends (also on Ctrl-C)."""
    bar = tqdm(iterable, desc=desc, disable=not enabled, dynamic_ncols=True, **kwargs)
    try:
        yield bar
    finally:
        bar.close()


def interrupted(message: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; on Ctrl-C, one line on stderr saying what was kept and how to resume, then the
    ``KeyboardInterrupt`` again (with that line, and without the traceback from inside autograd)."""
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        print(f"\n{message}", file=sys.stderr)
        raise KeyboardInterrupt(message) from None
