"""Writing files so that a reader, or a process killed mid-write, never sees half of one.

Kept free of torch so the research loop can use it without importing the training stack.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from eclip.errors import EclipError, first_line


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
