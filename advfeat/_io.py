"""Crash-safe files: write to a temporary file in the same folder, fsync, rename over the target.

Files get the permissions a plain ``open(path, "w")`` would give them: a new file ``0o666`` less the process's
umask (0644 under the usual 022, 0664 under a group-sharing 002), an existing file keeps its mode. (A
``tempfile.mkstemp`` file is always 0600, which would hide reports and datasets from a lab-mate.)
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "append_text", "load_tensors", "open_regular", "TMP_SUFFIX", "LinkRefused"]

TMP_SUFFIX = ".tmp"

_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class LinkRefused(OSError):
    """advfeat never writes or appends through a symbolic link it did not create."""


def open_regular(path: str | Path, flags: int) -> int:
    """``os.open(path, flags | O_CREAT | O_NOFOLLOW, 0o666)`` (the umask applies), refusing a symbolic link and
    anything that is not a regular file (a FIFO, a device) without truncating or writing it. Returns the fd."""
    p = Path(path)
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    try:
        before = os.lstat(p)
    except FileNotFoundError:
        before = None
    if before is not None and not stat.S_ISLNK(before.st_mode) and not stat.S_ISREG(before.st_mode):
        raise LinkRefused(errno.EINVAL, f"{p} is not a regular file: advfeat writes only regular files; remove it")
    try:
        fd = os.open(p, flags | os.O_CREAT | nofollow | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0),
                     0o666)
    except OSError as e:
        if p.is_symlink():
            raise LinkRefused(errno.ELOOP, f"{p} is a symbolic link: advfeat does not write through links it did "
                                           "not create; remove it (or point the option elsewhere)") from None
        raise (_full(p, None, 0) if _no_space(e) else e) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LinkRefused(errno.EINVAL, f"{p} is not a regular file: advfeat writes only regular files; remove it")
    return fd


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` (created with the umask's mode), never through a symbolic link."""
    fd = open_regular(path, os.O_WRONLY | os.O_APPEND)
    try:
        data = text.encode()
        while data:
            data = data[os.write(fd, data):]
    except OSError as e:
        raise (_full(Path(path), len(text.encode()), 0) if _no_space(e) else e) from None
    finally:
        os.close(fd)


def _no_space(e: BaseException) -> bool:
    """Whether ``e`` (or an error it was raised from or during) is a full disk or quota: an ``OSError`` with
    ENOSPC / EDQUOT, or numpy's short write (``N requested and M written``, no errno)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and (seen.errno in _NO_SPACE or
                                          (seen.errno is None and " requested and " in str(seen))):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _full(path: Path, size: int | None, written: int) -> OSError:
    """The one-line error of a full disk: the folder, the bytes the file needs and those free."""
    try:
        free = f"{shutil.disk_usage(path.parent).free:,}"
    except OSError:
        free = "an unknown number of"
    need = f"about {size:,} bytes" if size is not None else f"more than {written:,} bytes"
    return OSError(errno.ENOSPC, f"no space left on the device of {path.parent}: writing {path.name} needs {need} "
                                 f"and {free} bytes are free; free some space and call again; files finished before "
                                 "are kept and a rerun resumes from them")


def _open_temporary(target: Path) -> tuple[int, Path]:
    """A new file beside ``target`` named ``.<name>.<random>.tmp``, created with mode 0o666 so that the kernel
    applies the umask, exactly as for ``open(path, "w")``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object], size: int | None = None) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, then make it ``path`` atomically.

    After a crash at any moment, ``path`` holds either its old content or the complete new one. The file gets
    the mode ``open(path, "w")`` would give it (see the module docs). ``size``: about how many bytes ``write``
    writes, when known: a disk with less free space is refused before anything is written. A full disk, found
    before or while writing, is one ``OSError`` (ENOSPC) naming the folder and the bytes needed; nothing partial
    is left.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if size is not None:
        try:
            short = shutil.disk_usage(target.parent).free < size
        except OSError:
            short = False
        if short:
            raise _full(target, size, 0)
    try:
        keep_mode: int | None = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        keep_mode = None
    try:
        fd, tmp = _open_temporary(target)
    except OSError as e:
        if _no_space(e):
            raise _full(target, size, 0) from None
        raise
    written = 0
    try:
        with os.fdopen(fd, "wb") as f:
            if keep_mode is not None and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), keep_mode)
            try:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            finally:
                written = _position(f)
        os.replace(tmp, target)
    except BaseException as e:  # Ctrl-C included: nothing partial is left
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, Exception) and _no_space(e):  # torch's and numpy's errors carry the ENOSPC inside
            raise _full(target, size, written) from None
        raise
    _fsync_dir(target.parent)


def _position(f: IO[bytes]) -> int:
    try:
        return f.tell()
    except (OSError, ValueError):
        return 0


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_tensors(path: str | Path, what: str, fix: str, map_location: Any = "cpu", argument: str = "path") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers, no code from the file ever runs. A
    missing file is a FileNotFoundError and anything else that fails (truncated, empty, random bytes, a pickle
    with code) a ValueError naming the file, what it should be and ``fix``: never torch's advice to load it
    unsafely."""
    import torch

    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise FileNotFoundError(f"{argument}: {p} is a broken symbolic link")
    if not p.is_file():
        raise FileNotFoundError(f"{argument}: no {what} at {p}")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure means the same thing: not a file we can read safely
        raise ValueError(f"{argument}: {p} is not {what} advfeat can read safely (tensors only, no code), or it "
                         f"is damaged or truncated ({type(e).__name__}); {fix}") from None
