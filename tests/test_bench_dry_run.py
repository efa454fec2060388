"""The GPU-check scripts run end to end on the CPU (--dry-run): a script error shows here,
not after minutes of a lent GPU. Nothing is measured; the figures they print are not checked
beyond being there and finite where they are values of the model."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import kernel_table, profile_step, train_check  # noqa: E402
from eclip import sandbox  # noqa: E402


def _empty_autotuner_caches(monkeypatch):
    """The autotuners' caches are per process: on a GPU, earlier tests at tuned sizes fill them."""
    for tuner in kernel_table._tuners().values():
        if tuner is not None:
            monkeypatch.setattr(tuner, "cache", {})


def test_kernel_table_dry_run(tmp_path, capsys, monkeypatch):
    _empty_autotuner_caches(monkeypatch)
    out = tmp_path / "table.md"
    assert kernel_table.main(["--dry-run", "--out", str(out)]) == 0
    text = out.read_text()
    assert "FAIL" not in text and "error" not in text
    for mode in ("lean:fused", "lean:panel", "fast"):
        assert f"compiled step ({mode}): ok" in text
        assert re.search(rf"accuracy B=96 D=48 bf16 {re.escape(mode)}: .*\(ok", text)
        assert f"breakdown {mode} B=64" in text
    # the table: a header with every implementation and one row per size, five cells each
    assert "plain + compile" in text
    rows = [line for line in text.splitlines() if re.match(r"\s+(64|100)\s+(48|40) \|", line)]
    assert len(rows) == 2 and all(line.count("|") == 5 for line in rows)
    assert "panel sweep B=256" in text and "finite: ok" in text and "collapsed model ranks N-1: ok" in text
    assert "tuned fast fwd: nothing tuned in this run" in text  # the references tune nothing


def test_kernel_table_fails_when_a_check_fails(capsys, monkeypatch):
    # A loss 5% off, a collapsed model that ranks 0 and a non-finite B = 1M loss: each check
    # prints FAIL and the exit code must say so (the sections once returned None, counted ok).
    real = kernel_table.fused
    monkeypatch.setattr(kernel_table, "fused", lambda mode: lambda *a, **k: 1.05 * real(mode)(*a, **k))
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    assert kernel_table.check_accuracy([40], 16) is False
    assert kernel_table.check_lean_memory([40], 16, limit=-1.0) is False  # no extra memory is under -1 MiB
    assert kernel_table.check_lean_memory([40], 16) is True
    text = capsys.readouterr().out
    assert text.count("(FAIL: targets 1e-3 / 1e-2)") == 3 and text.count("(FAIL: target -1.0 MiB") == 2, text
    monkeypatch.setattr(kernel_table, "fused", lambda mode: lambda *a, **k: float("nan") * real(mode)(*a, **k))
    assert kernel_table.huge(64, 16) is False
    ranks = kernel_table.kernels.retrieval_ranks
    monkeypatch.setattr(kernel_table.kernels, "retrieval_ranks", lambda i, t: ranks(i, t)._replace(
        i2t=torch.zeros_like(ranks(i, t).i2t)))
    assert kernel_table.ranks(50, 16) is False
    monkeypatch.setattr(kernel_table, "check_accuracy", lambda sizes, d: False)
    assert kernel_table.main(["--dry-run"]) == 1


def test_a_table_cell_that_raises_fails_the_table(capsys, monkeypatch):
    # an implementation failing at a size the accuracy check does not run (D = 768, B = 64k)
    # printed "error" in its cells, and the script exited 0
    def broken(*a, **k):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(kernel_table, "impls", lambda: {"fast": broken, "plain eager": kernel_table.plain_loss})
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    kernel_table.LINES.clear()
    assert kernel_table.table([(40, 16)]) is False
    assert any("error" in line for line in kernel_table.LINES)
    assert kernel_table.LINES[-1] == "table: FAIL (a fused mode raised or ran out of memory: see the error and OOM cells)"
    monkeypatch.setattr(kernel_table, "impls", lambda: {"plain eager": kernel_table.plain_loss})
    assert kernel_table.table([(40, 16)]) is True
    capsys.readouterr()


def test_out_of_memory_is_a_cell_for_the_plain_losses_and_a_failure_for_ours(capsys, monkeypatch):
    # a lean mode out of memory once printed "OOM" like the plain losses and passed
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    kernel_table.LINES.clear()
    monkeypatch.setattr(kernel_table, "impls", lambda: {"plain eager": oom})
    assert kernel_table.table([(40, 16)]) is True and "OOM" in kernel_table.LINES[-1]
    monkeypatch.setattr(kernel_table, "impls", lambda: {"lean:panel": oom, "plain eager": kernel_table.plain_loss})
    assert kernel_table.table([(40, 16)]) is False
    assert "lean:panel at B=40: out of memory" in capsys.readouterr().out


def test_plain_compile_times_a_static_graph_at_every_size(monkeypatch):
    # one compiled function reused across sizes made Dynamo trace B and D as symbols from the
    # second size on: the table's first row timed a static graph, the others a dynamic one
    shapes = []
    real = torch.compile

    def recording(fn, **kw):
        def backend(gm, example_inputs):
            shapes.append([x for x in example_inputs if isinstance(x, torch.SymInt)])  # B or D as a symbol
            return gm.forward
        return real(fn, **dict(kw, backend=backend))

    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    monkeypatch.setattr(kernel_table.torch, "compile", recording)
    monkeypatch.setattr(kernel_table, "_COMPILED", {})
    for b, d in ((64, 16), (96, 16), (96, 24)):
        img, txt, scale = (x.detach() for x in kernel_table.inputs(b, d))
        kernel_table.plain_compiled(img, txt, scale)
    torch._dynamo.reset()
    assert shapes == [[], [], []]  # three graphs, none with a symbolic size


def test_a_speed_row_that_failed_fails_the_check(capsys, monkeypatch):
    real = train_check.train

    def oom(cache, steps, overrides, **kw):  # a row that ran out of memory after one logged step
        return dict(real(cache, 1, overrides, **kw), status="oom")

    monkeypatch.setattr(train_check, "train", oom)
    assert train_check.main(["--dry-run", "--skip-smoke", "--only", "template"]) == 1
    assert re.search(r"^speed: .+: FAILED, .*status oom", capsys.readouterr().out, re.M)


def test_kernel_table_reports_the_tuned_configs(monkeypatch):
    # What each autotuner chose, one line per kernel and key, and the median time of every
    # config it tried (Triton keeps only the last tuning's timings: the table wraps each
    # tuner to keep them all); a kernel that did not tune says so. Stand-in tuners here.
    triton = pytest.importorskip("triton")
    wide = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)
    square = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=4)

    class Tuner:  # the autotuner's attributes the table reads
        def __init__(self):
            self.cache, self.configs_timings = {}, None

        def run(self, key, timings):
            if key not in self.cache:  # a known key is not tuned again
                self.configs_timings = timings
                self.cache[key] = min(timings, key=lambda cf: timings[cf][0])

    fast, panel = Tuner(), Tuner()
    monkeypatch.setattr(kernel_table, "_tuners", lambda: {"fast fwd": fast, "lean:panel Ĝ": panel})
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "TIMINGS", [])
    kernel_table.LINES.clear()
    kernel_table.watch_tuning()
    kernel_table.watch_tuning()  # idempotent: one wrapper, one record per tuning
    fast.run((512, 15, "torch.bfloat16"), {square: [0.9, 0.8, 1.0], wide: [0.6, 0.5, 0.7]})
    fast.run((512, 16, "torch.bfloat16"), {square: [3.0, 2.9, 3.1], wide: [3.5, 3.4, 3.6]})
    fast.run((512, 16, "torch.bfloat16"), {})  # a cached key: no new tuning
    kernel_table.tuned_configs()
    lines = list(kernel_table.LINES)
    assert lines == [
        "tuned fast fwd [512,15]: BLOCK_M=128 BLOCK_N=64 warps=8 stages=3",
        "tuned fast fwd [512,16]: BLOCK_M=128 BLOCK_N=128 warps=8 stages=4",
        "tuned lean:panel Ĝ: nothing tuned in this run",
        "tuning fast fwd [512,15]: BLOCK_M=128 BLOCK_N=64 warps=8 stages=3 0.600 ms; "
        "BLOCK_M=128 BLOCK_N=128 warps=8 stages=4 0.900 ms",
        "tuning fast fwd [512,16]: BLOCK_M=128 BLOCK_N=128 warps=8 stages=4 3.000 ms; "
        "BLOCK_M=128 BLOCK_N=64 warps=8 stages=3 3.500 ms",
    ]


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


@pytest.mark.parametrize("script", [kernel_table, train_check])
def test_without_a_gpu_and_without_dry_run_the_scripts_say_so(script, capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert script.main([]) == 1
    assert "no CUDA device" in capsys.readouterr().out


def gpu_check(timeout: int, **env_vars: str):
    """``bench/gpu_check.sh`` run with ``env_vars`` over this environment (``DRY`` unset unless
    given); the finished process."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "DRY"}
    return subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh")],
                          env=dict(env, **env_vars), capture_output=True, text=True, timeout=timeout)


def fake_python(tmp_path, cases: str) -> str:
    """An interpreter for gpu_check.sh that answers the shell ``case`` patterns ``cases``
    itself and passes everything else to this one; its path."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\ncase \"$*\" in\n{cases}esac\nexec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    return str(fake)


@pytest.mark.slow
def test_gpu_check_script_dry_run(tmp_path):
    # The shell plumbing: steps 2, 2b and 3 with DRY=1 (CPU, tiny), logs in $OUT, the
    # summary at the end; steps 1 and 4 are skipped without a GPU.
    proc = gpu_check(600, DRY="1", OUT=str(tmp_path), PYTHON=sys.executable, STEPS="1 2 2b 3 4",
                     ONLY="template,blocks")
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    assert "== 1." not in out and "== 4." not in out
    summary = out[out.index("==== summary"):]
    assert "compiled step (lean:panel): ok" in summary and "smoke_status: ok" in summary
    assert "harness_status: ok" in summary
    assert summary.count("per step: wall") == 2 and summary.count("speed: ") == 2  # ONLY's two rows
    assert {p.name for p in tmp_path.iterdir()} >= {"train.log", "profile.log", "kernels.log", "kernel_table.md"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("dry", [{}, {"DRY": "0"}], ids=["unset", "DRY=0"])  # DRY=1 alone rehearses
def test_gpu_check_script_without_a_gpu_stops_at_once(tmp_path, dry):
    # its steps once ran on the CPU for minutes (the profiler's two modes up to their limits)
    proc = gpu_check(120, OUT=str(tmp_path), PYTHON=sys.executable, **dry)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == ("no CUDA device: nothing to check here (DRY=1 rehearses the "
                                            "script's plumbing on the CPU)")
    assert not list(tmp_path.iterdir())  # no step ran, no log written


def test_gpu_check_script_names_an_interpreter_without_torch(tmp_path):
    # it once said "no CUDA device" for an interpreter that cannot import torch at all
    proc = gpu_check(60, OUT=str(tmp_path), PYTHON="false")
    assert proc.returncode == 1 and proc.stdout.splitlines()[-1] == (
        "torch and triton do not import with false (PYTHON= picks another interpreter)"), proc.stdout


def test_gpu_check_script_fails_when_the_cuda_tests_cannot_run(tmp_path):
    # without pytest, step 1 (the first check in priority order) said "skipped" and the run
    # still exited 0; a GPU machine is faked by an interpreter that says CUDA is there
    fake = fake_python(tmp_path, '  *"import pytest"*) exit 1 ;;\n'
                                 '  *"sys.exit(not torch.cuda.is_available())"*) exit 0 ;;\n')
    proc = gpu_check(120, OUT=str(tmp_path / "out"), PYTHON=fake, STEPS="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == ("NOT CHECKED: step 1, the CUDA tests: pytest does not import "
                                            "(make gpudeps, and carry .gpudeps)")


@pytest.mark.parametrize("step,script", [("2", "train_check.py"), ("2b", "profile_step.py"), ("3", "kernel_table.py")])
def test_gpu_check_script_fails_when_a_step_fails(tmp_path, step, script):
    # a step whose script fails after printing fails the run (the status of the script, not
    # of the grep or tee after it), and the summary shows no table of an earlier run
    fake = fake_python(tmp_path, f'  *{script}*) echo "half a step"; exit 1 ;;\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "kernel_table.md").write_text("a table of an earlier run\n")
    proc = gpu_check(120, DRY="1", OUT=str(out), PYTHON=fake, STEPS=step)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "half a step" in proc.stdout and "a table of an earlier run" not in proc.stdout


def test_gpu_check_script_stops_at_its_deadline(tmp_path):
    # DEADLINE caps the whole run (one device command may take 600 s): with none left,
    # every step says it was skipped, the summary still prints and the exit status is 1.
    proc = gpu_check(120, DRY="1", OUT=str(tmp_path), PYTHON=sys.executable, DEADLINE="0")
    out = proc.stdout
    assert proc.returncode == 1, out
    assert out.count("skipped: DEADLINE (0 s) reached") == 4  # steps 2, 2b (two modes) and 3
    assert "==== summary" in out and "smoke_status" not in out


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


# --- the figures the table reports and the checks' criteria, with measurements faked ---------


def test_table_cells_are_the_median_peak_and_6_b2_d_tflops(monkeypatch):
    # every cell is median ms / peak extra MiB / TFLOP/s with 6·B²·D flop, whatever the
    # implementation; repetitions drop from 20 to 10 past B = 16,384 and to 5 past 32,768
    seen = []

    def measure(fn, img, txt, scale, reps):
        seen.append((img, reps))
        return 0.02, 123.4

    monkeypatch.setattr(kernel_table, "measure", measure)
    monkeypatch.setattr(kernel_table, "inputs", lambda b, d: ((b, d), None, None))  # nothing allocated
    monkeypatch.setattr(kernel_table, "impls", lambda: {"fast": None, "plain eager": None})
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    kernel_table.LINES.clear()
    sizes = [(16384, 1), (16385, 2), (32768, 3), (32769, 4)]
    assert kernel_table.table(sizes) is True
    assert seen == [((16384, 1), 20)] * 2 + [((16385, 2), 10)] * 2 + [((32768, 3), 10)] * 2 + [((32769, 4), 5)] * 2
    rows = kernel_table.LINES[2:]
    assert len(rows) == len(sizes)
    for (b, d), row in zip(sizes, rows, strict=True):
        head, *cells = row.split("|")
        assert head.split() == [str(b), str(d)] and len(cells) == 2
        for cell in cells:
            ms, peak, tflops = (float(v) for v in cell.split())
            assert (ms, peak) == (0.02, 123)
            assert tflops == round(6 * b * b * d / 0.02e-3 / 1e12)


@pytest.mark.parametrize("peak,ok", [(68.0, True), (68.5, False)])
def test_lean_memory_is_the_peak_beyond_the_two_input_gradients(monkeypatch, capsys, peak, ok):
    # B = 4,096, D = 256 in bf16: the input gradients are 2·4096·256·2 bytes = 4 MiB of the
    # measured peak; what is left is held to the default limit, 64 MiB, which itself passes
    modes = []

    def measure(fn, img, txt, scale, reps):
        modes.append(fn.keywords["mode"])
        return 1.0, peak

    monkeypatch.setattr(kernel_table, "measure", measure)
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    assert kernel_table.check_lean_memory([4096], 256) is ok
    assert modes == ["lean:fused", "lean:panel"]  # both lean backwards, not the fast mode
    out = capsys.readouterr().out
    for mode in modes:
        assert (f"{mode} memory B=4096: {peak - 4:.1f} MiB beyond the input gradients "
                f"({'ok' if ok else 'FAIL'}: target 64 MiB; B²·2 bytes = 32 MiB)") in out


@pytest.mark.parametrize("wrong,shows", [
    (lambda loss: loss + 0.005 * loss.detach(), "loss 5.0e-03"),  # the value off, the gradients exact
    (lambda loss: loss + 0.05 * (loss - loss.detach()), "dI 5.0e-02, dT 5.0e-02, ds 5.0e-02"),  # the reverse
], ids=["loss", "gradients"])
def test_accuracy_fails_on_the_loss_alone_and_on_the_gradients_alone(monkeypatch, capsys, wrong, shows):
    # the loss is held to 1e-3 and every gradient to 1e-2, each on its own
    real = kernel_table.fused
    monkeypatch.setattr(kernel_table, "fused", lambda mode: lambda *a, **k: wrong(real(mode)(*a, **k)))
    monkeypatch.setattr(kernel_table, "FUSED_MODES", ("fast",))
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    assert kernel_table.check_accuracy([40], 16) is False
    out = capsys.readouterr().out
    assert shows in out and "(FAIL: targets 1e-3 / 1e-2)" in out, out


@pytest.mark.parametrize("wrong", [
    lambda loss: loss * float("nan"),
    lambda loss: 2 * loss.detach() - loss,  # the right value, the gradient reversed: training climbs
    lambda loss: loss * (1.01 if torch.compiler.is_compiling() else 1.0),  # compiled 1% off eager
], ids=["nan", "climbing", "off-eager"])
def test_compiled_step_fails_on_a_loss_not_finite_not_falling_or_off_eager(monkeypatch, capsys, wrong):
    real = kernel_table.kernels.contrastive_loss
    monkeypatch.setattr(kernel_table.kernels, "contrastive_loss", lambda *a, **k: wrong(real(*a, **k)))
    monkeypatch.setattr(kernel_table, "FUSED_MODES", ("lean:fused",))
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    try:
        assert kernel_table.check_compiled_step() is False
    finally:
        torch._dynamo.reset()
    assert "compiled step (lean:fused): FAIL;" in capsys.readouterr().out


def test_panel_sweep_sets_each_panel_size_and_restores_the_default(monkeypatch, capsys):
    # each size in MiB becomes the panel's bytes (at B = 4,096 in bf16, 2 MiB is 256 rows of
    # 8 KiB), the floor of rows drops to 128; the defaults come back, after an error too
    from kernels import _contrastive_panel as panel

    default, floor = panel.PANEL_BYTES, panel.MIN_PANEL_ROWS
    seen = []

    def measure(fn, img, txt, scale, reps):
        seen.append((panel.PANEL_BYTES, panel.MIN_PANEL_ROWS))
        if len(seen) == 3:
            raise RuntimeError("out of resources")
        return 1.5, 2.0

    monkeypatch.setattr(kernel_table, "measure", measure)
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    kernel_table.panel_sweep(4096, 8, (1, 2))
    assert seen == [(1 << 20, 128), (2 << 20, 128)]
    assert (panel.PANEL_BYTES, panel.MIN_PANEL_ROWS) == (default, floor)
    assert (f"panel sweep B=4096 D=8 bf16 (default {default >> 20} MiB): 1 MiB (128 rows): 1.50 ms, 2 MiB; "
            "2 MiB (256 rows): 1.50 ms, 2 MiB") in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="out of resources"):
        kernel_table.panel_sweep(4096, 8, (4,))
    assert (panel.PANEL_BYTES, panel.MIN_PANEL_ROWS) == (default, floor)


def test_measure_times_the_median_with_no_gradient_held_at_the_window(monkeypatch):
    # two warm-up steps, one step in the peak window, then the timed ones; gradients left
    # over from the warm-ups would count in the window's base and be freed by the step
    # itself, so the peak would come out one set of gradients short
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    img, txt, scale = kernel_table.inputs(8, 4)
    calls, held = [], []
    monkeypatch.setattr(kernel_table, "reset_peak", lambda: held.append(img.grad is not None) or 0)
    monkeypatch.setattr(kernel_table, "peak_since", lambda base: 7.0)
    times = iter([5.0, 1.0, 2.0, 100.0, 3.0])
    monkeypatch.setattr(kernel_table, "timed_ms", lambda fn: (fn(), next(times))[1])
    ms, peak = kernel_table.measure(lambda *a: calls.append(1) or kernel_table.plain_loss(*a), img, txt, scale, 5)
    assert (ms, peak) == (3.0, 7.0) and held == [False] and len(calls) == 2 + 1 + 5


def test_peak_and_time_on_cuda_from_fake_counters(monkeypatch):
    # the host-side arithmetic of the CUDA paths: MiB beyond the window's base, and
    # milliseconds between two CUDA events
    state = {"now": 100 << 20, "peak": 500 << 20}
    cuda = kernel_table.torch.cuda
    monkeypatch.setattr(kernel_table, "DEV", "cuda")
    monkeypatch.setattr(cuda, "synchronize", lambda: None)
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda: state.update(peak=state["now"]))
    monkeypatch.setattr(cuda, "memory_allocated", lambda: state["now"])
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda: state["peak"])
    base = kernel_table.reset_peak()
    assert base == 100 << 20 and state["peak"] == base  # the old peak is forgotten
    state["peak"] += 48 << 20
    assert kernel_table.peak_since(base) == 48.0

    class Event:
        clock = 0.0

        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = Event.clock

        def elapsed_time(self, end):
            return end.at - self.at

    monkeypatch.setattr(cuda, "Event", Event)
    assert kernel_table.timed_ms(lambda: setattr(Event, "clock", 2.5)) == 2.5


def test_time_on_the_cpu_is_milliseconds_of_the_wall_clock(monkeypatch):
    clock = iter([10.0, 10.25])
    monkeypatch.setattr(kernel_table.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    assert kernel_table.timed_ms(lambda: None) == 250.0


def test_huge_reports_gib_and_fails_on_a_loss_alone_not_finite(monkeypatch, capsys):
    real = kernel_table.fused
    monkeypatch.setattr(kernel_table, "fused", lambda mode: lambda *a, **k: (lambda loss: loss + float("nan") * loss.detach())(real(mode)(*a, **k)))
    monkeypatch.setattr(kernel_table, "peak_since", lambda base: 1536.0)  # MiB
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    assert kernel_table.huge(64, 16) is False  # the gradients are finite, the loss is not
    out = capsys.readouterr().out
    assert "lean B=64 D=16 bf16: " in out and "peak extra 1.50 GiB, loss nan, finite: FAIL" in out


SECTIONS = ("check_compiled_step", "check_accuracy", "check_lean_memory", "table", "ranks", "huge",
            "tuned_configs", "breakdown", "panel_sweep")


def _fake_sections(monkeypatch, raising=None):
    """Every section of kernel_table.main replaced by one that records its arguments."""
    calls = {}
    for name in SECTIONS:
        def fake(*args, name=name):
            calls[name] = args
            if name == raising:
                raise RuntimeError("boom")
        monkeypatch.setattr(kernel_table, name, fake)
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    return calls


FULL = [(4096, 512), (16384, 512), (32768, 512), (65536, 512), (32768, 256), (32768, 768)]


@pytest.mark.parametrize("flags,table", [([], FULL), (["--quick"], [(16384, 512), (32768, 512)]),
                                         (["--table", "16384:512,65536:256"], [(16384, 512), (65536, 256)])])
def test_kernel_table_sections_get_the_documented_sizes(monkeypatch, capsys, flags, table):
    # the module docstring's sizes: accuracy at 4,096 and 16,384, lean memory at 16,384 and
    # 32,768, breakdown at 16,384, the panel sweep at 32,768, ranks at N = 100,000, lean at
    # B = 1,048,576, all at D = 512; --quick and --table change the table alone
    calls = _fake_sections(monkeypatch)
    cuda = kernel_table.torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(kernel_table, "empty_cache", lambda: None)
    assert kernel_table.main(flags) == 0
    assert calls == {"check_compiled_step": (), "check_accuracy": ((4096, 16384), 512),
                     "check_lean_memory": ((16384, 32768), 512), "table": (table,), "ranks": (100_000, 512),
                     "huge": (1_048_576, 512), "tuned_configs": (), "breakdown": (16384, 512),
                     "panel_sweep": (32768, 512, (16, 32, 56, 64, 96))}
    assert kernel_table.LINES[0] == f"device: Fake GPU (torch {torch.__version__})"
    capsys.readouterr()


@pytest.mark.parametrize("bad", ["0:512", "16384", "16384:512:1", "16384:x", "16384:512,", "16384:-512"])
def test_kernel_table_refuses_a_malformed_table(monkeypatch, capsys, bad):
    calls = _fake_sections(monkeypatch)
    with pytest.raises(SystemExit) as e:
        kernel_table.main(["--dry-run", "--table", bad])
    assert e.value.code == 2 and not calls
    assert (f"--table: expected B:D pairs of positive integers, comma-separated, got {bad!r}"
            in capsys.readouterr().err)


def test_a_section_that_raises_fails_the_run_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    # priority order: a section raising is recorded (in --out too) and the later ones still
    # report; --out starts empty each run, in a folder made for it
    calls = _fake_sections(monkeypatch, raising="check_accuracy")
    out = tmp_path / "new" / "table.md"
    out.parent.mkdir()
    out.write_text("a line of an earlier run\n")
    assert kernel_table.main(["--dry-run", "--table", "40:16", "--out", str(out)]) == 1
    assert set(calls) == set(SECTIONS) and calls["table"] == ([(40, 16)],)
    assert out.read_text().splitlines() == ["device: CPU dry run (nothing measured) (torch " + torch.__version__ + ")",
                                            "accuracy: FAILED with RuntimeError: boom"]
    nested = tmp_path / "a" / "b" / "table.md"  # a folder that does not exist yet
    assert kernel_table.main(["--dry-run", "--out", str(nested)]) == 1 and nested.is_file()
    capsys.readouterr()



def test_a_refused_table_leaves_the_out_file_of_an_earlier_run(tmp_path, capsys, monkeypatch):
    # the arguments are checked before --out is emptied
    monkeypatch.setattr(kernel_table, "OUT", None)
    out = tmp_path / "table.md"
    out.write_text("a line of an earlier run\n")
    with pytest.raises(SystemExit) as e:
        kernel_table.main(["--dry-run", "--out", str(out), "--table", "0:512"])
    assert e.value.code == 2 and out.read_text() == "a line of an earlier run\n"


def test_table_columns_line_up_with_the_header(monkeypatch):
    monkeypatch.setattr(kernel_table, "measure", lambda *a: (0.02, 123.4))
    monkeypatch.setattr(kernel_table, "inputs", lambda b, d: ((b, d), None, None))
    monkeypatch.setattr(kernel_table, "OUT", None)
    monkeypatch.setattr(kernel_table, "DEV", "cpu")
    kernel_table.LINES.clear()
    kernel_table.table([(64, 48)])
    header, row = kernel_table.LINES[1:3]
    bars = lambda line: [m.start() for m in re.finditer(r"\|", line)]
    assert bars(row) == bars(header)[:len(bars(row))] and len(bars(row)) == len(bars(header))
