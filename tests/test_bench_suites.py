"""The shared pieces of the benchmark suites (bench/conftest.py) and what each suite records
for the guard: paired ratios, memory windows and groups from stand-in clocks, counters and
benchmark fixtures (no timing is measured here)."""

import time

import pytest
import torch

from bench import bench_loss, bench_ranks, bench_step
from bench import conftest as suites


class Benchmark:
    """The parts of pytest-benchmark's fixture the suites use, as in a smoke run."""

    disabled = True

    def __init__(self):
        self.group, self.extra_info = None, {}

    def __call__(self, fn):
        return fn()


def test_timed_waits_for_the_device_after_the_call(monkeypatch):
    # CUDA work is asynchronous: without the sync a timing covers the launches only
    order = []
    monkeypatch.setattr(suites, "DEVICE", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: order.append("sync"))
    assert suites.timed(lambda: order.append("call") or 3)() == 3
    assert order == ["call", "sync"]


def test_paired_ratio_is_the_median_of_per_pair_ratios_each_side_first_in_turn(monkeypatch):
    # a fake clock: ours takes 3 s (30 s once, a neighbour's burst), plain 2 s; the median of
    # the pairs' ratios is 1.5 whatever the burst, and the sides alternate going first
    clock, order = [0.0], []
    ours_s, plain_s = iter([3.0, 3.0, 30.0, 3.0, 3.0]), iter([2.0] * 5)

    def ours():
        order.append("ours")
        clock[0] += next(ours_s)

    def plain():
        order.append("plain")
        clock[0] += next(plain_s)

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    bench = Benchmark()
    bench.disabled = False
    suites.paired_ratio(bench, ours, plain, pairs=5)
    assert bench.extra_info == {"ratio_to_plain": 1.5}
    assert order == ["ours", "plain", "plain", "ours", "ours", "plain", "plain", "ours", "ours", "plain"]


def test_paired_ratio_does_nothing_in_a_smoke_run():
    bench, called = Benchmark(), []
    suites.paired_ratio(bench, lambda: called.append(1), lambda: called.append(2))
    assert bench.extra_info == {} and called == []


def test_peak_extra_bytes_is_the_peak_beyond_what_was_allocated_before(monkeypatch):
    # fake CUDA counters: 1000 bytes held before the call, which allocates 300 and, for a
    # moment, 200 more: 500 bytes beyond the base, not the 1500 of the absolute peak
    state = {"now": 1000, "peak": 5000}  # an earlier, higher peak is forgotten

    def call():
        state["now"] += 300
        state["peak"] = max(state["peak"], state["now"] + 200)
        state["now"] -= 300

    monkeypatch.setattr(suites, "DEVICE", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: state.update(peak=state["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: state["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: state["peak"])
    assert suites.peak_extra_bytes(call) == 500


def test_peak_extra_bytes_on_a_cpu_is_none_and_does_not_call(monkeypatch):
    monkeypatch.setattr(suites, "DEVICE", torch.device("cpu"))
    called = []
    assert suites.peak_extra_bytes(lambda: called.append(1)) is None and called == []


def test_describe_groups_by_shape_and_dtype_only():
    # the group pairs a benchmark with its plain counterpart (pytest_benchmark_update_json):
    # the shape and dtype name it, the implementation and the derived figures do not
    fused, plain = Benchmark(), Benchmark()
    suites.describe(fused, "loss-fwd", "fused", False, B=256, D=64, dtype="float32", flop=7, peak_extra_bytes=None)
    suites.describe(plain, "loss-fwd", "plain-eager", True, B=256, D=64, dtype="float32", flop=7, peak_extra_bytes=9)
    assert fused.group == plain.group == "loss-fwd B=256 D=64 dtype=float32"
    assert fused.extra_info == {"suite": "loss-fwd", "impl": "fused", "plain": False,
                                "device": fused.extra_info["device"], "B": 256, "D": 64, "dtype": "float32",
                                "flop": 7, "peak_extra_bytes": None, "workload": suites.WORKLOAD["loss"]}
    other = Benchmark()
    suites.describe(other, "loss-fwd", "fused", False, B=256, D=64, dtype="bfloat16")
    assert other.group != fused.group


@pytest.mark.parametrize("pass_,per", [("fwd", 2), ("fwd+bwd", 6)])
@pytest.mark.parametrize("impl", ["fused", "plain-eager", "plain-compile"])
def test_loss_suite_counts_the_same_flop_for_every_implementation(monkeypatch, impl, pass_, per):
    # 2·B²·D forward, 6·B²·D forward + backward, whatever the implementation (TFLOP/s then
    # compare); plain eager is the group's counterpart and plain + compile a reference, which
    # the guard leaves out. A CUDA run is faked for plain + compile, skipped on a CPU.
    monkeypatch.setattr(bench_loss, "CUDA", True)
    monkeypatch.setattr(bench_loss, "_compiled", bench_loss.plain_loss)
    b, d = 64, 16
    bench = Benchmark()
    bench_loss.bench_contrastive_loss(bench, impl, b, d, pass_)
    info = bench.extra_info
    assert info["flop"] == per * b * b * d and info["B"] == b and info["D"] == d
    assert info["plain"] is (impl == "plain-eager") and info.get("reference", False) is (impl == "plain-compile")
    assert bench.group == f"loss-{pass_} B={b} D={d} dtype=float32"


@pytest.mark.parametrize("impl,plain", [("kernel", False), ("dense", True)])
def test_ranks_suite_marks_the_dense_ranks_as_the_counterpart(impl, plain):
    bench = Benchmark()
    bench_ranks.bench_retrieval_ranks(bench, impl, 50, 8)
    assert bench.extra_info["plain"] is plain and bench.group == "ranks N=50 D=8"


def test_a_loss_step_warms_up_once_and_keeps_no_gradient(monkeypatch):
    # compilation and autotuning happen before the step is returned, not in its first timing;
    # each step frees its gradients, so a memory window around the next sees only its own
    calls, held, real = [], {}, bench_loss.make

    def make(b, d, grad):
        held["inputs"] = real(b, d, grad)
        return held["inputs"]

    monkeypatch.setattr(bench_loss, "make", make)
    step = bench_loss.make_step(lambda *a: calls.append(1) or bench_loss.plain_loss(*a), 16, 8, "fwd+bwd")
    assert len(calls) == 1
    step()
    assert len(calls) == 2 and all(x.grad is None for x in held["inputs"])


@pytest.mark.parametrize("impl", ["fp32-eager", "template"])
def test_step_suite_marks_fp32_eager_as_the_counterpart(impl):
    # samples/s is derived from samples_per_step (pytest_benchmark_update_json): one batch
    bench = Benchmark()
    cache = bench_step.random_cache(2 * bench_step.BATCH, bench_step.SIZE, bench_step.CONTEXT, 1024)
    bench_step.bench_train_step(bench, cache, impl)
    info = bench.extra_info
    assert info["plain"] is (impl == "fp32-eager") and info["samples_per_step"] == info["batch"] == bench_step.BATCH
    assert bench.group == f"step preset={bench_step.PRESET} batch={bench_step.BATCH}"
