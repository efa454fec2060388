"""Shared pytest configuration.

Triton reads ``TRITON_INTERPRET`` when kernels are decorated, so the interpreter tests in
``tests/interpret/`` only make sense in a process started with that variable set; the normal
run skips collecting them and a test launches them in their own pytest process.

Each test process computes with one intra-op thread, and so do the processes it starts
(they inherit ``OMP_NUM_THREADS``): ``make test`` runs the suite in one worker per CPU
(pytest-xdist), and torch's default of one OpenMP team per process, as wide as the machine,
would have the teams of the workers and of their training and evaluation children spin on
each other's cores. On 2 CPUs the suite took 13.5 min serially with the default, 9.8 min
serially with one thread, 6.2 min in two workers with one thread. A variable already set is
kept. Set before torch is first imported, which reads it then.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from kernels._common import INTERPRET  # noqa: E402  # Triton's own reading of the variable ("1", "true", ...)

collect_ignore_glob = [] if INTERPRET else ["interpret/*"]


import pytest  # noqa: E402


def _synthetic(tmp_path_factory, name: str, train: int, val: int, test: int):
    from eclip import prepare

    out = tmp_path_factory.mktemp("data") / name
    assert prepare.main(["--dataset", "synthetic", "--num-train", str(train), "--num-val", str(val),
                         "--num-test", str(test), "--out", str(out), "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory):
    """A small built-in dataset cache (300 train, 60 val, 20 test scenes at 64 px), shared by
    the tests that run the harness or the research loop."""
    return _synthetic(tmp_path_factory, "small", 300, 60, 20)


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory):
    """A built-in dataset cache of 2,000 train, 100 val and 60 test scenes at 64 px: enough
    for a short run of the training loop to learn."""
    return _synthetic(tmp_path_factory, "syn", 2000, 100, 60)
