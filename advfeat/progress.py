"""Progress bars for long work: tqdm, notebook aware (``tqdm.auto``: one widget per long call in Jupyter, where
ipywidgets is installed, as the ``report`` extra does), off when not wanted. Without ipywidgets the plain text bar
is used everywhere, with no warning. Also how long work ends: after Ctrl-C, saying what is kept and how to go on
(``interrupted``), and in a command line, one line per failure (``run_command``)."""

from __future__ import annotations

import contextvars
import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from typing import Any, TypeVar

if importlib.util.find_spec("ipywidgets") is not None:  # tqdm.auto's notebook bar needs it, and warns without
    from tqdm.auto import tqdm
else:
    from tqdm import tqdm

__all__ = ["interrupted", "progress_bar", "command_reports_interrupts", "run_command"]

_COMMAND = contextvars.ContextVar("advfeat_command_reports_interrupts", default=False)


@contextmanager
def command_reports_interrupts() -> Iterator[None]:
    """Inside a command line (``advfeat replicate``, ``advfeat map``): Ctrl-C is reported once, by the command, in
    its own words (its flags, not the Python arguments ``interrupted`` would advise)."""
    token = _COMMAND.set(True)
    try:
        yield
    finally:
        _COMMAND.reset(token)

def run_command(prog: str, kept: str, work: Callable[[], int], usage: tuple[type[Exception], ...]) -> int:
    """Run a command line's ``work`` and end each failure in one line on stderr, returning the exit status: 2 for a
    ``usage`` error (a bad option or file, a folder in use), 1 for a failure of the machine (``OSError``: a full
    disk, a folder it may not write; ``FloatingPointError``: a model that turned non-finite), 130 after Ctrl-C,
    saying what is ``kept`` and that the same command continues."""
    try:
        with command_reports_interrupts():
            return work()
    except usage as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, FloatingPointError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; {kept}: run the same command again to continue", file=sys.stderr)
        return 130


T = TypeVar("T")


@contextmanager
def progress_bar(iterable: Iterable[T] | None, *, desc: str, enabled: bool = True, **kwargs: Any) -> Iterator[Any]:
    """A tqdm bar that is closed however the block ends (also on Ctrl-C). Over an ``iterable``, the bar yielded
    iterates it: each ``for`` over the bar calls ``iter(iterable)`` exactly once, whichever tqdm class is in use
    (``tqdm.auto``'s bar calls ``iter`` on what it is given when it is built, which would start a DataLoader's
    workers and draw its shuffle twice), and each item advances the bar by one."""
    if isinstance(iterable, Sized) and kwargs.get("total") is None:
        try:
            kwargs["total"] = len(iterable)
        except TypeError:  # no len(): an iterable-style loader
            pass
    bar = tqdm(None, desc=desc, disable=not enabled, dynamic_ncols=True, **kwargs)
    try:
        yield bar if iterable is None else _Over(bar, iterable)
    finally:
        bar.close()


class _Over:
    """A bar over an iterable: iterating it iterates the iterable once, one bar step per item; every other
    attribute is the bar's (``set_postfix``, ``update``, ...)."""

    def __init__(self, bar: Any, iterable: Iterable[Any]) -> None:
        self.bar, self.iterable = bar, iterable

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.bar.update(1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bar, name)


def interrupted(message: str | Callable[[], str], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; on Ctrl-C, one line on stderr saying what was kept and how to resume (``message``,
    or what ``message()`` says at that moment), then the ``KeyboardInterrupt`` again (with that line, and without
    the traceback from inside autograd)."""
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        if _COMMAND.get():
            raise
        message = message() if callable(message) else message
        print(f"\n{message}", file=sys.stderr)
        raise KeyboardInterrupt(message) from None
