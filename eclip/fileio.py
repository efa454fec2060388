"""Writing files so that a reader, or a process killed mid-write, never sees half of one.

Kept free of torch so the research loop can use it without importing the training stack.
"""

from __future__ import annotations

import os
from pathlib import Path

from eclip.errors import EclipError, first_line


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a temporary sibling, then rename it over ``path``: readers see the
    old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a leftover of a killed process with the same pid: start clean
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
