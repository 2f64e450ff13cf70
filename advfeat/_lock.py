"""One writer per output: an operating-system lock that dies with the process holding it.

A constructor's ``out`` folder, a trainer's ``checkpoint`` and a replication's ``--out`` folder are each
written by one process at a time. A second writer (another terminal, a notebook cell run again) stops at once
with ``InUseError``, naming the folder and the process that holds it, instead of duplicating the work and
overwriting the first writer's files.

The lock is a POSIX record lock (``fcntl.lockf``) on a small hidden file (``.advfeat.lock`` in a folder,
``.<name>.lock`` beside a file). The kernel drops it when its process ends, however it ends: a SIGKILL never
leaves a stale lock, and the leftover file blocks nothing. Record locks are not inherited across ``fork``, so
a DataLoader worker that outlives a killed parent holds nothing either. Inside one process a registry catches
a second writer (record locks do not conflict within a process). The file holds the holder's pid, host and
command line, for the error message only. Without ``fcntl`` (Windows) only the in-process check applies.

Ranks of one ``torch.distributed`` job share an output by design: rank 0 takes the lock and tells the other
ranks whether it got it (``exclusive_for_job``), so every rank raises the same error or none does.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from ._dist import broadcast_object, rank_world
from ._io import open_regular

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["InUseError", "exclusive", "exclusive_for_job", "folder_lock", "file_lock"]

_held: set[str] = set()
_registry = threading.Lock()


class InUseError(RuntimeError):
    """Another process (or another call in this process) is writing to the same output right now."""


def folder_lock(folder: str | Path) -> Path:
    """The lock file of an output folder: ``folder/.advfeat.lock``."""
    return Path(folder) / ".advfeat.lock"


def file_lock(file: str | Path) -> Path:
    """The lock file of an output file (a checkpoint): ``.<name>.lock`` beside it."""
    f = Path(file)
    return f.parent / f".{f.name}.lock"


def _who() -> str:
    cmd = " ".join(sys.argv) if sys.argv and sys.argv[0] else sys.executable
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    return f"pid {os.getpid()} on {socket.gethostname()} since {since}: {cmd}"


def _holder(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text or "a process that has not yet written its pid"


@contextmanager
def exclusive(lock: Path, what: str) -> Iterator[None]:
    """Hold the lock file ``lock`` (see ``folder_lock``, ``file_lock``; its folder is created) for the
    block.

    Raises ``InUseError``, naming ``what`` (e.g. ``"out='runs/d_r'"``) and the holder, when another
    process or another call in this process holds it.
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(lock)
    with _registry:
        if key in _held:
            raise InUseError(f"{what} is in use by this process already (pid {os.getpid()}): another call is still "
                             "writing there; wait for it to finish or choose another location")
        _held.add(key)
    fd = -1
    try:
        fd = open_regular(lock, os.O_RDWR)  # never through a planted symbolic link
        if fcntl is not None:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise InUseError(f"{what} is in use by another process ({_holder(lock)}); wait for it to finish, "
                                 "or choose another location") from None
        os.ftruncate(fd, 0)
        os.write(fd, (_who() + "\n").encode())
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # closing the file releases the record lock
        with _registry:
            _held.discard(key)


@contextmanager
def exclusive_for_job(lock: Path, what: str) -> Iterator[None]:
    """``exclusive`` for every rank of a ``torch.distributed`` job: rank 0 holds the lock, and every rank
    raises the same ``InUseError`` when rank 0 could not get it. In one process, plain ``exclusive``."""
    rank, world = rank_world()
    if world == 1:
        with exclusive(lock, what):
            yield
        return
    if rank != 0:
        error = broadcast_object(None)
        if error is not None:
            raise InUseError(error)
        yield
        return
    with ExitStack() as stack:
        try:
            stack.enter_context(exclusive(lock, what))
        except InUseError as e:
            broadcast_object(str(e))
            raise
        broadcast_object(None)
        yield
