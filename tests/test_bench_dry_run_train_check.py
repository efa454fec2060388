"""``bench/train_check.py`` and ``bench/profile_step.py``, the checks of the training step:
their CPU dry runs end to end, then the throughput window, the harness smoke, the speed rows and
the profiler's figures from stand-in runs and traces. Nothing is measured; the figures they
print are not checked beyond being there and finite where they are values of the model."""

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from bench_support import profile_step, train_check

from eclip import sandbox


def test_a_speed_row_that_failed_fails_the_check(capsys, monkeypatch):
    real = train_check.train

    def oom(cache, steps, overrides, **kw):  # a row that ran out of memory after one logged step
        return dict(real(cache, 1, overrides, **kw), status="oom")

    monkeypatch.setattr(train_check, "train", oom)
    assert train_check.main(["--dry-run", "--skip-smoke", "--only", "template"]) == 1
    assert re.search(r"^speed: .+: FAILED, .*status oom", capsys.readouterr().out, re.M)


def test_steady_throughput_starts_after_the_graphs_are_recorded(monkeypatch):
    # step 1 compiles, steps 2-3 warm up and record the CUDA graphs (2 s each here), then
    # 0.1 s a step; the window once began after step 1 and counted the recording
    history = [{"step": 1, "samples": 64, "elapsed_s": 30.0}, {"step": 10, "samples": 640, "elapsed_s": 34.7},
               {"step": 20, "samples": 1280, "elapsed_s": 35.7}]
    run = {"status": "ok", "history": history, "samples": 1920, "train_s": 36.7}
    monkeypatch.setattr(train_check, "run_loop", lambda *a, **k: dict(run))
    out = train_check.train(train_check.random_cache(8, 16, 8, 64), 30, {}, device="cpu")
    assert out["steady_sps"] == pytest.approx((1920 - 640) / (36.7 - 34.7))  # 640 samples/s
    # a run that ends at its step-10 row: the window falls back to step 1, never to 0 samples/s
    run.update(history=history[:2], samples=640, train_s=34.7)
    out = train_check.train(train_check.random_cache(8, 16, 8, 64), 10, {}, device="cpu")
    assert out["steady_sps"] == pytest.approx((640 - 64) / (34.7 - 30.0))
    run.update(history=history[:1], samples=64, train_s=30.0)  # one step: nothing to measure
    assert math.isnan(train_check.train(train_check.random_cache(8, 16, 8, 64), 1, {}, device="cpu")["steady_sps"])


def test_train_check_dry_run(capsys):
    assert train_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "smoke_status: ok" in out and "OK" in out
    # the harness end to end: trained, then scored by its own three encoding processes
    harness = re.search(r"^harness_status: ok  val_mean_rank: ([\d.]+) .*eval_s: ([\d.]+)  "
                        r"batch_gap: ([\d.e+-]+)/([\d.e+-]+) .*OK$", out, re.M)
    assert harness and 0 <= float(harness[1]) <= 255 and float(harness[2]) > 0, out
    assert 0 <= float(harness[3]) < 1e-5 and 0 <= float(harness[4]) < 1e-5, out  # the copies matched
    cases = re.findall(r"^sync_check (\w+): dry run, status (\w+)", out, re.M)
    assert cases == [(case, "ok") for case in train_check.SYNC_CASES]
    speeds = re.findall(r"^speed: (.+?): ([\d.]+) samples/s.*status (\w+), loss ([\d.naif]+)", out, re.M)
    assert [s[0] for s in speeds] == [v[0] for v in train_check.SPEED_ROWS.values()]
    assert all(status == "ok" and math.isfinite(float(loss)) for _, _, status, loss in speeds)


@pytest.mark.skipif(sandbox.probe() is not None, reason="no sandbox on this machine")
def test_train_check_runs_the_harness_isolated(capsys):
    assert train_check.main(["--dry-run", "--skip-speed", "--harness-isolate"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^harness_status: ok  val_mean_rank: [\d.]+ .*  isolated: True  wall_s: [\d.]+  OK$", out, re.M), out


def test_profile_step_on_the_cpu(capsys):
    rc = profile_step.main(["--device", "cpu", "--preset", "tiny", "--batch", "16", "--image-size", "64",
                            "--skip", "1", "--active", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and re.search(r"per step: wall [\d.]+ ms", out) and "aten::" in out


@pytest.mark.parametrize("argv,message", [
    (["--device", "cpu", "--preset", "nope"], "profile_step: error: recipe: preset: unknown preset 'nope'"),
    (["--device", "tpu"], "profile_step: error: --device tpu:"),
    (["--active", "0"], "--active 0: must be at least 1"),
    (["--batch", "0"], "--batch 0: must be at least 1"),
])
def test_profile_step_bad_input_is_one_line(capsys, argv, message):
    # each was a traceback (the last from the profiler's schedule)
    small = ["--batch", "2", "--image-size", "32", "--context", "8", "--skip", "0", "--active", "1"]
    try:
        rc = profile_step.main([*small, *argv])
    except SystemExit as e:  # argparse's usage error
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_train_check_stops_at_the_first_interrupted_run(monkeypatch, capsys):
    # gpu_check.sh's time limit arrives as a SIGTERM, which the training loop takes as "end
    # after this step" (status interrupted) and then ignores: the script once went on with
    # every later row, past its limit and into the next step's time.
    calls = []

    def interrupted(recipe, cache, rows, cfg, on_log=None):
        calls.append(cfg)
        return {"status": "interrupted"}

    monkeypatch.setattr(train_check, "run_loop", interrupted)
    assert train_check.main(["--dry-run", "--skip-smoke"]) == 130
    assert len(calls) == 1 and "train_check: stopped (SIGTERM or Ctrl-C)" in capsys.readouterr().out


@pytest.mark.parametrize("name,counted", [
    ("cudaLaunchKernel", True), ("cudaLaunchKernelExC", True), ("cuLaunchKernel", True), ("cuLaunchKernelEx", True),
    ("cudaGraphLaunch", True), ("cudaMemcpyAsync", False), ("aten::cudaLaunchKernel", False), ("Launch", False),
])
def test_launch_calls_are_the_runtime_and_driver_ones(name, counted):
    # the host-side calls that launch kernels or CUDA graphs, by the runtime's and the
    # driver's names; other API calls and operators are not launches
    assert bool(profile_step.LAUNCH.match(name)) is counted


def _event(key, count, device="CUDA", device_us=0.0, cpu_us=0.0, annotation=False):
    """One row of ``prof.key_averages()``: the attributes profile_step reads."""
    from torch.autograd import DeviceType

    return SimpleNamespace(key=key, count=count, device_type=getattr(DeviceType, device),
                           self_device_time_total=device_us, self_cpu_time_total=cpu_us, is_user_annotation=annotation)


def test_profile_step_figures_on_cuda_from_a_known_trace(capsys, monkeypatch):
    # The CUDA summary from a stand-in profiler and run (no GPU needed): the log points at
    # known clock times, kernels whose device time is known, host launch calls counted.
    skip, active = 2, 3
    events = [_event("gemm", 3, device_us=3000.0), _event("softmax", 6, device_us=1500.0),
              *(_event(f"fill{i}", 3) for i in range(11)),
              _event("ProfilerStep#4", 3, device_us=9000.0, annotation=True),  # a range, not a kernel
              _event("aten::mm", 9, device="CPU", device_us=4500.0, cpu_us=800.0),  # the CPU op carries its kernels' time
              _event("cudaLaunchKernel", 30, device="CPU"), _event("cuLaunchKernelEx", 3, device="CPU"),
              _event("cudaGraphLaunch", 3, device="CPU")]
    seen = {}

    class Profiler:
        def __init__(self, activities, schedule):
            seen["activities"], self.steps = activities, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            seen["prof_steps"] = self.steps

        def step(self):
            self.steps += 1

        def key_averages(self):
            return events

    def train(cache, steps, overrides, log_every, device, on_log):
        seen["steps"] = steps
        for step in range(1, steps + 1):
            on_log({"step": step})
        return {"status": "ok", "last": {}}

    calls = iter(range(100))  # the k-th log point at k² ms: unequal gaps show which marks are used
    monkeypatch.setattr(profile_step, "time", SimpleNamespace(perf_counter=lambda: next(calls) ** 2 / 1e3))
    monkeypatch.setattr(profile_step, "train", train)
    monkeypatch.setattr(profile_step, "random_cache", lambda *a: None)
    monkeypatch.setattr(profile_step, "profile", Profiler)
    monkeypatch.setattr(profile_step.torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr("torch.profiler._utils._init_for_cuda_graphs", lambda: seen.setdefault("cupti", True))
    got = profile_step.profile_step("tiny", 16, 64, 32, skip, active, "cuda")
    # skip steps, one warm-up, the active ones, and one more whose row closes the last
    assert seen["steps"] == seen["prof_steps"] == skip + 1 + active + 1
    assert seen["activities"] == [profile_step.ProfilerActivity.CPU, profile_step.ProfilerActivity.CUDA]
    assert seen["cupti"]
    wall = ((skip + active) ** 2 - skip ** 2) / active  # ms per step between marks[skip] and marks[skip + active]
    assert got == {"wall_ms": pytest.approx(wall), "busy_ms": pytest.approx(4500 / active / 1e3),
                   "launches": 33 / active, "graph_launches": 3 / active, "rows": 12}
    out = capsys.readouterr().out
    assert (f"per step: wall {wall:.2f} ms, kernels busy 1.50 ms ({1.5 / wall:.0%} of wall), 11 kernel launches, "
            "1 CUDA-graph launches, 13 distinct kernels") in out
    rows = [line for line in out.splitlines() if re.match(r"\s+[\d.]+\s+[\d.]+%", line)]
    assert rows[:2] == ["   1.000  66.7%      1  gemm", "   0.500  33.3%      2  softmax"] and len(rows) == 12


def test_profile_step_stops_on_a_run_that_did_not_end_ok(monkeypatch):
    monkeypatch.setattr(profile_step, "random_cache", lambda *a: None)
    monkeypatch.setattr(profile_step, "train", lambda *a, **k: {"status": "diverged",
                                                                "last": {"reason": "loss nan at step 3"}})
    with pytest.raises(SystemExit, match="^profile: the run ended diverged: loss nan at step 3$"):
        profile_step.profile_step("tiny", 16, 64, 32, 1, 2, "cpu")


def test_steady_throughput_window_starts_at_the_settle_step_itself(monkeypatch):
    # "at or after step SETTLE_STEPS": a row logged exactly there opens the window
    s = train_check.SETTLE_STEPS
    history = [{"step": 1, "samples": 16, "elapsed_s": 20.0}, {"step": s, "samples": 16 * s, "elapsed_s": 24.0},
               {"step": 2 * s, "samples": 32 * s, "elapsed_s": 24.5}]
    run = {"status": "ok", "history": history, "samples": 48 * s, "train_s": 26.0}
    monkeypatch.setattr(train_check, "run_loop", lambda *a, **k: dict(run))
    out = train_check.train(train_check.random_cache(8, 16, 8, 64), 3 * s, {}, device="cpu")
    assert out["steady_sps"] == pytest.approx((48 * s - 16 * s) / (26.0 - 24.0))


@pytest.mark.parametrize("run,ok", [
    ({"status": "ok", "last": {"loss": 2.5}}, True),
    ({"status": "ok", "last": {"loss": float("nan")}}, False),
    ({"status": "ok", "last": {}}, False),  # no step logged a loss: nothing was measured
    ({"status": "oom", "last": {"loss": 2.5}}, False),
    ({"status": "diverged", "last": {}}, False),
])
def test_trained_needs_an_ok_run_with_a_finite_loss(run, ok):
    assert train_check.trained(run) is ok


def test_random_cache_is_consistent():
    # captions padded with 0 from their length on, boxes inside the image, the last eighth val
    cache = train_check.random_cache(64, 16, 12, 100)
    positions = torch.arange(12)[None, :]
    assert torch.equal((cache.tokens != 0).sum(1), cache.lengths)
    assert bool((cache.tokens[positions < cache.lengths[:, None]] >= 4).all())
    assert int(cache.lengths.min()) >= 5 and int(cache.lengths.max()) <= 12
    assert bool((cache.region_boxes[:, :2] < cache.region_boxes[:, 2:]).all())
    assert 0 <= float(cache.region_boxes.min()) and float(cache.region_boxes.max()) <= 1
    assert cache.split.tolist() == [0] * 56 + [1] * 8


def _harness(monkeypatch, result, returncode=0, stderr="", timeout=False):
    """harness_smoke with a stand-in harness process that writes ``result`` (None: nothing)."""
    import subprocess

    seen = {}

    def fake_run(cmd, **kw):
        seen.update(kw, cmd=cmd)
        if timeout:
            raise subprocess.TimeoutExpired(cmd, kw["timeout"])
        if result is not None:
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "result.json").write_text(json.dumps(result))
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    monkeypatch.setattr(train_check.subprocess, "run", fake_run)
    monkeypatch.setattr(train_check, "write_cache", lambda cache, out: out)
    monkeypatch.setattr(train_check, "random_cache", lambda *a: None)
    return seen


GOOD = {"status": "ok", "ranked_by": "harness", "val_mean_rank": 12.34, "steps": 40, "warmup_s": 1.0,
        "train_s": 45.0, "after_s": 2.0, "eval_s": 3.0, "batch_gap": {"images": 2e-6}, "isolated": False,
        "recipe_wall_s": 51.0}


@pytest.mark.parametrize("result,returncode,ok", [
    (GOOD, 0, True),
    (dict(GOOD, ranked_by="run"), 0, False),  # the run's own metrics, not the harness's encoding
    (GOOD, 1, False),
    (dict(GOOD, status="timeout", reason="over the budget"), 1, False),
])
def test_harness_smoke_passes_only_an_ok_run_ranked_by_the_harness(monkeypatch, capsys, result, returncode, ok):
    _harness(monkeypatch, result, returncode, stderr="line 1\nharness: error: the last line")
    assert train_check.harness_smoke(45.0) is ok
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith(f"harness_status: {result['status']}  val_mean_rank: 12.3 (random 127.5)  steps: 40  ")
    assert "batch_gap: 2.0e-06/none  recipe_wall_s: 51.0  isolated: False" in first
    assert first.endswith("OK" if ok else "FAILED")
    assert ("harness_reason: over the budget" in out) == ("reason" in result)
    assert ("harness: error: the last line" in out) is not ok  # a failure shows the harness's stderr


@pytest.mark.parametrize("isolated,ok", [(True, True), (False, False)])
def test_an_isolated_harness_smoke_passes_only_a_run_that_was_isolated(monkeypatch, capsys, isolated, ok):
    seen = _harness(monkeypatch, dict(GOOD, isolated=isolated), 0)
    assert train_check.harness_smoke(45.0, isolate=True) is ok
    assert seen["cmd"][-1] == "--isolate"
    assert f"isolated: {isolated}  wall_s:" in capsys.readouterr().out


def test_harness_smoke_without_a_result(monkeypatch, capsys):
    seen = _harness(monkeypatch, None, returncode=3)
    assert train_check.harness_smoke(45.0) is False
    assert capsys.readouterr().out.startswith("harness_status: no result (exit 3)  val_mean_rank: none")
    assert seen["timeout"] == 2 * 45.0 + 300  # the harness's own limits end a slow run first
    _harness(monkeypatch, None, timeout=True)
    assert train_check.harness_smoke(45.0) is False
    assert "harness_status: no result (exit -9)" in capsys.readouterr().out


def test_one_failed_speed_row_fails_the_speed_check(monkeypatch, capsys):
    # the first row failing and the last passing: the check still fails
    statuses = iter(["oom", "ok"])

    def train(cache, steps, overrides, placement):
        return {"status": next(statuses), "last": {"loss": 2.0}, "steady_sps": 100.0, "warmup_s": 1.0}

    monkeypatch.setattr(train_check, "DEVICE", "cpu")
    monkeypatch.setattr(train_check, "train", train)
    assert train_check.speed(3, ["template", "blocks"], dry=True) is False
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("speed: bf16 + compile") and ": FAILED," in lines[0]
    assert ": 100 samples/s," in lines[1]


@pytest.mark.parametrize("smoke,harness,speed", [(False, True, True), (True, False, True), (True, True, False),
                                                 (True, True, True)])
def test_train_check_fails_when_any_part_fails(monkeypatch, capsys, smoke, harness, speed):
    monkeypatch.setattr(train_check, "smoke", lambda *a: smoke)
    monkeypatch.setattr(train_check, "sync_check", lambda: None)
    monkeypatch.setattr(train_check, "harness_smoke", lambda *a, **k: harness)
    monkeypatch.setattr(train_check, "speed", lambda *a, **k: speed)
    assert train_check.main(["--dry-run"]) == (0 if smoke and harness and speed else 1)


def test_train_check_refuses_unknown_speed_rows(capsys):
    with pytest.raises(SystemExit) as e:
        train_check.main(["--dry-run", "--only", "template,fp16"])
    assert e.value.code == 2
    assert "--only: unknown rows fp16 (known: fp32, template, nographs, host, blocks)" in capsys.readouterr().err


@pytest.mark.parametrize("broken", ["smoke", "harness_smoke", "speed", "sync_check"])
def test_a_section_that_raises_fails_the_check_and_the_rest_still_run(monkeypatch, capsys, broken):
    # one exception (the diagnostic sync_check, a row that does not compile) once ended the
    # script, and every section after it went unchecked on the GPU
    ran = []

    def section(name, result):
        def run(*a, **k):
            ran.append(name)
            if name == broken:
                raise RuntimeError(f"{name} broke\nsecond line of the error")
            return result
        return run

    for name, result in [("smoke", True), ("harness_smoke", True), ("speed", True), ("sync_check", None)]:
        monkeypatch.setattr(train_check, name, section(name, result))
    assert train_check.main(["--dry-run"]) == 1
    # sync_check, a diagnostic, comes after the speed rows: a time limit cuts it first
    assert ran == ["smoke", "harness_smoke", "speed", "sync_check"]
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == f"FAILED {broken}: RuntimeError: {broken} broke"
    assert "Traceback" in captured.err and "second line of the error" in captured.err


def test_a_speed_row_that_raises_fails_and_the_next_rows_still_run(monkeypatch, capsys):
    calls = []

    def train(cache, steps, overrides, placement):
        calls.append(overrides.get("compile_scope"))
        if overrides.get("compile_scope") == "blocks":
            raise RuntimeError("backend='inductor' raised:\nLoweringException: ...")
        return {"status": "ok", "last": {"loss": 2.0}, "steady_sps": 100.0, "warmup_s": 1.0}

    monkeypatch.setattr(train_check, "DEVICE", "cpu")
    monkeypatch.setattr(train_check, "train", train)
    assert train_check.speed(3, ["blocks", "template", "nographs"], dry=True) is False
    assert calls == ["blocks", None, None]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "FAILED speed blocks: RuntimeError: backend='inductor' raised:"
    assert [line.split(":")[0] for line in lines[1:]] == ["speed", "speed"] and ": 100 samples/s," in lines[2]


def test_an_error_without_a_message_still_names_its_type(capsys):
    def broken():
        raise MemoryError

    assert train_check.attempt("smoke", broken) is False
    assert capsys.readouterr().out == "FAILED smoke: MemoryError\n"
