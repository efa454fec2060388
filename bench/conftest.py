"""Shared pieces of the benchmark suites (``bench/bench_*.py``).

Every benchmark sets ``extra_info``: ``suite``, ``impl``, ``plain`` (True for the
plain-PyTorch counterpart of its group), the shape, the device and a derived figure.
``ratio_to_plain`` is the figure the guard compares: measured by ``paired_ratio`` (the
implementation and its counterpart timed alternately, in the same benchmark) where a
suite does that, else filled in after the run from the two medians of the group by
``pytest_benchmark_update_json``. Ratios survive a noisy machine better than raw times.

The default test run passes ``--benchmark-disable`` (pyproject.toml): each benchmark then
runs once as a smoke test. ``python -m bench.guard`` runs them for real.
"""

from __future__ import annotations

import pytest
import torch

from eclip.hardware import device_name

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    """``fn`` followed by a device sync, so CUDA timings cover the work, not the launch."""
    def run():
        out = fn()
        sync()
        return out
    return run


def peak_extra_bytes(fn) -> int | None:
    """Peak memory allocated by one call beyond what was allocated before (CUDA only)."""
    if DEVICE.type != "cuda":
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return int(torch.cuda.max_memory_allocated() - base)


def paired_ratio(benchmark, fn, plain_fn, pairs: int = 21) -> None:
    """Time ``fn`` and its plain counterpart alternately and store the median of the
    per-pair time ratios as ``ratio_to_plain``: drift of a shared machine (clock changes,
    neighbours) hits both sides of a pair alike, which back-to-back benchmarks do not get;
    the two sides take turns going first.
    Skipped in smoke runs (``--benchmark-disable``)."""
    if benchmark.disabled:
        return
    import statistics
    import time

    def seconds(f) -> float:
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    fn, plain_fn = timed(fn), timed(plain_fn)
    ratios = []
    for i in range(pairs):  # each side goes first in every other pair: no order bias (caches, clocks)
        if i % 2 == 0:
            ours, plain = seconds(fn), seconds(plain_fn)
        else:
            plain, ours = seconds(plain_fn), seconds(fn)
        ratios.append(ours / max(plain, 1e-9))
    benchmark.extra_info["ratio_to_plain"] = statistics.median(ratios)


# The version of the inputs each suite times, per suite (``loss-fwd`` and ``loss-fwd+bwd`` are
# ``loss``): bump it when a suite's inputs or work change under the same benchmark names, so
# the guard says the baseline's figure is stale instead of comparing ratios of two workloads.
# ranks 2: small-integer embeddings with exact ties, and the reference ranking in float64.
WORKLOAD = {"loss": 1, "ranks": 2, "step": 1}


def describe(benchmark, suite: str, impl: str, plain: bool, **info) -> None:
    benchmark.group = f"{suite} " + " ".join(f"{k}={v}" for k, v in info.items() if k in ("B", "D", "N", "dtype", "preset", "batch"))
    benchmark.extra_info.update(suite=suite, impl=impl, plain=plain, device=device_name(DEVICE),
                                workload=WORKLOAD[suite.split("-")[0]], **info)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def pytest_benchmark_update_json(config, benchmarks, output_json):
    groups: dict[str, float] = {}
    for b in output_json["benchmarks"]:
        if b["extra_info"].get("plain") and b.get("stats"):
            groups[b["group"]] = b["stats"]["median"]
    for b in output_json["benchmarks"]:
        base = groups.get(b["group"])
        if base and b.get("stats") and "ratio_to_plain" not in b["extra_info"]:
            b["extra_info"]["ratio_to_plain"] = b["stats"]["median"] / base
        if b.get("stats"):
            if b["extra_info"].get("flop"):
                b["extra_info"]["tflops"] = b["extra_info"]["flop"] / b["stats"]["median"] / 1e12
            if b["extra_info"].get("samples_per_step"):
                b["extra_info"]["samples_per_s"] = b["extra_info"]["samples_per_step"] / b["stats"]["median"]
    output_json["device"] = device_name(DEVICE)
