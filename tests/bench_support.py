"""The GPU-check scripts under ``bench/`` as modules, for the tests that drive them on the CPU
(``test_bench_dry_run_*.py``). ``bench`` is not an installed package: the repository root is
put on ``sys.path`` here, so the scripts import under a plain ``pytest`` run too."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import kernel_table, profile_step, train_check, tuning  # noqa: E402

__all__ = ["kernel_table", "profile_step", "train_check", "tuning"]
