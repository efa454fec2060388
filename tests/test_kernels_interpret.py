"""Runs tests/interpret/ in its own pytest process with TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when kernels are decorated, so the Triton-interpreter tests
cannot share this process (whose kernels module was imported without it).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_interpreter_suite_passes():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/interpret", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreter tests failed (rc {proc.returncode}):\n{out}"
    assert " passed" in out and " failed" not in out, out
