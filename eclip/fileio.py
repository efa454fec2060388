"""Writing files so that a reader, or a process killed mid-write, never sees half of one.

Kept free of torch so the research loop can use it without importing the training stack.
"""

from __future__ import annotations

import os
from pathlib import Path


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
