"""``python -m eclip.harness run``: the policy gate, a scored run, secrets, out-of-memory,
Ctrl-C and SIGTERM, what a training child gets and what it leaves (no result, a damaged
one, a stray process). Its limits are in test_harness_limits.py, its evaluation in
test_harness_eval.py."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from train_support import small_recipe as recipe

from eclip import harness as h
from eclip import harness_eval as he
from eclip.errors import EclipError
from eclip.hardware import torch_threads
from eclip.process import child, scrub_environment
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


def test_children_take_ctrl_c_again_and_die_with_the_harness():
    # the harness ignores SIGINT while it waits; its children must not inherit that, or a
    # Ctrl-C during the evaluation would go unheard
    import signal

    from eclip.process import child_setup

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


@pytest.mark.parametrize("target", ["harness", "group", "ctrl-c"])
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
        elif target == "ctrl-c":  # a terminal's Ctrl-C: SIGINT to the whole group
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    said = "SIGINT" if target == "ctrl-c" else "SIGTERM"
    assert f"{said}: stopping after this step" in stderr and "status:         interrupted" in stdout
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "interrupted" and r["val_mean_rank"] is None and "ranked_by" not in r
    assert json.loads((out / "checkpoint.json").read_text())["step"] == r["steps"] >= 1


def test_sigterm_during_the_evaluation_is_an_interrupted_result(cache, tmp_path, monkeypatch, capsys):
    import os
    import signal
    import time

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


# A mutation audit of the harness: each test below fails a plausible change that every other
# test let through (the seed, the secrets, the GPU or the memory cap not reaching a child, a
# crash filed as an error, a limit that ignores its threads or its share of the budget).
def _fake_training(monkeypatch, h, result=None, rc=0, heard=()):
    """Stands in for the training child: records (cmd, preexec, env) and writes ``result``
    (when given) where eclip.train would, as if the harness received the signals ``heard``
    meanwhile; returns the list of calls."""
    import os

    calls = []
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the harness scrubs a copy, not this process's

    def child(cmd, preexec, env=None, ready=None, signals=None, **kw):
        calls.append({"cmd": cmd, "preexec": preexec, "env": dict(os.environ if env is None else env)})
        signals.extend(heard)
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


@pytest.mark.parametrize("rc,heard,status,code", [
    (2, (), "error", 2), (1, (), "crash", 1), (-9, (), "crash", 137), (-2, (), "crash", 130),
    # a Ctrl-C (SIGTERM) in the child's start-up, before its training loop could save anything
    (-2, (2,), "interrupted", 130), (130, (15,), "interrupted", 130), (1, (2,), "crash", 1)])
def test_a_training_child_that_left_no_result_crashed_unless_its_input_was_bad(tmp_path, monkeypatch, capsys,
                                                                              rc, heard, status, code):
    # the research loop tries to fix a "crash" (a recipe fault), not an "error", and tries an
    # "interrupted" run's configuration again
    _fake_training(monkeypatch, h, rc=rc, heard=heard)
    out = tmp_path / "run"
    assert h.main(["run", "--recipe", str(TEMPLATE), "--data", str(tmp_path), "--budget-s", "1", "--out", str(out),
                   "--device", "cpu"]) == code
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == status and r["reason"] == f"the training process exited with code {rc} without a result"


@pytest.mark.parametrize("damage", [b'{"status": "ok", "ranked_by": "cal', b"\xff\xfe{"], ids=["cut short", "not UTF-8"])
def test_a_damaged_training_result_is_a_crash_not_a_traceback(tmp_path, monkeypatch, capsys, damage):
    # a result the child could not finish writing reads as none at all: the run is filed
    # with a reason, and the caller's loop goes on
    def child(cmd, preexec, env=None, ready=None, signals=None, **kw):
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
            raise EclipError(he.encode_error("images", 1, log))
        return dict(result, val_mean_rank=3.0, ranked_by="harness")

    monkeypatch.setattr(h, "evaluate", evaluate)
    out = tmp_path / "run"
    rc = h.main(["run", "--recipe", str(TEMPLATE), "--data", str(tmp_path), "--budget-s", "1", "--out", str(out),
                 "--device", "cpu"])
    r = json.loads((out / "result.json").read_text())
    assert seen == [2] and r["status"] == status and rc == (0 if failure is None else 1), r
    assert "ranked_by" not in r if failure else r["ranked_by"] == "harness"


@pytest.mark.parametrize("raised", ["disk full", "other OSError"])
def test_a_full_disk_under_the_harnesss_own_writes_says_disk_full_which_a_training_result_cannot(
        tmp_path, monkeypatch, capsys, raised):
    # the loop stops on the harness's word (a recipe can print "No space left on device" but
    # cannot set this field: the training process's own disk_full is dropped)
    import errno

    trained = {"status": "ok", "ranked_by": "caller", "val_mean_rank": None, "train_s": 1.0, "steps": 3,
               "after_s": 0.0, "last_step_cpu_s": 0.1, "disk_full": True}
    _fake_training(monkeypatch, h, result=trained)

    def evaluate(result, args, preexec=None, threads=None):
        if raised == "disk full":
            raise OSError(errno.ENOSPC, "No space left on device", str(args.out / "eval_images.safetensors"))
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(h, "evaluate", evaluate)
    out = tmp_path / "run"
    argv = ["run", "--recipe", str(TEMPLATE), "--data", str(tmp_path), "--budget-s", "1", "--out", str(out),
            "--device", "cpu"]
    if raised == "other OSError":  # not the harness's to report in a result: it fails as before
        with pytest.raises(PermissionError):
            h.main(argv)
        return
    assert h.main(argv) == 1
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "error" and r["disk_full"] is True and r["val_mean_rank"] is None
    assert r["reason"] == f"[Errno 28] No space left on device: '{out / 'eval_images.safetensors'}'"
    monkeypatch.setattr(h, "evaluate", lambda result, args, preexec=None, threads=None: dict(
        result, val_mean_rank=3.0, ranked_by="harness"))
    assert h.main(argv) == 0
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "ok" and "disk_full" not in r


def test_a_full_disk_while_the_harness_copies_the_training_split_says_disk_full(tmp_path, monkeypatch):
    import errno

    _fake_training(monkeypatch, h)
    monkeypatch.setattr(h.sandbox, "probe", lambda: None)

    def export(args):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:  # as the cache writer words it
            raise EclipError(f"{args.out / 'train_data'}: cannot write the cache") from e

    monkeypatch.setattr(h, "export_training_data", export)
    out = tmp_path / "run"
    assert h.main(["run", "--recipe", str(TEMPLATE), "--data", str(tmp_path), "--budget-s", "1", "--out", str(out),
                   "--device", "cpu", "--isolate"]) == 1  # not bad input (2)
    assert json.loads((out / "result.json").read_text()) == {
        "status": "error", "val_mean_rank": None, "reason": f"{out.resolve() / 'train_data'}: cannot write the cache",
        "disk_full": True}


def test_the_evaluation_runs_capped_in_pairs_within_its_share_of_the_budget(cache, tmp_path, monkeypatch, capsys):
    seen = {}
    real = he.encode_parts

    def spy(cmds, logs, limit_s, preexec, threads=None):
        seen.update(cmds=cmds, limit=limit_s, preexec=preexec, threads=threads)
        return real(cmds, logs, limit_s, preexec, threads=threads)

    monkeypatch.setattr(he, "encode_parts", spy)
    out = tmp_path / "run"
    rc = h.main(["run", "--recipe", str(recipe(tmp_path)), "--data", str(cache), "--budget-s", "2", "--out", str(out),
                 "--device", "cpu", "--memory-limit-gb", "6"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    r = json.loads((out / "result.json").read_text())
    check = seen["cmds"]["batch_check"]
    assert check[check.index("--batch") + 1] == "2"  # in pairs: the company as unlike the split's as it gets
    items = r["metrics"]["n_images"] + r["metrics"]["n_texts"]
    assert seen["limit"] == he.EVAL_GRACE_S + min(2 * items / r["samples_per_s"], he.EVAL_SHARE * 2)
    assert seen["threads"] == torch_threads("cpu")
    assert _address_space_under(seen["preexec"]) == _cap(6)  # the encoders are capped as the training is


def test_a_process_the_training_child_leaves_behind_is_killed_when_it_ends(tmp_path):
    # a fork in a session of its own would work on after the harness stopped timing the
    # child (and could rewrite the checkpoint before the encoders read it)
    import os
    import time

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
    rc, seconds = child([sys.executable, "-c", code], None, ready="train: ready")
    assert rc == 0 and seconds is not None
    time.sleep(2.5)
    assert not marker.exists()  # killed when the child ended, not left to work on
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize("heard,status,code", [((), "crash", 1), ((15,), "interrupted", 130), ((2,), "interrupted", 130)],
                         ids=["none", "SIGTERM", "Ctrl-C"])
def test_an_interruption_the_harness_never_received_is_the_recipes_crash(tmp_path, monkeypatch, capsys, heard, status,
                                                                         code):
    # "interrupted" tells the research loop that it was stopped (a config to try again), not
    # that the recipe failed: only a Ctrl-C or SIGTERM the harness itself received makes one
    stopped = {"status": "interrupted", "ranked_by": "caller", "val_mean_rank": None, "train_s": 0.5, "steps": 3,
               "after_s": 0.0}
    _fake_training(monkeypatch, h, result=stopped, rc=130, heard=heard)
    out = tmp_path / "run"
    assert h.main(["run", "--recipe", str(TEMPLATE), "--data", str(tmp_path), "--budget-s", "1", "--out", str(out),
                   "--device", "cpu"]) == code
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == status and r["val_mean_rank"] is None and "ranked_by" not in r
    if status == "crash":
        assert r["reason"] == ("the training process ended interrupted, but no Ctrl-C or SIGTERM reached the harness "
                               "(the recipe raised KeyboardInterrupt, or a signal was sent to the training process "
                               "alone)")


SELF_INTERRUPT = """

_plain_step = train_step
_steps = [0]


def train_step(model, optimizer, batch, progress):
    _steps[0] += 1
    if _steps[0] == 2:  # as a Ctrl-C would end the step (the second: a first step may take a loaded machine's budget)
        raise KeyboardInterrupt
    return _plain_step(model, optimizer, batch, progress)
"""


def test_a_recipe_that_raises_keyboardinterrupt_crashed(small_cache, tmp_path, capsys):
    out = tmp_path / "run"
    rc = h.main(["run", "--recipe", str(recipe(tmp_path, extra=SELF_INTERRUPT)), "--data", str(small_cache),
                 "--budget-s", "20", "--out", str(out), "--device", "cpu"])  # ends at its second step
    r = json.loads((out / "result.json").read_text())
    assert rc == 1 and r["status"] == "crash" and r["steps"] == 1, r
    assert r["reason"].startswith("the training process ended interrupted, but no Ctrl-C or SIGTERM")


def test_only_the_template_byte_for_byte_shares_the_compile_cache(tmp_path, monkeypatch):
    same, edited, link = tmp_path / "same.py", tmp_path / "edited.py", tmp_path / "link.py"
    same.write_bytes(TEMPLATE.read_bytes())
    edited.write_bytes(TEMPLATE.read_bytes() + b"\n")
    link.symlink_to(TEMPLATE)
    assert h.is_template(TEMPLATE) and h.is_template(same)
    assert not h.is_template(edited) and not h.is_template(link) and not h.is_template(tmp_path / "none.py")
    # the private copy: the cache's files, links as links; a copy that fails is a one-line error
    shared, out = tmp_path / "cc", tmp_path / "run"
    (shared / "triton").mkdir(parents=True)
    (shared / "triton" / "k.bin").write_bytes(b"k")
    (shared / "outside").symlink_to(tmp_path / "elsewhere")
    out.mkdir()
    copy = h.private_cache(shared, out)
    assert copy == out / "compile_cache" and (copy / "triton" / "k.bin").read_bytes() == b"k"
    assert os.readlink(copy / "outside") == str(tmp_path / "elsewhere")

    def fail(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(h.shutil, "copytree", fail)
    with pytest.raises(EclipError, match=re.escape(f"{shared}: cannot copy the compile cache for the run ([Errno 28] "
                                                   "No space left on device)")):
        h.private_cache(shared, out)
    assert not copy.exists()


@pytest.mark.parametrize("where", ["copy's place", "run directory", "inside the run", "around the run"])
def test_an_isolated_run_refuses_a_compile_cache_that_overlaps_its_run_directory(tmp_path, monkeypatch, capsys,
                                                                                 where):
    # a recipe's private copy goes to out/compile_cache and is removed after training: a shared
    # cache there would be deleted, one inside the run directory writable by the recipe, and
    # one around it copied into itself
    monkeypatch.setattr(h.sandbox, "probe", lambda: None)
    _fake_training(monkeypatch, h)
    out = tmp_path / "ws" / "run"
    cache = {"copy's place": out / "compile_cache", "run directory": out, "inside the run": out / "cc",
             "around the run": tmp_path / "ws"}[where]
    cache.mkdir(parents=True)
    (cache / "kept.py").write_text("# compiled by the template")
    assert h.main(["run", "--recipe", str(TEMPLATE), "--data", str(tmp_path), "--budget-s", "1", "--out", str(out),
                   "--device", "cpu", "--compile-cache", str(cache), "--isolate"]) == 2
    assert "must not lie one inside the other" in capsys.readouterr().err
    assert (cache / "kept.py").read_text() == "# compiled by the template"


@pytest.mark.parametrize("inside", ["compile cache in the data", "data in the compile cache"])
def test_an_isolated_run_refuses_a_compile_cache_that_overlaps_the_data(tmp_path, monkeypatch, capsys, inside):
    # a recipe's run gets a copy of the compile cache in its run directory: one holding the data
    # cache put the held-out pairs where training reads and writes
    monkeypatch.setattr(h.sandbox, "probe", lambda: None)
    _fake_training(monkeypatch, h)
    data, cache = (tmp_path / "data", tmp_path / "data" / "cc") if inside.startswith("compile") else (
        tmp_path / "cc" / "data", tmp_path / "cc")
    data.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "run"
    assert h.main(["run", "--recipe", str(TEMPLATE), "--data", str(data), "--budget-s", "1", "--out", str(out),
                   "--device", "cpu", "--compile-cache", str(cache), "--isolate"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"harness: error: --isolate: --compile-cache {cache} and --data {data} must not lie one inside the other")
    assert not (out / "compile_cache").exists()


@pytest.mark.parametrize("message,full", [("I/O error: No space left on device (os error 28)", True),
                                          ("invalid metadata", False)])
def test_a_safetensors_error_while_copying_the_training_split_is_a_result_not_a_traceback(
        small_cache, tmp_path, monkeypatch, message, full):
    # safetensors' I/O errors are no OSError: a full disk ended the harness with a traceback
    # and no result.json
    from safetensors import SafetensorError

    import eclip.data.cache as cache_mod

    def write_subset(*a, **k):
        raise SafetensorError(message)

    _fake_training(monkeypatch, h)
    monkeypatch.setattr(h.sandbox, "probe", lambda: None)
    monkeypatch.setattr(cache_mod, "write_subset", write_subset)
    out = tmp_path / "run"
    assert h.main(["run", "--recipe", str(TEMPLATE), "--data", str(small_cache), "--budget-s", "1", "--out",
                   str(out), "--device", "cpu", "--isolate"]) == (1 if full else 2)
    r = json.loads((out / "result.json").read_text())
    where = out.resolve() / "train_data"
    assert (r["status"], r.get("disk_full", False)) == ("error", full)
    assert r["reason"] == (f"{where}: cannot write the training split's copy ({message})" if not full else
                           f"[Errno 28] cannot write the training split's copy ({message}): '{where}'")


def test_a_copy_of_the_training_split_left_by_a_killed_run_is_replaced(small_cache, tmp_path):
    # the run directory of a killed run (a final run's is reused when it runs again) may hold
    # the last copy, with whatever the recipe added to it: a cache writer refuses such a folder
    out = tmp_path / "run"
    (out / "train_data").mkdir(parents=True)
    (out / "train_data" / "planted.bin").write_bytes(b"x")
    args = SimpleNamespace(data=small_cache, out=out, final=True)
    copy = h.export_training_data(args)
    assert copy == out / "train_data" and not (copy / "planted.bin").exists()
    from eclip.data.cache import load_cache

    assert load_cache(copy).images.shape[0] == 360  # train + val of the 300 / 60 / 20 scenes


def test_a_training_child_that_left_no_result_says_why_in_the_result(small_cache, tmp_path, monkeypatch, capfd):
    # the research loop reads result.json, not the harness's stderr: "exited with code 2" was
    # all it learned of a refused option or a crash
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "recipe.py"
    bad.write_text(TEMPLATE.read_text().replace('"lr": 1e-3,', '"lr": -1.0,'))
    out = tmp_path / "run"
    assert h.main(["run", "--recipe", str(bad), "--data", str(small_cache), "--budget-s", "1", "--out", str(out),
                   "--device", "cpu"]) == 2
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "error" and r["reason"] == (
        "the training process exited with code 2 without a result (its last line: train: error: recipe: lr: expected "
        "a finite number in (0, inf), got -1.0)")
    assert "train: error: recipe: lr:" in capfd.readouterr().err  # passed on as it came
