"""The merge / scalar kernel tests, rerun with the Triton kernels under the interpreter.

This process runs with TRITON_INTERPRET=1 (see tests/conftest.py), so the "cpu" cases of
tests/test_kernels_reduce.py run the kernels on CPU tensors.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_kernels_reduce import *  # noqa: E402,F401,F403
