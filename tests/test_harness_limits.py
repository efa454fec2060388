"""The harness's limits on the training process: work after the budget, a packed step or
training while encoding refused; a slowed machine allowed; the harness's own clock on the
process, which a recipe cannot slow."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from train_support import small_recipe as recipe

from eclip import harness as h
from eclip import harness_eval as he
from eclip.errors import EclipError
from eclip.process import child

ROOT = Path(__file__).resolve().parents[1]


# Training outside the clock: after the last step (in what the checkpoint calls) and while
# encoding. Both sleep where a cheat would train; the limits are lowered to keep the test short.
AFTER_THE_BUDGET = """

import time as _time

_plain_build_model = build_model


def build_model(spec):
    model = _plain_build_model(spec)
    count = model.flops_per_sample
    model.flops_per_sample = lambda *a: (_time.sleep(3), count(*a))[1]
    return model
"""


WHILE_ENCODING = """

import time as _time

_plain_build_model = build_model


def _train_on(seconds):  # what training in the encoder would cost: compute on all threads
    a, t0 = torch.randn(256, 256), _time.monotonic()
    while _time.monotonic() - t0 < seconds:
        a = torch.tanh(a @ a)


def build_model(spec):
    model = _plain_build_model(spec)
    encode = model.encode_text
    model.encode_text = lambda t, m: encode(t, m) if model.training else (_train_on(120), encode(t, m))[1]
    return model
"""


ONE_LONG_STEP = """

import time as _time

_plain_step = train_step


def train_step(model, optimizer, batch, progress):
    if not _STATE.get("packed"):  # many updates in one call: the clock is checked between calls
        _STATE["packed"], t0 = True, _time.monotonic()
        while _time.monotonic() - t0 < 3:
            _plain_step(model, optimizer, batch, progress)
    return _plain_step(model, optimizer, batch, progress)
"""


# The messages name the guard that refused the run, not exact durations: on a loaded machine
# (a CI runner, or two test processes on 2 cores) the long step runs past 3 s, and the slowed
# evaluation may reach the wall-time guard before the compute-time one.
@pytest.mark.parametrize("extra,grace,message", [
    (ONE_LONG_STEP, ("eclip.harness.OVERRUN_GRACE_S", 1.0), r"training ran \d+\.\d s on a budget of 1 s"),
    (AFTER_THE_BUDGET, ("eclip.harness.AFTER_GRACE_S", 1.0), r"the recipe's code ran \d+\.\d s after the budget ended"),
    # both the captions' process and the batch check's encode captions: either is caught first
    (WHILE_ENCODING, ("eclip.harness_eval.EVAL_GRACE_S", 8.0),
     r"evaluation \(eclip.encode, (texts|batch_check)\) (computed for longer than 8 s|took longer than \d+ s of wall time)"),
])
def test_work_outside_the_budget_is_refused(small_cache, tmp_path, monkeypatch, capsys, extra, grace, message):
    import time

    monkeypatch.setattr(h, "check_file", lambda path: [])  # the policy refuses the import of time
    monkeypatch.setattr(*grace)
    out = tmp_path / "run"
    t0 = time.monotonic()
    rc = h.main(["run", "--recipe", str(recipe(tmp_path, extra=extra)), "--data", str(small_cache),
                 "--budget-s", "1", "--out", str(out), "--device", "cpu"])
    assert rc == 1 and time.monotonic() - t0 < 60  # the sleeping encoder was killed, not awaited
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "error" and r["val_mean_rank"] is None, r["reason"]
    assert re.search(message, r["reason"]), r["reason"]
    assert not any(f.exists() for part in he.PARTS for f in he.part_files(out, part))


@pytest.mark.parametrize("cpu,threads,refused", [
    (0.8, 2, False),  # 16 s of wall time, 0.4 s of compute: a busy machine slowed the last step
    (12.0, 2, True),  # 6 s of compute past the budget: more than one step's work
    (0.8, None, True),  # a GPU run: CPU time does not show the device's work, wall time counts
    (None, 2, True),  # a result without the figure
])
def test_a_last_step_slowed_by_a_busy_machine_is_not_refused(cpu, threads, refused):
    result = {"train_s": 16.0, "steps": 40, "after_s": 0.01, "last_step_cpu_s": cpu}
    if refused:
        computed = ", its last step computed 6.0 s over 2 threads" if cpu == 12.0 else ""
        with pytest.raises(EclipError, match=re.escape(f"training ran 16.0 s on a budget of 10 s (a step may end at "
                                                       f"most 5 s late{computed}); one train_step must be one step")):
            h.check_after(result, 10.0, threads)
    else:
        h.check_after(result, 10.0, threads)


def test_a_slowed_last_step_still_has_a_wall_clock_cap():
    # compute a process's CPU time does not show (a GPU's, were one reachable) cannot stretch
    # the last step without end: three times the grace in wall time at most
    ok = {"train_s": 24.9, "steps": 40, "after_s": 0.01, "last_step_cpu_s": 0.1}
    h.check_after(ok, 10.0, 2)
    with pytest.raises(EclipError, match=re.escape("training ran 25.1 s on a budget of 10 s")):
        h.check_after(dict(ok, train_s=25.1), 10.0, 2)


def test_a_result_without_after_s_is_refused_and_a_long_budget_allows_its_share_of_overrun():
    with pytest.raises(EclipError, match="the recipe's code ran an unknown time after the budget ended"):
        h.check_after({"train_s": 10.0, "steps": 40}, 10.0)
    # 5% of a 200 s budget (10 s) beyond the 5 s grace; past it, refused
    h.check_after({"train_s": 209.0, "steps": 400, "after_s": 0.0}, 200.0)
    with pytest.raises(EclipError, match=re.escape("a step may end at most 10 s late")):
        h.check_after({"train_s": 211.0, "steps": 400, "after_s": 0.0}, 200.0)


def test_child_times_the_process_from_its_ready_line_and_passes_the_rest_on(capfd):
    code = ("import time; print('before', flush=True); print('train: ready', flush=True); time.sleep(0.3); "
            "print('train: ready', flush=True); print('after', flush=True)")  # a second ready line is output
    rc, seconds = child([sys.executable, "-c", code], None, ready="train: ready")
    assert rc == 0 and 0.3 <= seconds < 30
    assert capfd.readouterr().out.splitlines() == ["before", "train: ready", "after"]
    assert child([sys.executable, "-c", "raise SystemExit(3)"], None, ready="train: ready") == (3, None)
    with pytest.raises(EclipError, match=r"^the training process did not say when the recipe's import began"):
        h.check_wall(None, 10.0)


def test_work_after_the_clock_that_the_run_does_not_report_is_timed_by_the_harness(small_cache, tmp_path, monkeypatch,
                                                                                  capsys):
    # an exit hook that works on after the budget: code past the recipe check could also
    # misreport the figures the training process writes; the harness's own clock sees it
    monkeypatch.setattr(h, "check_file", lambda path: [])  # as an evasion of the check would
    monkeypatch.setattr(h, "RECIPE_WALL_SLACK_S", 4.0)  # the budget, 5 s of overrun, 3 after, 4 s
    monkeypatch.chdir(ROOT)
    slow = recipe(tmp_path, extra="\n\nimport atexit as _a, time as _t\n_a.register(lambda: _t.sleep(20))\n")
    out = tmp_path / "run"
    argv = ["run", "--recipe", str(slow), "--data", str(small_cache), "--budget-s", "1", "--out", str(out), "--device", "cpu"]
    assert h.main(argv) == 1
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "error" and r["val_mean_rank"] is None and r["recipe_wall_s"] > 20
    limit = h.wall_limit(1.0, (small_cache / "images.safetensors").stat().st_size
                         + (out / "checkpoint.safetensors").stat().st_size)
    assert 13 < limit < 14  # the data and the checkpoint: a few MB at 100 MB/s
    assert re.fullmatch(r"the training process ran \d+ s from the recipe's import to its end, on a budget of 1 s "
                        rf"\(at most {limit:.0f} s, timed by the harness\); work outside train_step is not training "
                        r"time", r["reason"]), r["reason"]
    # the same recipe without the hook: within the bound, and the figure is reported
    assert h.main(["run", "--recipe", str(recipe(tmp_path)), *argv[3:]]) == 0
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "ok" and 1 <= r["recipe_wall_s"] <= limit


def test_a_recipe_that_slows_the_loops_clock_is_caught_by_the_harnesss_own(small_cache, tmp_path, monkeypatch):
    # found by a review: code past the check made the training loop's clock run 25 times
    # slow (75 s of training reported as 3, every figure check_after reads in order)
    monkeypatch.setattr(h, "check_file", lambda path: [])  # as an evasion of the check would
    monkeypatch.setattr(h, "RECIPE_WALL_SLACK_S", 4.0)
    monkeypatch.chdir(ROOT)
    slowed = recipe(tmp_path, extra=("\n\nimport time as _t\n_real = _t.perf_counter\n_base = _real()\n"
                                     "_t.perf_counter = lambda: _base + (_real() - _base) / 20.0\n"))
    out = tmp_path / "run"
    assert h.main(["run", "--recipe", str(slowed), "--data", str(small_cache), "--budget-s", "1", "--out", str(out),
                   "--device", "cpu"]) == 1
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "error" and r["val_mean_rank"] is None and r["recipe_wall_s"] > 20
    assert r["train_s"] < 1 + 5  # what the process reported: within its budget
    assert r["reason"].startswith("the training process ran ")


def test_a_child_past_its_deadline_is_killed():
    code = "print('train: ready', flush=True); import time; time.sleep(120)"
    rc, seconds = child([sys.executable, "-c", code], None, ready="train: ready", deadline_s=1.0)
    assert rc == -9 and 1.0 < seconds < 30


def test_a_child_still_running_after_a_sigterm_is_killed_after_the_grace():
    # a child that ignores the SIGTERM passed on (a step that never returns, in effect); the
    # deadline, hours away on a long budget, is not what ends it
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('train: ready', flush=True); time.sleep(120)")
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    killed: list[str] = []
    heard: list[int] = []
    timer.start()
    try:
        rc, seconds = child([sys.executable, "-c", code], None, ready="train: ready", deadline_s=3600.0,
                            signals=heard, stop_grace_s=1.0, killed=killed)
    finally:
        timer.cancel()
    assert rc == -signal.SIGKILL and killed == ["grace"] and heard == [signal.SIGTERM]
    assert 1.0 < seconds < 60


def test_a_child_that_never_says_it_is_ready_is_killed_after_its_start_limit():
    # a start-up that hangs (before the ready line, from which the deadline counts) once held
    # the harness for ever
    killed: list[str] = []
    rc, seconds = child([sys.executable, "-c", "import time; time.sleep(120)"], None, ready="train: ready",
                        deadline_s=3600.0, start_s=1.0, killed=killed)
    assert rc == -signal.SIGKILL and killed == ["start"] and seconds is None


def test_the_start_limit_ends_with_the_ready_line():
    killed: list[str] = []
    code = "import time; print('train: ready', flush=True); time.sleep(3)"
    rc, seconds = child([sys.executable, "-c", code], None, ready="train: ready", deadline_s=60.0, start_s=1.0,
                        killed=killed)
    assert rc == 0 and killed == [] and seconds > 2


def test_a_training_process_that_does_not_start_in_time_ends_in_an_error(small_cache, tmp_path, monkeypatch):
    # the limit made so short that the interpreter's start-up overruns it: as a hang would
    monkeypatch.setattr(h, "START_LIMIT_S", 0.01)
    monkeypatch.setattr(h, "IO_BYTES_PER_S", 1e15)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    t0 = time.monotonic()
    assert h.main(["run", "--recipe", str(recipe(tmp_path)), "--data", str(small_cache), "--budget-s", "60",
                   "--out", str(out), "--device", "cpu"]) == 1
    assert time.monotonic() - t0 < 30  # killed, not trained for the 60 s budget
    assert json.loads((out / "result.json").read_text()) == {"status": "error", "val_mean_rank": None, "reason": (
        "the training process did not start within 0 s (its imports and the reading of the cache, before the "
        "recipe's import) and was killed")}
    assert not (out / "checkpoint.safetensors").exists()


def test_a_child_that_ends_on_its_own_is_not_said_to_be_killed():
    killed: list[str] = []
    code = "print('train: ready', flush=True)"
    assert child([sys.executable, "-c", code], None, ready="train: ready", deadline_s=60.0, stop_grace_s=1.0,
                 killed=killed)[0] == 0
    assert killed == []


def test_a_harness_told_to_stop_during_a_step_that_never_returns_ends_interrupted(small_cache, tmp_path,
                                                                                   monkeypatch):
    # before, the stopped run held the harness until its deadline (the budget and more: here
    # some 4 minutes, a bound on the test should this regress)
    monkeypatch.setattr(h, "STOP_GRACE_S", 1.0)
    monkeypatch.setattr(h, "check_file", lambda path: [])  # the step marks its start in a file
    monkeypatch.chdir(ROOT)
    started = tmp_path / "started"  # written by the step, which then never returns
    hang = recipe(tmp_path, extra=("\n\ndef train_step(model, optimizer, batch, progress):\n"
                                   f"    open({str(started)!r}, 'w').close()\n    while True:\n        pass\n"))
    done = threading.Event()

    def stop_once_hung() -> None:  # never once the harness has returned: the signal would end pytest
        while not started.exists() and not done.wait(0.1):
            pass
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "run"
    stopper = threading.Thread(target=stop_once_hung, daemon=True)
    stopper.start()
    t0 = time.monotonic()
    try:
        rc = h.main(["run", "--recipe", str(hang), "--data", str(small_cache), "--budget-s", "60", "--out",
                     str(out), "--device", "cpu"])
    finally:
        done.set()
        stopper.join()
    assert started.exists() and time.monotonic() - t0 < 150
    assert json.loads((out / "result.json").read_text()) == {"status": "interrupted", "val_mean_rank": None,
                                                             "reason": (
        "the training process was still running 9 s after it was told to stop, and was killed "
        "(a step that never returns?)")}  # 1 s, a last step's 5 s of overrun and 3 s after it
    assert rc == 130


def test_a_step_that_never_returns_ends_in_a_timeout(small_cache, tmp_path, monkeypatch):
    # used directly (no loop's time limit around it), the harness once waited for ever, a
    # SIGTERM included: the training process ends its step before it stops
    monkeypatch.setattr(h, "RECIPE_WALL_SLACK_S", 2.0)
    monkeypatch.setattr(h, "DEADLINE_MARGIN_S", 1.0)  # the budget, 5 s of overrun, 3 after, 2 s, 1 s
    monkeypatch.chdir(ROOT)
    hang = recipe(tmp_path, extra="\n\ndef train_step(model, optimizer, batch, progress):\n    while True:\n        pass\n")
    out = tmp_path / "run"
    assert h.main(["run", "--recipe", str(hang), "--data", str(small_cache), "--budget-s", "1", "--out", str(out),
                   "--device", "cpu"]) == 1
    r = json.loads((out / "result.json").read_text())
    deadline = h.wall_limit(1.0, (small_cache / "images.safetensors").stat().st_size) + 1.0
    assert r == {"status": "timeout", "val_mean_rank": None, "reason": (
        f"the training process was still running {deadline:.0f} s after the recipe's import, on a budget of 1 s, and "
        "was killed (a step that never returns?)")}


def test_a_line_without_end_on_stdout_holds_no_memory_in_the_harness():
    # found by a review: a recipe printing 760 MB without a newline grew the harness to 2.4 GB
    # (the line held whole, then copied); now it is relayed in pieces. In a fresh process,
    # whose peak memory is the relay's alone (VmHWM: ru_maxrss would count pytest's, which it
    # carries through the fork and exec); its stdout goes nowhere.
    code = ("import sys; from eclip.process import child; "
            "printer = \"import sys; [sys.stdout.write('x' * (1 << 20)) for _ in range(300)]; print('train: ready')\"; "
            "rc, _ = child([sys.executable, '-c', printer], None, ready='train: ready'); "
            "peak = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')); "
            "print(rc, peak, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, check=True)
    rc, peak_kb = map(int, done.stderr.split())
    assert rc == 0 and peak_kb < 150_000  # 300 MB went through; the line held whole: 690 MB


def test_relay_takes_the_ready_line_only_at_a_lines_start(monkeypatch, capfd):
    # pieces of at most LINE_CHARS: the ready line at the end of a longer line is output
    from eclip import process

    monkeypatch.setattr(process, "LINE_CHARS", 16)
    # 'x' * 16 fills a piece: the next piece is the ready line's words, at no line's start
    code = "print('x' * 16 + 'train: ready'); print('y' * 40); print('train: ready'); print('after')"
    rc, seconds = child([sys.executable, "-c", code], None, ready="train: ready")
    assert rc == 0 and seconds is not None
    assert capfd.readouterr().out == "x" * 16 + "train: ready\n" + "y" * 40 + "\nafter\n"


def test_an_encoders_error_is_read_from_the_end_of_its_log(tmp_path, read_sizes):
    log = tmp_path / "images.log"
    log.write_text("x" * (1 << 20) + "\nencode: error: --batch-size: must be positive\nTraceback\n")
    assert he.encode_error("images", 2, log) == "evaluation (eclip.encode, images) failed: --batch-size: must be positive"
    assert read_sizes and all(0 < n <= 65536 + 1 for n in read_sizes)  # the window and the byte before it
    log.unlink()
    log.symlink_to(tmp_path / "elsewhere")
    assert he.encode_error("texts", 1, log) == "evaluation (eclip.encode, texts) failed: exit code 1"


def test_an_encoders_stderr_that_is_not_utf8_is_passed_on_replaced(tmp_path, capsys):
    # a review: one byte that is not UTF-8, written by the recipe's code in an encoder, made
    # the copy of its log raise, hiding the run's outcome
    code = "import sys; sys.stderr.buffer.write(b'\\xff odd\\n'); sys.stderr.flush()"
    logs = {"images": tmp_path / "eval_images.log"}
    assert he.encode_parts({"images": [sys.executable, "-c", code]}, logs, 60.0, None) == {"images": 0}
    assert capsys.readouterr().err == "\ufffd odd\n"


def test_child_passes_stderr_on_byte_for_byte_and_keeps_its_last_lines(capfd):
    # a progress bar's carriage returns and bytes that are not UTF-8 reach the terminal as
    # they were; the tail (the reason of a run without a result) is the last lines
    code = ("import sys; w = sys.stderr.buffer.write; w(b'bar 1/2\\rbar 2/2\\n'); w(b'\\xff odd\\n'); "
            "w(b'x' * 10000 + b'\\n'); w(b'train: error: the end\\n')")
    tail: list[str] = []
    assert child([sys.executable, "-c", code], None, stderr_tail=tail) == 0
    err = capfd.readouterr().err
    assert err.startswith("bar 1/2\rbar 2/2\n") and " odd\n" in err and err.endswith("train: error: the end\n")
    assert tail[-1] == "train: error: the end" and tail[0] != "bar 1/2"  # the first lines fell out of the last 4 KB
    assert all(len(line) <= 4096 for line in tail)


def test_child_is_never_blocked_by_a_stderr_that_fails(monkeypatch):
    # a reader gone (| head): the copying stops, the draining goes on, the child ends
    class Gone:
        def write(self, text):
            raise BrokenPipeError

        def flush(self):
            raise BrokenPipeError

    monkeypatch.setattr(sys, "stderr", Gone())
    code = "import sys; [sys.stderr.write('y' * 999 + '\\n') for _ in range(500)]; sys.stderr.write('last\\n')"
    tail: list[str] = []
    assert child([sys.executable, "-c", code], None, stderr_tail=tail) == 0  # 500 KB: far past a pipe's buffer
    assert tail[-1] == "last"
