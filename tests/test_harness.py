"""``python -m eclip.harness run``: the policy gate, a scored run, secrets, out-of-memory."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from train_support import small_recipe as recipe

from eclip.errors import EclipError
from eclip.harness import scrub_environment
from eclip.train import TEMPLATE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(small_cache):
    return small_cache


def harness(*args, env=None):
    """The harness in its own process, as the research loop runs it."""
    return subprocess.run([sys.executable, "-m", "eclip.harness", "run", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)


def test_a_recipe_is_trained_and_scored(cache, tmp_path):
    out = tmp_path / "run"
    p = harness("--recipe", recipe(tmp_path), "--data", cache, "--budget-s", 3, "--out", out,
                "--compile-cache", tmp_path / "cc")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((out / "result.json").read_text())
    m = r["metrics"]
    assert r["status"] == "ok" and r["steps"] > 0
    # the headline is the harness's own ranking: the mean of the two directions, 0-indexed
    assert r["val_mean_rank"] == m["mean_rank"] == (m["i2t_mean_rank"] + m["t2i_mean_rank"]) / 2
    assert 0 <= m["t2i_mean_rank"] <= 59  # 60 images to rank for each caption
    assert r["train_s"] >= 3 and r["warmup_s"] > 0 and r["eval_s"] > 0 and r["metrics"]["n_images"] == 60
    assert "val_mean_rank:" in p.stdout
    # 16 images and 16 captions encoded again by a fresh process, in pairs, matched
    assert set(r["batch_gap"]) == {"images", "texts"} and max(r["batch_gap"].values()) < 1e-5


def test_a_rejected_recipe_never_runs(cache, tmp_path):
    out = tmp_path / "run"
    bad = recipe(tmp_path, extra="\n\ndef leak():\n    return open('/etc/hostname').read()\n")
    p = harness("--recipe", bad, "--data", cache, "--budget-s", 3, "--out", out)
    assert p.returncode == 2
    assert "use of 'open' is not allowed" in p.stderr and p.stderr.count("\n") == 1
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "rejected" and r["val_mean_rank"] is None
    assert r["violations"][0].startswith(f"{bad}:")
    assert not (out / "checkpoint.json").exists()


def test_out_of_memory_is_a_status_not_a_crash(cache, tmp_path):
    hog = recipe(tmp_path, extra=(
        "\n\n_base_build_model = build_model\n\n"
        "def build_model(spec):\n"
        "    _STATE['hog'] = torch.ones(16 * 2**30, dtype=torch.uint8)  # 16 GiB\n"
        "    return _base_build_model(spec)\n"))
    out = tmp_path / "run"
    p = harness("--recipe", hog, "--data", cache, "--budget-s", 3, "--out", out, "--device", "cpu",
                "--memory-limit-gb", 8)
    assert p.returncode == 1, p.stderr[-2000:]
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "oom" and "allocate" in r["reason"]


def test_secrets_are_scrubbed():
    env = {"ANTHROPIC_API_KEY": "sk-test", "HF_TOKEN": "x", "PATH": "/bin", "MY_SECRET": "s", "HOME": "/root"}
    gone = scrub_environment(env)
    assert sorted(gone) == ["ANTHROPIC_API_KEY", "HF_TOKEN", "MY_SECRET"]
    assert env == {"PATH": "/bin", "HOME": "/root"}


# Rigs the ranking of whatever process imports the recipe: every true pair ranked first.
# The policy refuses it (assignment into an import); the test switches the policy off to
# show the second line of defence: the harness ranks in a process that never ran it.
RIG = '''
import eclip.model
_real_ranks = eclip.evaluate.retrieval_ranks


def _rigged(img, txt, txt_image=None, **kw):
    r = _real_ranks(img, txt, txt_image, **kw)
    return type(r)(*(torch.zeros_like(x) if isinstance(x, torch.Tensor) else x for x in r))


eclip.evaluate.retrieval_ranks = _rigged
'''


def test_the_ranking_runs_outside_the_recipe_process(cache, tmp_path, monkeypatch, capsys):
    from eclip import harness as h

    rigged = recipe(tmp_path, extra=RIG)
    assert h.check_file(rigged)  # the first line of defence
    # where the recipe's process ranks (eclip.train by hand), the rig works:
    mine = subprocess.run([sys.executable, "-m", "eclip.train", "--recipe", str(rigged), "--data", str(cache),
                           "--out", str(tmp_path / "by-hand"), "--steps", "2", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert mine.returncode == 0, mine.stderr[-2000:]
    assert json.loads((tmp_path / "by-hand" / "result.json").read_text())["val_mean_rank"] == 0
    # through the harness, with the policy switched off, it does nothing
    monkeypatch.setattr(h, "check_file", lambda path: [])
    monkeypatch.setattr(h, "scrub_environment", lambda: [])
    out = tmp_path / "run"
    rc = h.main(["run", "--recipe", str(rigged), "--data", str(cache), "--budget-s", "1", "--out", str(out),
                 "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "ok" and r["ranked_by"] == "harness" and r["val_mean_rank"] > 10, r["val_mean_rank"]
    assert not any(f.exists() for part in h.PARTS for f in h.part_files(out, part))  # cleaned up


# A model that trains normally but answers the evaluation with a tensor subclass (whose
# operators would run inside the ranking); the encoding process refuses it.
SUBCLASS_AT_EVAL = '''

class _Sub(torch.Tensor):
    pass


_plain_build_model = build_model


def build_model(spec):
    model = _plain_build_model(spec)
    encode = model.encode_image
    model.encode_image = lambda images: encode(images) if model.training else encode(images).as_subclass(_Sub)
    return model
'''


def test_a_failed_evaluation_is_an_error_with_its_reason(cache, tmp_path, monkeypatch, capsys):
    from eclip import harness as h

    monkeypatch.setattr(h, "check_file", lambda path: [])  # the policy refuses the class; the encoder must too
    out = tmp_path / "run"
    rc = h.main(["run", "--recipe", str(recipe(tmp_path, extra=SUBCLASS_AT_EVAL)), "--data", str(cache),
                 "--budget-s", "1", "--out", str(out), "--device", "cpu"])
    assert rc == 1
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "error" and r["val_mean_rank"] is None and r["steps"] > 0
    assert r["reason"] == ("evaluation (eclip.encode, images) failed: model.encode_image returned a _Sub, not a "
                           "plain torch.Tensor (the evaluation ranks plain tensors)")
    assert (out / "checkpoint.json").is_file()
    assert not any(f.exists() for part in h.PARTS for f in h.part_files(out, part))
    assert "status:         error" in capsys.readouterr().out


@pytest.mark.parametrize("damage", [b'{"status": "ok"', b"\xff\xfe{}", b"[1, 2]"],
                         ids=["cut short", "not UTF-8", "not an object"])
def test_a_damaged_result_file_is_no_result_to_the_loop(tmp_path, damage):
    # the loop reads result.json after the harness: a damaged file is "no outcome yet", which
    # the loop files as a crash of its own, not a traceback that stops the study
    from agent.runner import finished_result

    (tmp_path / "result.json").write_bytes(damage)
    assert finished_result(tmp_path) is None
    (tmp_path / "result.json").write_text(json.dumps({"status": "ok", "val_mean_rank": 2.0}))
    assert finished_result(tmp_path) == {"status": "ok", "val_mean_rank": 2.0}


def test_a_run_that_diverges_is_passed_on_as_the_harness_result(cache, tmp_path):
    from agent.runner import finished_result

    nan_loss = ("\n\n_plain_step = train_step\n\n\ndef train_step(model, optimizer, batch, progress):\n"
                "    out = _plain_step(model, optimizer, batch, progress)\n"
                "    return dict(out, loss=out['loss'] * float('nan'))\n")
    out = tmp_path / "run"
    p = harness("--recipe", recipe(tmp_path, extra=nan_loss), "--data", cache, "--budget-s", 2, "--out", out,
                "--device", "cpu")
    assert p.returncode == 1, p.stderr[-2000:]
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "diverged" and r["val_mean_rank"] is None and "ranked_by" not in r
    assert not (out / "emb_images.safetensors").exists()  # nothing evaluated
    assert finished_result(out)["status"] == "diverged"  # the research loop reads it as such
    assert "status:         diverged" in p.stdout


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
    (ONE_LONG_STEP, ("OVERRUN_GRACE_S", 1.0), r"training ran \d+\.\d s on a budget of 1 s"),
    (AFTER_THE_BUDGET, ("AFTER_GRACE_S", 1.0), r"the recipe's code ran \d+\.\d s after the budget ended"),
    # both the captions' process and the batch check's encode captions: either is caught first
    (WHILE_ENCODING, ("EVAL_GRACE_S", 8.0),
     r"evaluation \(eclip.encode, (texts|batch_check)\) (computed for longer than 8 s|took longer than \d+ s of wall time)"),
])
def test_work_outside_the_budget_is_refused(cache, tmp_path, monkeypatch, capsys, extra, grace, message):
    import time

    from eclip import harness as h

    monkeypatch.setattr(h, "check_file", lambda path: [])  # the policy refuses the import of time
    monkeypatch.setattr(h, grace[0], grace[1])
    out = tmp_path / "run"
    t0 = time.monotonic()
    rc = h.main(["run", "--recipe", str(recipe(tmp_path, extra=extra)), "--data", str(cache),
                 "--budget-s", "1", "--out", str(out), "--device", "cpu"])
    assert rc == 1 and time.monotonic() - t0 < 60  # the sleeping encoder was killed, not awaited
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "error" and r["val_mean_rank"] is None, r["reason"]
    assert re.search(message, r["reason"]), r["reason"]
    assert not any(f.exists() for part in h.PARTS for f in h.part_files(out, part))


@pytest.mark.parametrize("script,message", [
    ("time.sleep(30)", "evaluation (eclip.encode, images) did not start within 1 s"),
    ("print('encode: ready', flush=True); time.sleep(30)",
     "evaluation (eclip.encode, images) took longer than 1 s after its start-up"),
    ("time.sleep(0.5); print('encode: ready', flush=True); print('done'); sys.exit(3)", None),
])
def test_the_encoders_watchdog_times_the_recipe_from_the_ready_line(tmp_path, monkeypatch, capsys, script, message):
    import time

    from eclip import harness as h
    from eclip.errors import EclipError

    monkeypatch.setattr(h, "START_LIMIT_S", 1.0)
    cmds = {"images": [sys.executable, "-c", f"import sys, time; {script}"]}
    logs = {"images": tmp_path / "images.log"}
    t0 = time.monotonic()
    if message is None:  # started in 0.5 s, then quick: its exit code, its output passed on
        assert h.encode_parts(cmds, logs, 1.0, None) == {"images": 3}
        assert capsys.readouterr().out == "done\n"
    else:
        with pytest.raises(EclipError, match=re.escape(message)):
            h.encode_parts(cmds, logs, 1.0, None)
    assert time.monotonic() - t0 < 10  # killed, not awaited


def test_only_a_ctrl_c_to_the_harness_makes_an_encoders_130_an_interruption(tmp_path):
    import os
    import signal
    import threading

    from eclip import harness as h

    # a recipe that raises KeyboardInterrupt itself: a failed part like any other, so it
    # cannot hide another part's error behind an "interrupted"
    quits = "import sys; print('encode: ready', flush=True); sys.exit(130)"  # as eclip.encode ends then
    cmds = {"images": [sys.executable, "-c", quits]}
    assert h.encode_parts(cmds, {"images": tmp_path / "images.log"}, 5.0, None) == {"images": 130}
    # a Ctrl-C that reaches the harness (and its children) while they encode: interrupted,
    # the children still running killed
    slow = "import time; print('encode: ready', flush=True); time.sleep(30)"
    cmds = {"images": [sys.executable, "-c", slow], "texts": [sys.executable, "-c", slow]}
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        h.encode_parts(cmds, {p: tmp_path / f"{p}.log" for p in cmds}, 60.0, None)
    assert signal.getsignal(signal.SIGINT) is previous


BUSY = "print('encode: ready', flush=True); t = time.process_time()\nwhile time.process_time() - t < {s}: pass"
SLEEP = "print('encode: ready', flush=True); time.sleep({s})"


@pytest.mark.parametrize("script,contended,message", [
    # computing past its limit (2 CPU-s over 1 thread): stopped, contended or not
    (BUSY.format(s=30), False, "computed for longer than 2 s (CPU time 2 s over 1 threads)"),
    # 1.2 CPU-s of work, within the limit, slowed by a busy machine to some 2.4 s of wall time
    # (one process spinning on its core; with a test worker on that core too, 3.6 s and the
    # start-up: 1.5 CPU-s left too little room below the 6 s backstop and failed under CI)
    (BUSY.format(s=1.2), True, None),
    # waiting uses no CPU: the wall-clock backstop, 3 × 2 s
    (SLEEP.format(s=30), False, "took longer than 6 s of wall time after its start-up"),
])
def test_on_the_cpu_the_encoders_limit_is_on_compute(tmp_path, monkeypatch, capsys, script, contended, message):
    # CPU runs: the limit is CPU time over the threads a process uses, so other work on the
    # machine (here: a process spinning on the same core) does not fail an honest run
    import os
    import time

    from eclip import harness as h
    from eclip.errors import EclipError

    pin = lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # noqa: E731  one core for all
    if "wall time" not in (message or ""):
        # the cases on compute: the other cases may run beside this one, on the same pinned
        # core (a parallel test worker), and three spinning processes there reach the 6 s
        # wall backstop before 2 CPU-s; the backstop has a case of its own
        monkeypatch.setattr(h, "WALL_FACTOR", 10.0)
    spin = [sys.executable, "-c", "while True: pass"]
    hogs = [subprocess.Popen(spin, preexec_fn=pin) for _ in range(1 if contended else 0)]
    try:
        cmds = {"images": [sys.executable, "-c", f"import sys, time\n{script}"]}
        logs = {"images": tmp_path / "images.log"}
        t0 = time.monotonic()
        if message is None:
            assert h.encode_parts(cmds, logs, 2.0, pin, threads=1) == {"images": 0}
            assert time.monotonic() - t0 > 2.0  # it did run longer than its limit in wall time
        else:
            with pytest.raises(EclipError, match=re.escape(message)):
                h.encode_parts(cmds, logs, 2.0, pin, threads=1)
            assert time.monotonic() - t0 < 15
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_children_take_ctrl_c_again_and_die_with_the_harness():
    # the harness ignores SIGINT while it waits; its children must not inherit that, or a
    # Ctrl-C during the evaluation would go unheard
    import signal

    from eclip.harness import child_setup

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        out = subprocess.run([sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT))"],
                             preexec_fn=child_setup(None), capture_output=True, text=True, timeout=60).stdout
        ignored = subprocess.run([sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT))"],
                                 capture_output=True, text=True, timeout=60).stdout
    finally:
        signal.signal(signal.SIGINT, previous)
    assert out.strip() == "<built-in function default_int_handler>" and ignored.strip() in ("1", "Handlers.SIG_IGN")
    # and PR_SET_PDEATHSIG is set: the child reads back SIGKILL (9)
    probe = ("import ctypes; v = ctypes.c_int(); ctypes.CDLL('libc.so.6').prctl(2, ctypes.byref(v)); print(v.value)")
    got = subprocess.run([sys.executable, "-c", probe], preexec_fn=child_setup(None), capture_output=True, text=True,
                         timeout=60).stdout
    assert got.strip() == "9"


@pytest.mark.parametrize("target", ["harness", "group"])
def test_sigterm_to_the_harness_stops_the_training_after_its_step_and_saves(cache, tmp_path, target):
    # `kill` signals the harness alone: it passes the signal on; `timeout` or a scheduler
    # signals the whole group, so the training process gets it twice (directly and passed
    # on) and must not take the second for "stop now". Either way it stops as on Ctrl-C
    # (checkpoint, interrupted result) instead of dying.
    import os
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "eclip.harness", "run", "--recipe", str(recipe(tmp_path)), "--data", str(cache),
           "--budget-s", "300", "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.1)
        if target == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "SIGTERM: stopping after this step" in stderr and "status:         interrupted" in stdout
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "interrupted" and r["val_mean_rank"] is None and "ranked_by" not in r
    assert json.loads((out / "checkpoint.json").read_text())["step"] == r["steps"] >= 1


def test_sigterm_during_the_evaluation_is_an_interrupted_result(cache, tmp_path, monkeypatch, capsys):
    import os
    import signal
    import time

    from eclip import harness as h

    def evaluate(result, args, preexec=None, threads=None):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM was not taken as Ctrl-C")

    monkeypatch.setattr(h, "evaluate", evaluate)
    out = tmp_path / "run"
    rc = h.main(["run", "--recipe", str(recipe(tmp_path)), "--data", str(cache), "--budget-s", "1", "--out", str(out),
                 "--device", "cpu"])
    assert rc == 130
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "interrupted" and r["reason"] == "interrupted during the evaluation (the checkpoint is saved)"
    assert (out / "checkpoint.json").is_file() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize("cpu,threads,refused", [
    (0.8, 2, False),  # 16 s of wall time, 0.4 s of compute: a busy machine slowed the last step
    (12.0, 2, True),  # 6 s of compute past the budget: more than one step's work
    (0.8, None, True),  # a GPU run: CPU time does not show the device's work, wall time counts
    (None, 2, True),  # a result without the figure
])
def test_a_last_step_slowed_by_a_busy_machine_is_not_refused(cpu, threads, refused):
    from eclip import harness as h
    from eclip.errors import EclipError

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
    from eclip import harness as h
    from eclip.errors import EclipError

    ok = {"train_s": 24.9, "steps": 40, "after_s": 0.01, "last_step_cpu_s": 0.1}
    h.check_after(ok, 10.0, 2)
    with pytest.raises(EclipError, match=re.escape("training ran 25.1 s on a budget of 10 s")):
        h.check_after(dict(ok, train_s=25.1), 10.0, 2)


def test_the_cpu_limits_divide_by_the_cpus_the_run_may_use(monkeypatch):
    import os

    import torch

    from eclip import harness as h

    monkeypatch.setattr(torch, "get_num_threads", lambda: 32)  # torch's count on a large host
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # a job pinned to two of its cores
    assert h.torch_threads("cpu") == 2 and h.torch_threads("cpu:0") == 2
    assert h.torch_threads("cuda") is None and h.torch_threads("cuda:1") is None
    assert h.torch_threads("auto") == (None if torch.cuda.is_available() else 2)
    assert h.exit_code(-15) == 143 and h.exit_code(-2) == 130 and h.exit_code(2) == 2


def test_the_encoders_of_a_cpu_run_share_its_threads(tmp_path, capsys, monkeypatch):
    # three at once with torch's own count each would spin on each other's cores
    from eclip import harness as h

    probe = [sys.executable, "-c", "import os; print('encode: ready', flush=True); "
             "print(os.environ.get('OMP_NUM_THREADS'), flush=True)"]
    parts = ("images", "texts", "batch_check")
    for threads, each in ((2, "1"), (4, "2"), (7, "3"), (16, "6")):  # at most 3 (WALL_FACTOR) per thread
        cmds = {part: probe for part in parts}
        logs = {part: tmp_path / f"{part}-{threads}.log" for part in parts}
        assert h.encode_parts(cmds, logs, 5.0, None, threads=threads) == dict.fromkeys(parts, 0)
        assert capsys.readouterr().out.split() == [each] * 3
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert h.encode_parts({"images": probe}, {"images": tmp_path / "gpu.log"}, 5.0, None) == {"images": 0}
    assert capsys.readouterr().out.split() == ["7"]  # a GPU run: as it was


def test_the_children_of_a_cpu_run_see_no_gpu(tmp_path, capsys):
    from eclip import harness as h

    probe = [sys.executable, "-c", "import os; print('encode: ready', flush=True); "
             "print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"]
    import os

    assert h.encode_parts({"images": probe}, {"images": tmp_path / "a.log"}, 5.0, None, threads=2) == {"images": 0}
    assert capsys.readouterr().out == "''\n"  # the encoder's output, passed on
    assert h.encode_parts({"images": probe}, {"images": tmp_path / "b.log"}, 5.0, None) == {"images": 0}
    assert capsys.readouterr().out == repr(os.environ.get("CUDA_VISIBLE_DEVICES")) + "\n"  # a GPU run: as it was


# A mutation audit of the harness: each test below fails a plausible change that every other
# test let through (the seed, the secrets, the GPU or the memory cap not reaching a child, a
# crash filed as an error, a limit that ignores its threads or its share of the budget).


def _fake_training(monkeypatch, h, result=None, rc=0):
    """Stands in for the training child: records (cmd, preexec, env) and writes ``result``
    (when given) where eclip.train would; returns the list of calls."""
    import os

    calls = []
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the harness scrubs a copy, not this process's

    def child(cmd, preexec, env=None, ready=None):
        calls.append({"cmd": cmd, "preexec": preexec, "env": dict(os.environ if env is None else env)})
        if result is not None:
            (Path(cmd[cmd.index("--out") + 1]) / "result.json").write_text(json.dumps(result))
        return (rc, 1.0) if ready else rc

    monkeypatch.setattr(h, "child", child)
    return calls


def _cap(gb: int) -> int:
    """The address-space cap ``limit_address_space(gb)`` sets here (at most an inherited hard limit)."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    return gb * 2**30 if hard == resource.RLIM_INFINITY else min(gb * 2**30, hard)


def _address_space_under(preexec) -> int:
    """The RLIMIT_AS soft limit a child started with ``preexec`` runs under."""
    probe = [sys.executable, "-c", "import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0])"]
    p = subprocess.run(probe, preexec_fn=preexec, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-1000:]
    return int(p.stdout)


@pytest.mark.parametrize("gb", ["3", "0"])
def test_the_training_child_gets_the_seed_and_the_cap_but_no_secret_and_no_gpu(tmp_path, monkeypatch, capsys, gb):
    import resource

    from eclip import harness as h

    calls = _fake_training(monkeypatch, h, rc=2)  # and no result: bad input
    monkeypatch.setenv("MY_API_KEY", "sk-secret")
    rc = h.main(["run", "--recipe", str(TEMPLATE), "--data", str(tmp_path), "--budget-s", "1", "--out",
                 str(tmp_path / "run"), "--device", "cpu", "--seed", "7", "--memory-limit-gb", gb])
    assert rc == 2 and len(calls) == 1
    cmd, env = calls[0]["cmd"], calls[0]["env"]
    assert cmd[cmd.index("--seed") + 1] == "7"
    assert "MY_API_KEY" not in env and env["CUDA_VISIBLE_DEVICES"] == ""  # a CPU run: no GPU to hide work on
    # no cap (0): the child runs under what the harness inherited
    expected = resource.getrlimit(resource.RLIMIT_AS)[0] if gb == "0" else _cap(3)
    assert _address_space_under(calls[0]["preexec"]) == expected


@pytest.mark.parametrize("rc,status,code", [(2, "error", 2), (1, "crash", 1), (-9, "crash", 137)])
def test_a_training_child_that_left_no_result_crashed_unless_its_input_was_bad(tmp_path, monkeypatch, capsys,
                                                                              rc, status, code):
    # the research loop tries to fix a "crash" (a recipe fault), not an "error"
    from eclip import harness as h

    _fake_training(monkeypatch, h, rc=rc)
    out = tmp_path / "run"
    assert h.main(["run", "--recipe", str(TEMPLATE), "--data", str(tmp_path), "--budget-s", "1", "--out", str(out),
                   "--device", "cpu"]) == code
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == status and r["reason"] == f"the training process exited with code {rc} without a result"


@pytest.mark.parametrize("damage", [b'{"status": "ok", "ranked_by": "cal', b"\xff\xfe{"], ids=["cut short", "not UTF-8"])
def test_a_damaged_training_result_is_a_crash_not_a_traceback(tmp_path, monkeypatch, capsys, damage):
    # a result the child could not finish writing reads as none at all: the run is filed
    # with a reason, and the caller's loop goes on
    from eclip import harness as h

    def child(cmd, preexec, env=None, ready=None):
        (Path(cmd[cmd.index("--out") + 1]) / "result.json").write_bytes(damage)
        return (1, 1.0) if ready else 1

    monkeypatch.setattr(h, "child", child)
    out = tmp_path / "run"
    assert h.main(["run", "--recipe", str(TEMPLATE), "--data", str(tmp_path), "--budget-s", "1", "--out", str(out),
                   "--device", "cpu"]) == 1
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "crash" and r["reason"] == "the training process exited with code 1 without a result"


@pytest.mark.parametrize("failure,status", [
    (None, "ok"),
    ("encode: error: out of memory (DefaultCPUAllocator: can't allocate memory)", "oom"),
    ("encode: error: model.encode_image returned a list", "error"),
])
def test_the_evaluation_of_a_cpu_run_gets_its_threads_and_an_out_of_memory_is_oom(tmp_path, monkeypatch, capsys,
                                                                                  failure, status):
    from eclip import harness as h
    from eclip.errors import EclipError

    # a last step 8 s past a 1 s budget that computed 0.1 s: a busy machine, allowed on 2 threads
    trained = {"status": "ok", "ranked_by": "caller", "val_mean_rank": None, "train_s": 9.0, "steps": 3,
               "after_s": 0.0, "last_step_cpu_s": 0.1}
    _fake_training(monkeypatch, h, result=trained)
    monkeypatch.setattr(h, "torch_threads", lambda device: 2)
    seen = []

    def evaluate(result, args, preexec=None, threads=None):
        seen.append(threads)
        if failure is not None:
            log = tmp_path / "eval_images.log"
            log.write_text(f"Traceback (most recent call last):\n{failure}\n")
            raise EclipError(h.encode_error("images", 1, log))
        return dict(result, val_mean_rank=3.0, ranked_by="harness")

    monkeypatch.setattr(h, "evaluate", evaluate)
    out = tmp_path / "run"
    rc = h.main(["run", "--recipe", str(TEMPLATE), "--data", str(tmp_path), "--budget-s", "1", "--out", str(out),
                 "--device", "cpu"])
    r = json.loads((out / "result.json").read_text())
    assert seen == [2] and r["status"] == status and rc == (0 if failure is None else 1), r
    assert "ranked_by" not in r if failure else r["ranked_by"] == "harness"


def test_a_result_without_after_s_is_refused_and_a_long_budget_allows_its_share_of_overrun():
    from eclip import harness as h
    from eclip.errors import EclipError

    with pytest.raises(EclipError, match="the recipe's code ran an unknown time after the budget ended"):
        h.check_after({"train_s": 10.0, "steps": 40}, 10.0)
    # 5% of a 200 s budget (10 s) beyond the 5 s grace; past it, refused
    h.check_after({"train_s": 209.0, "steps": 400, "after_s": 0.0}, 200.0)
    with pytest.raises(EclipError, match=re.escape("a step may end at most 10 s late")):
        h.check_after({"train_s": 211.0, "steps": 400, "after_s": 0.0}, 200.0)


def test_the_encoders_cpu_limit_leaves_out_their_start_up(tmp_path, capsys):
    # imports and device set-up come before the ready line: their CPU time is not the recipe's
    from eclip import harness as h

    script = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 2.5: pass\n"
              "print('encode: ready', flush=True)\ntime.sleep(0.5)\n")
    cmds = {"images": [sys.executable, "-c", script]}
    assert h.encode_parts(cmds, {"images": tmp_path / "images.log"}, 2.0, None, threads=1) == {"images": 0}


def test_the_evaluation_runs_capped_in_pairs_within_its_share_of_the_budget(cache, tmp_path, monkeypatch, capsys):
    from eclip import harness as h

    seen = {}
    real = h.encode_parts

    def spy(cmds, logs, limit_s, preexec, threads=None):
        seen.update(cmds=cmds, limit=limit_s, preexec=preexec, threads=threads)
        return real(cmds, logs, limit_s, preexec, threads=threads)

    monkeypatch.setattr(h, "encode_parts", spy)
    out = tmp_path / "run"
    rc = h.main(["run", "--recipe", str(recipe(tmp_path)), "--data", str(cache), "--budget-s", "2", "--out", str(out),
                 "--device", "cpu", "--memory-limit-gb", "6"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    r = json.loads((out / "result.json").read_text())
    check = seen["cmds"]["batch_check"]
    assert check[check.index("--batch") + 1] == "2"  # in pairs: the company as unlike the split's as it gets
    items = r["metrics"]["n_images"] + r["metrics"]["n_texts"]
    assert seen["limit"] == h.EVAL_GRACE_S + min(2 * items / r["samples_per_s"], h.EVAL_SHARE * 2)
    assert seen["threads"] == h.torch_threads("cpu")
    assert _address_space_under(seen["preexec"]) == _cap(6)  # the encoders are capped as the training is


def test_child_times_the_process_from_its_ready_line_and_passes_the_rest_on(capfd):
    from eclip import harness as h

    code = ("import time; print('before', flush=True); print('train: ready', flush=True); time.sleep(0.3); "
            "print('train: ready', flush=True); print('after', flush=True)")  # a second ready line is output
    rc, seconds = h.child([sys.executable, "-c", code], None, ready="train: ready")
    assert rc == 0 and 0.3 <= seconds < 30
    assert capfd.readouterr().out.splitlines() == ["before", "train: ready", "after"]
    assert h.child([sys.executable, "-c", "raise SystemExit(3)"], None, ready="train: ready") == (3, None)
    with pytest.raises(EclipError, match=r"^the training process did not say when the recipe's import began"):
        h.check_wall(None, 10.0)


def test_work_after_the_clock_that_the_run_does_not_report_is_timed_by_the_harness(cache, tmp_path, monkeypatch,
                                                                                  capsys):
    # an exit hook that works on after the budget: code past the recipe check could also
    # misreport the figures the training process writes; the harness's own clock sees it
    from eclip import harness as h

    monkeypatch.setattr(h, "check_file", lambda path: [])  # as an evasion of the check would
    monkeypatch.setattr(h, "RECIPE_WALL_SLACK_S", 4.0)  # the budget, 5 s of overrun, 3 after, 4 s
    monkeypatch.chdir(ROOT)
    slow = recipe(tmp_path, extra="\n\nimport atexit as _a, time as _t\n_a.register(lambda: _t.sleep(20))\n")
    out = tmp_path / "run"
    argv = ["run", "--recipe", str(slow), "--data", str(cache), "--budget-s", "1", "--out", str(out), "--device", "cpu"]
    assert h.main(argv) == 1
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "error" and r["val_mean_rank"] is None and r["recipe_wall_s"] > 20
    limit = h.wall_limit(1.0, (cache / "images.safetensors").stat().st_size
                         + (out / "checkpoint.safetensors").stat().st_size)
    assert 13 < limit < 14  # the data and the checkpoint: a few MB at 100 MB/s
    assert re.fullmatch(r"the training process ran \d+ s from the recipe's import to its end, on a budget of 1 s "
                        rf"\(at most {limit:.0f} s, timed by the harness\); work outside train_step is not training "
                        r"time", r["reason"]), r["reason"]
    # the same recipe without the hook: within the bound, and the figure is reported
    assert h.main(["run", "--recipe", str(recipe(tmp_path)), *argv[3:]]) == 0
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "ok" and 1 <= r["recipe_wall_s"] <= limit


def test_a_process_the_training_child_leaves_behind_is_killed_when_it_ends(tmp_path):
    # a fork in a session of its own would work on after the harness stopped timing the
    # child (and could rewrite the checkpoint before the encoders read it)
    import os
    import time

    from eclip import harness as h

    marker, pidfile = tmp_path / "marker", tmp_path / "pid"
    code = ("import os, sys, time\n"
            "print('train: ready', flush=True)\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        [os.close(fd) for fd in (0, 1, 2)]\n"
            f"        open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
            "        time.sleep(1.5)\n"
            f"        open({str(marker)!r}, 'w').write('still here')\n"
            "        os._exit(0)\n"
            "    os._exit(0)\n"
            "os.wait()\n"
            "while not os.path.exists(" + repr(str(pidfile)) + "): time.sleep(0.01)\n")
    rc, seconds = h.child([sys.executable, "-c", code], None, ready="train: ready")
    assert rc == 0 and seconds is not None
    time.sleep(2.5)
    assert not marker.exists()  # killed when the child ended, not left to work on
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_recipe_that_slows_the_loops_clock_is_caught_by_the_harnesss_own(cache, tmp_path, monkeypatch):
    # found by a review: code past the check made the training loop's clock run 25 times
    # slow (75 s of training reported as 3, every figure check_after reads in order)
    from eclip import harness as h

    monkeypatch.setattr(h, "check_file", lambda path: [])  # as an evasion of the check would
    monkeypatch.setattr(h, "RECIPE_WALL_SLACK_S", 4.0)
    monkeypatch.chdir(ROOT)
    slowed = recipe(tmp_path, extra=("\n\nimport time as _t\n_real = _t.perf_counter\n_base = _real()\n"
                                     "_t.perf_counter = lambda: _base + (_real() - _base) / 20.0\n"))
    out = tmp_path / "run"
    assert h.main(["run", "--recipe", str(slowed), "--data", str(cache), "--budget-s", "1", "--out", str(out),
                   "--device", "cpu"]) == 1
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "error" and r["val_mean_rank"] is None and r["recipe_wall_s"] > 20
    assert r["train_s"] < 1 + 5  # what the process reported: within its budget
    assert r["reason"].startswith("the training process ran ")
