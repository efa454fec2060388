"""The research loop's harness runner (``agent.runner``): paths relative to the caller,
secrets kept out of run logs and of a run's environment, a run's result read back, and the
checks of --device and of seconds."""

import json
import os

import pytest

from agent import runlog
from agent.runner import run_experiment
from eclip.train import TEMPLATE


def fake_interpreter(tmp_path, monkeypatch, script: str) -> None:
    """A shell ``script`` in place of the interpreter run_experiment starts the harness with:
    no training runs."""
    import shutil
    import sys

    fake = tmp_path / "python"
    fake.write_text(f"#!{shutil.which('sh')}\n{script}")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))


def test_relative_paths_are_the_callers_not_the_package_roots(tmp_path, monkeypatch):
    # The harness runs in the package root. Relative paths once reached it as they were: a
    # loop started elsewhere had its runs read another folder's recipe (or none: every run a
    # "crash") and overwrite that folder's results. A rejected recipe is the quickest run.
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    Path("recipe.py").write_text(TEMPLATE.read_text() + "\n\ndef leak():\n    return open('/etc/hostname').read()\n")
    r = run_experiment(Path("recipe.py"), Path("data"), 1.0, Path("runs/x"), device="cpu", timeout_s=120)
    assert r["status"] == "rejected", r
    assert json.loads((tmp_path / "runs" / "x" / "result.json").read_text())["status"] == "rejected"


def test_secrets_are_redacted_from_run_logs(tmp_path, monkeypatch):
    from agent import runner

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-zzz-123456789")
    monkeypatch.setenv("SHORT_TOKEN", "abc")  # too short to redact safely
    log = tmp_path / "run.log"
    log.write_text("step 1\nkey sk-ant-zzz-123456789 printed\nabc\n")
    assert runlog.log_tail(log) == "step 1\nkey [redacted] printed\nabc"
    runlog.redact_file(log)
    assert log.read_text() == "step 1\nkey [redacted] printed\nabc\n"
    env = runner.clean_env()  # and what a run gets: no secrets, no hub downloads
    assert "ANTHROPIC_API_KEY" not in env and env["HF_HUB_OFFLINE"] == "1"


def test_protect_secrets_makes_the_loop_process_non_dumpable():
    import subprocess
    import sys

    code = ("import ctypes; from agent.runner import protect_secrets; libc = ctypes.CDLL('libc.so.6'); "
            "before = libc.prctl(3, 0, 0, 0, 0); protect_secrets(); print(before, libc.prctl(3, 0, 0, 0, 0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "0"]  # PR_GET_DUMPABLE before and after


def test_a_secret_of_eight_characters_is_redacted(monkeypatch):

    monkeypatch.setenv("X_TOKEN", "k8-chars")  # the shortest value replaced
    monkeypatch.setenv("Y_TOKEN", "k7chars")  # one shorter: too common a string to replace safely
    assert runlog.redact("a k8-chars b k7chars c") == "a [redacted] b k7chars c"


def test_redact_file_leaves_a_log_without_secrets_byte_for_byte(tmp_path):
    # a log is rewritten only when it held a secret: otherwise its undecodable bytes and
    # line endings would be rewritten too

    log = tmp_path / "run.log"
    data = b"step 1 \xff\xfe undecodable\r\nstep 2\r\n"
    log.write_bytes(data)
    runlog.redact_file(log)
    assert log.read_bytes() == data
    runlog.redact_file(tmp_path / "missing.log")  # no log: nothing to do, no error
    assert not (tmp_path / "missing.log").exists()


@pytest.mark.parametrize("offset,found", [(-1.0, True), (0.0, True), (1.0, False)])
def test_finished_result_counts_a_result_written_at_the_start_time(tmp_path, offset, found):
    # a result stamped exactly at ``since`` (coarse file-system clocks) belongs to the run
    from agent import runner

    (tmp_path / "result.json").write_text(json.dumps({"status": "ok", "val_mean_rank": 3.0}))
    mtime = 1_700_000_000.0
    os.utime(tmp_path / "result.json", (mtime, mtime))
    r = runner.finished_result(tmp_path, since=mtime + offset)
    assert (r == {"status": "ok", "val_mean_rank": 3.0}) if found else r is None  # no log tail for an ok run


def test_finished_result_of_a_failed_run_carries_its_log_tail(tmp_path):
    from agent import runner

    (tmp_path / "result.json").write_text(json.dumps({"status": "diverged", "val_mean_rank": None}))
    (tmp_path / "run.log").write_text("".join(f"line {i}\n" for i in range(1, 41)))
    r = runner.finished_result(tmp_path)
    assert r["status"] == "diverged" and r["log_tail"] == "\n".join(f"line {i}" for i in range(11, 41))
    # the training process's own result, not yet scored by the harness: no outcome yet
    (tmp_path / "result.json").write_text(json.dumps({"status": "ok", "val_mean_rank": None, "ranked_by": "caller"}))
    assert runner.finished_result(tmp_path) is None


def test_a_run_that_writes_no_result_is_a_crash_with_its_log_redacted(tmp_path, monkeypatch):
    # An interpreter that prints a secret and exits without a result.json: the stale result
    # of an earlier run in the same folder must not be taken for this run's, and the log
    # keeps no secret. A shell script stands in for python, so no training runs.
    from agent import runner

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-zzz-123456789")
    fake_interpreter(tmp_path, monkeypatch, "echo 'step 1'\necho 'printed sk-ant-zzz-123456789'\nexit 3\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "result.json").write_text(json.dumps({"status": "ok", "val_mean_rank": 1.0}))  # an earlier run's
    r = runner.run_experiment(tmp_path / "recipe.py", tmp_path / "data", 1.0, out, device="cpu", timeout_s=60)
    assert r["status"] == "crash" and r["val_mean_rank"] is None and r["returncode"] == 3
    assert r["log_tail"] == "step 1\nprinted [redacted]"
    assert (out / "run.log").read_text() == "step 1\nprinted [redacted]\n"
    assert not (out / "result.json").exists()


@pytest.mark.parametrize("name,auto,ok", [
    ("cpu", False, True), ("cuda", False, True), ("cuda:1", False, True), ("auto", True, True),
    ("auto", False, False), ("cpu0", False, False), ("cuda:", False, False), ("cuda:1x", False, False),
    ("xcpu", False, False),
])
def test_device_names_the_harness_takes(name, auto, ok):
    from agent.runner import device_error

    message = device_error(name, auto)
    if ok:
        assert message is None
    else:
        assert message == f"--device {name}: expected {'auto, ' if auto else ''}cpu, cuda or cuda:N"


@pytest.mark.parametrize("value,ok", [(None, True), (0.5, True), (0.0, False), (-1.0, False),
                                      (float("nan"), False), (float("inf"), False)])
def test_seconds_must_be_positive_and_finite(value, ok):
    from agent.runner import seconds_error

    message = seconds_error("--budget-s", value)
    assert message is None if ok else message == f"--budget-s {value}: must be a positive number of seconds"


def test_a_secret_inside_a_longer_one_leaves_no_part_of_either(monkeypatch):
    # two secrets where one is the start of the other: replacing the shorter first left the
    # longer one's tail in the log

    for order in (("A_TOKEN", "sk-ant-abcdef"), ("ANTHROPIC_API_KEY", "sk-ant-abcdef-LONGTAIL99")), \
                 (("ANTHROPIC_API_KEY", "sk-ant-abcdef-LONGTAIL99"), ("A_TOKEN", "sk-ant-abcdef")):
        for name, _ in order:
            monkeypatch.delenv(name, raising=False)
        for name, value in order:  # os.environ lists them in the order they were set
            monkeypatch.setenv(name, value)
        assert runlog.redact("key=sk-ant-abcdef-LONGTAIL99 short=sk-ant-abcdef") == "key=[redacted] short=[redacted]"


@pytest.mark.parametrize("chunk", [7, 16, 1 << 20])  # a piece shorter than the secret, longer, the default
def test_redact_file_finds_a_secret_a_pieces_end_cuts(tmp_path, monkeypatch, chunk):
    # the log is read in pieces (a run may print gigabytes): a secret across two pieces, or
    # across three, is replaced all the same, and the other bytes stay as they were

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-zzz-123456789")
    monkeypatch.setenv("OTHER_TOKEN", "sk-ant-zzz")  # begins the longer one: longest first
    monkeypatch.setattr(runlog, "REDACT_CHUNK", chunk)
    log = tmp_path / "run.log"
    log.write_bytes(b"\xff x" * 5 + b"sk-ant-zzz-123456789" + b"\r\n" + b"y" * 40 + b"sk-ant-zzz" + b" end")
    runlog.redact_file(log)
    assert log.read_bytes() == b"\xff x" * 5 + b"[redacted]\r\n" + b"y" * 40 + b"[redacted] end"


def test_log_tail_reads_the_end_of_a_large_log_only(tmp_path, read_sizes):

    log = tmp_path / "run.log"
    with open(log, "wb") as f:  # 8 MB of one line without end, then the lines that matter
        f.write(b"x" * (8 << 20) + b"\n" + b"".join(b"line %d\n" % i for i in range(40)))
    assert runlog.log_tail(log) == "\n".join(f"line {i}" for i in range(10, 40))
    assert read_sizes and all(0 < n <= 65536 + 1 for n in read_sizes)  # the window and the byte before it


def test_a_run_log_a_run_replaced_with_a_link_or_a_fifo_is_neither_followed_nor_read(tmp_path, monkeypatch):
    # the run's folder is the training process's --out: a run could leave a link to another
    # file (its tail would reach the journal and the proposer) or a FIFO (a read for ever)

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-zzz-123456789")
    other = tmp_path / "private.txt"
    other.write_text("not the run's: sk-ant-zzz-123456789\n")
    log = tmp_path / "run.log"
    log.symlink_to(other)
    assert runlog.log_tail(log) == "(no log: run.log is not a regular file)"
    runlog.redact_file(log)
    assert not log.exists() and not log.is_symlink()
    assert other.read_text() == "not the run's: sk-ant-zzz-123456789\n"
    os.mkfifo(log)
    assert runlog.log_tail(log) == "(no log: run.log is not a regular file)"
    runlog.redact_file(log)
    assert not log.exists()


def test_a_link_left_where_the_next_run_logs_is_replaced_not_written_through(tmp_path, monkeypatch):

    from agent import runner

    fake_interpreter(tmp_path, monkeypatch, "echo 'step 1'\nexit 3\n")
    out = tmp_path / "run"
    out.mkdir()
    other = tmp_path / "journal.jsonl"
    other.write_text("kept\n")
    (out / "run.log").symlink_to(other)
    r = runner.run_experiment(tmp_path / "recipe.py", tmp_path / "data", 1.0, out, device="cpu", timeout_s=60)
    assert r["status"] == "crash" and r["log_tail"] == "step 1"
    assert other.read_text() == "kept\n" and not (out / "run.log").is_symlink()


def test_a_log_tail_keeps_the_end_of_a_line_longer_than_its_window_and_a_whole_first_line(tmp_path):
    # a review: a last line over 64 KB gave no tail at all (its error hidden from the proposer
    # and from the out-of-space check), and a window that began at a line's start lost that line

    log = tmp_path / "run.log"
    log.write_text("RuntimeError: No space left on device " + "y" * 70000 + "\n")
    assert runlog.log_tail(log) == "y" * (65536 - 1)  # the line's end, its newline aside
    log.write_bytes(b"a" * 10 + b"\n" + b"b" * 65535 + b"\n")  # the window: exactly the last line
    assert runlog.log_tail(log) == "b" * 65535


def test_a_secret_that_is_not_utf8_is_redacted_as_its_bytes(tmp_path, monkeypatch):

    monkeypatch.setitem(os.environb, b"MY_API_TOKEN", b"abc\xffdefghij")
    log = tmp_path / "run.log"
    log.write_bytes(b"printed abc\xffdefghij here\n")
    runlog.redact_file(log)
    assert log.read_bytes() == b"printed [redacted] here\n"


def test_a_ctrl_c_as_the_harness_ends_is_passed_on_not_a_process_lookup_error(tmp_path, monkeypatch):
    # found by a review: Popen's wait, interrupted, reaps a harness that was ending; the kill
    # of its group then found nothing and the loop died of a ProcessLookupError (exit 1, no
    # summary) instead of stopping as a Ctrl-C does
    import subprocess

    from agent import runner

    fake_interpreter(tmp_path, monkeypatch, "exit 0\n")
    real_wait = subprocess.Popen.wait

    def interrupted(self, timeout=None):
        real_wait(self)  # the harness has ended and is reaped, its group gone
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess.Popen, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(tmp_path / "recipe.py", tmp_path / "data", 1.0, tmp_path / "run", device="cpu",
                              timeout_s=60)


def test_a_harness_killed_by_a_signal_is_a_crash_that_says_so(tmp_path, monkeypatch):

    from agent import runner

    fake_interpreter(tmp_path, monkeypatch, "kill -9 $$\n")
    r = runner.run_experiment(tmp_path / "recipe.py", tmp_path / "data", 1.0, tmp_path / "run", device="cpu",
                              timeout_s=60)
    assert r["status"] == "crash" and r["returncode"] == -9
    assert r["reason"] == ("the harness was killed by SIGKILL before it wrote a result (the kernel's out-of-memory "
                           "killer, or a kill from outside)")


@pytest.mark.parametrize("written,read", [
    ({"status": 5, "val_mean_rank": None}, {"status": "crash", "val_mean_rank": None,
                                            "reason": "the run's result.json has status 5 and val_mean_rank None"}),
    ({"status": "ok", "val_mean_rank": None}, {"status": "crash", "val_mean_rank": None,
                                               "reason": "the run's result.json has status 'ok' and val_mean_rank None"}),
    # the loop's own word for a scored run, with no score: the journal refused the end line,
    # and every resume recovered the same result and refused it again
    ({"status": "keep", "val_mean_rank": None}, {"status": "crash", "val_mean_rank": None,
                                                 "reason": "the run's result.json has status 'keep' and val_mean_rank "
                                                           "None"}),
    ({"status": "baseline", "val_mean_rank": 2.0}, {"status": "crash", "val_mean_rank": None,
                                                    "reason": "the run's result.json has status 'baseline' and "
                                                              "val_mean_rank 2.0"}),
    ({"status": "ok", "val_mean_rank": 3.0, "samples_per_s": "fast", "steps": 9},
     {"status": "ok", "val_mean_rank": 3.0, "samples_per_s": None, "steps": 9}),
])
def test_a_result_of_types_the_journal_cannot_hold_fails_the_run_not_the_loop(tmp_path, written, read):
    # the training process's fields pass through the harness: a wrongly typed one made the
    # journal refuse the end line, which ended the loop
    from agent import journal, runner

    (tmp_path / "result.json").write_text(json.dumps(written))
    r = runner.finished_result(tmp_path)
    assert {k: v for k, v in r.items() if k != "log_tail"} == read
    journal.append(tmp_path / "journal.jsonl", {"event": "end", "n": 1, "status": r["status"],
                                                "val_mean_rank": r["val_mean_rank"], "result": r})


def test_a_fifo_in_place_of_the_result_is_no_result_not_a_read_for_ever(tmp_path):
    import threading
    import time

    from agent import runner

    fifo = tmp_path / "result.json"
    os.mkfifo(fifo)
    # should the read block (the regression), a writer that comes and goes ends it, late
    unblock = threading.Timer(10.0, lambda: os.close(os.open(fifo, os.O_WRONLY)))
    unblock.start()
    t0 = time.monotonic()
    try:
        assert runner.finished_result(tmp_path) is None
        assert time.monotonic() - t0 < 5.0
    finally:
        unblock.cancel()
        if unblock.is_alive():  # it was waiting for a reader: give it one
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
            unblock.join()
