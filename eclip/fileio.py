"""Writing files so that a reader, or a process killed mid-write, never sees half of one.

Kept free of torch so the research loop can use it without importing the training stack.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import sys
from pathlib import Path

from eclip.errors import EclipError, first_line


def map_json(value, fn):
    """``value`` (JSON-like: dicts, lists, tuples and leaves) with ``fn`` applied to every leaf,
    dict keys included; tuples become lists. What is written as JSON is cleaned through it
    (non-finite numbers, secrets, text that is not UTF-8)."""
    if isinstance(value, dict):
        return {map_json(k, fn): map_json(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [map_json(v, fn) for v in value]
    return fn(value)


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a temporary sibling, then rename it over ``path``: readers see the
    old file or the new one, never half of one.

    The temporary file's data reach the disk before the rename, and the rename reaches it
    before the return (``fsync_path``): after a power cut the path holds the old or the new
    content, not a renamed empty file (the order a journaling file system may otherwise
    keep only for the metadata)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if not path.parent.is_dir():  # else each writer fails its own way (safetensors: not an OSError)
        raise FileNotFoundError(errno.ENOENT, f"its folder {path.parent} does not exist", str(path))
    tmp.unlink(missing_ok=True)  # a leftover of a killed process with the same pid: start clean
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except OSError as e:  # named as the caller named it, not as the temporary file nobody asked for
        if str(tmp) not in (str(e.filename), str(e.filename2)):
            raise
        raise type(e)(e.errno, e.strerror, str(path)) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk. A folder that cannot be
    opened or flushed (some platforms and file systems refuse) is left as it is: the rename
    is still atomic for readers, only its durability across a power cut is not assured."""
    if not path.is_dir():
        _fsync(path, os.O_RDONLY)
        return
    with contextlib.suppress(OSError):
        _fsync(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_tensors(path: Path, hint: str = "", prefix: str | None = None) -> dict:
    """A safetensors file as torch tensors (only the names starting with ``prefix`` when
    given: the rest is never read), or a one-line EclipError naming it (cut short,
    corrupted, missing)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        if prefix is None:
            return load_file(str(path))
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except (SafetensorError, OSError) as e:
        reason = first_line(e)
        raise EclipError(f"{path}: unreadable ({reason}){'; ' + hint if hint else ''}") from None


def open_regular(path: Path):
    """``path`` opened for reading in binary if it is a regular file, not a link (OSError
    otherwise): a recipe's process may leave a FIFO (a read that never ends), a device or a
    link to one where the harness or the loop reads."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file (``open_regular``)."""
    with open_regular(path) as f:
        return f.read()


def tail_lines(path: Path, lines: int, max_bytes: int = 65536) -> list[str]:
    """The last ``lines`` lines of ``path`` (a regular file, ``open_regular``), from at most
    its last ``max_bytes``: a log a run filled with gigabytes is not read whole to show its
    end. Bytes that are not UTF-8 are replaced; a line the window's start cuts is dropped,
    unless it is the only one (the end of a line longer than the window)."""
    with open_regular(path) as f:
        start = max(0, os.fstat(f.fileno()).st_size - max_bytes)
        f.seek(max(0, start - 1))  # the byte before the window: whether its first line is whole
        data = f.read(max_bytes + (start > 0))
    cut = start > 0 and data[:1] != b"\n"
    text = data[start > 0:].decode("utf-8", "replace").splitlines()
    return (text[1:] if cut and len(text) > 1 else text)[-lines:]


def check_regular(path: Path, what: str) -> None:
    """EclipError unless ``path`` is missing or a regular file (not a link, FIFO, folder)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise EclipError(f"{path}: {what} is not a regular file (a recipe's process left something else there)")


def remove(path: Path) -> None:
    """Remove ``path`` whatever it is, a link itself and never what it points to."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def file_bytes(*paths: Path) -> int:
    """The sizes of ``paths`` added up (a missing one: 0): for ``wall_limit``, the training
    images a process was given (the whole cache's without ``--isolate``) and the checkpoint
    it wrote, which it places and writes off the clock."""
    total = 0
    for path in paths:
        try:
            total += os.lstat(path).st_size
        except OSError:
            pass
    return total


_HELD: dict[Path, tuple[int, int]] = {}  # lock file -> (fd, depth): the locks this process holds
NO_LOCKS = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)  # flock's "cannot lock here"


@contextlib.contextmanager
def exclusive(out: Path, who: str, lock: Path | None = None):
    """Hold ``lock`` (default ``.NAME.lock`` beside ``out``; an exclusive, non-blocking
    ``flock``) within the block: one process at a time writes ``out``, whatever host or PID
    namespace runs it (the lock goes with its holder, killed or not). Re-entrant within a
    process. EclipError ``"{out}: {who} is under way"`` when another process holds it. The
    file is removed as the lock is let go."""
    out = Path(out)
    lock = Path(lock) if lock is not None else out.parent / f".{out.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock = lock.resolve()
    if lock in _HELD:
        fd, depth = _HELD[lock]
        _HELD[lock] = (fd, depth + 1)
    else:
        _HELD[lock] = (_acquire(lock, out, who), 1)
    try:
        yield
    finally:
        fd, depth = _HELD[lock]
        if depth > 1:
            _HELD[lock] = (fd, depth - 1)
        else:
            del _HELD[lock]
            try:
                lock.unlink()  # while still held: one who opened it meanwhile finds it gone (_acquire)
            except FileNotFoundError:
                pass
            if fd >= 0:  # -1: held without a lock (NO_LOCKS)
                os.close(fd)


def _acquire(lock: Path, out: Path, who: str) -> int:
    """An fd holding ``lock`` exclusively. The holder removes the file as it lets go, so a
    lock got on a file no longer at that path is let go and taken again on the new one."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EclipError(f"{out}: {who} is under way (it holds {lock}); wait for it to end") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in NO_LOCKS:
                raise
            # a file system without locks (Lustre without -o flock, NFS without lockd): on, unguarded
            print(f"warning: {lock}: this file system cannot lock files ({e.strerror}); going on without the lock "
                  f"that keeps out a second process", file=sys.stderr)
            return -1
        try:
            if os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
