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


@pytest.fixture
def images(tmp_path):
    """Four 20x20 RGB images 0.png .. 3.png: the image folder of the ``eclip.prepare`` tests on
    awkward inputs (``test_prepare_sources.py``, ``test_prepare_out.py``,
    ``test_prepare_options.py``)."""
    from test_prepare import write_image

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(4):
        write_image(d / f"{i}.png", 20, 20, i)
    return d


@pytest.fixture
def api(monkeypatch, tmp_path):
    """The fake Messages API of ``tests/fake_messages.py``, with the environment of the Claude
    proposer's tests pointed at it: a test key, no profile on disk."""
    from claude_support import KEY

    from tests.fake_messages import FakeMessagesAPI

    with FakeMessagesAPI() as fake:
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path / "no-config"))  # no profile on disk
        monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
        yield fake


@pytest.fixture
def ws(small_cache, tmp_path, monkeypatch):
    """A workspace past its two baselines (100 and 100: noise floor 0), for the Claude
    proposer's tests (``claude_support._args``)."""
    from claude_support import _args, scripted

    from agent import loop
    from agent.workspace import Workspace

    monkeypatch.setattr(loop, "run_experiment", scripted([100, 100]))
    assert loop.main(_args(tmp_path, small_cache, 0, proposer="search")) == 0
    return Workspace(tmp_path / "c")


@pytest.fixture
def read_sizes(monkeypatch):
    """The sizes asked of every read through ``eclip.fileio.open_regular`` (a log's tail,
    a result), recorded in a list: a test that a file is never read whole."""
    from eclip import fileio

    sizes: list[int] = []
    real_open = fileio.open_regular

    def counting(path):
        f = real_open(path)
        read = f.read
        f.read = lambda n=-1: sizes.append(n) or read(n)
        return f

    monkeypatch.setattr(fileio, "open_regular", counting)
    return sizes
