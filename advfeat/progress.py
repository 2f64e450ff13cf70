"""Progress bars for long work: tqdm, notebook aware (``tqdm.auto``), off when not wanted."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["progress_bar"]

T = TypeVar("T")


@contextmanager
def progress_bar(iterable: Iterable[T] | None, *, desc: str, enabled: bool = True, **kwargs: Any) -> Iterator[Any]:
    """A tqdm bar over ``iterable`` that is closed however the block ends (also on Ctrl-C)."""
    bar = tqdm(iterable, desc=desc, disable=not enabled, dynamic_ncols=True, **kwargs)
    try:
        yield bar
    finally:
        bar.close()
