"""A run's log as the loop writes it (``agent.runlog.LogCopier``): what a run prints comes
through byte for byte while it runs, without secrets, cut to a head and a tail when it is
too long, and neither a process left behind nor a full disk holds the run or the loop."""

import errno
import os
import subprocess
import sys
import time

import pytest

from agent import runlog
from agent.runlog import LogCopier


def copy(tmp_path, data: bytes, **caps) -> bytes:
    """What the copier makes of ``data`` written into its pipe at once; the log's bytes."""
    log = tmp_path / "run.log"
    read_end, write_end = os.pipe()
    writer = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"],
                              stdin=subprocess.PIPE, stdout=write_end)
    os.close(write_end)
    with open(log, "wb") as sink:
        copier = LogCopier(read_end, sink)
        writer.communicate(data)
        copier.finish()
    return log.read_bytes()


def test_what_a_run_prints_reaches_the_log_byte_for_byte(tmp_path):
    data = b"step 1\r\x1b[2Kstep 2\n\xff\xfe not UTF-8\nno newline at the end"
    assert copy(tmp_path, data) == data


def test_a_long_output_keeps_its_head_and_its_tail_and_says_what_was_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(runlog, "LOG_HEAD_BYTES", 3 << 20)
    monkeypatch.setattr(runlog, "LOG_TAIL_BYTES", 1000)
    data = b"".join(b"line %07d\n" % i for i in range(1_000_000))  # 13 MB
    head, tail = data[:3 << 20], data[-1000:]
    assert copy(tmp_path, data) == (
        head + b"\n[run.log: the run printed more than 3 MiB; what follows is held back, and its last part is "
        b"written when the run ends]\n"
        + f"[run.log: {len(data) - len(head) - 1000} bytes dropped here; the last 1000 follow]\n".encode() + tail)
    assert runlog.log_tail(tmp_path / "run.log", 2) == "line 0999998\nline 0999999"


def test_an_output_that_fits_exactly_has_no_marks(tmp_path, monkeypatch):
    monkeypatch.setattr(runlog, "LOG_HEAD_BYTES", 4096)
    data = b"x" * 4095 + b"\n"
    assert copy(tmp_path, data) == data


@pytest.mark.parametrize("read_bytes", [5, 64, 1 << 16])  # pieces shorter than the secret, longer, the default
def test_a_secret_is_redacted_as_the_output_comes_across_pieces_and_the_heads_end(tmp_path, monkeypatch,
                                                                                  read_bytes):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-zzz-123456789")
    monkeypatch.setenv("OTHER_TOKEN", "sk-ant-zzz")  # begins the longer one: longest first
    monkeypatch.setattr(runlog, "READ_BYTES", read_bytes)
    monkeypatch.setattr(runlog, "LOG_HEAD_BYTES", 110)
    monkeypatch.setattr(runlog, "LOG_TAIL_BYTES", 40)
    # the first key crosses no cut of the head; the second would, printed as it is
    data = b"a" * 40 + b"sk-ant-zzz-123456789\n" + b"b" * 40 + b"sk-ant-zzz-123456789" + b"c" * 100 + b"sk-ant-zzz!"
    log = copy(tmp_path, data)
    assert b"sk-ant" not in log and b"zzz" not in log and b"123" not in log
    clean = (b"a" * 40 + b"[redacted]\n" + b"b" * 40 + b"[redacted]" + b"c" * 100 + b"[redacted]!")
    assert log.startswith(clean[:110] + b"\n[run.log: the run printed more than 0 MiB")
    assert log.endswith(f"[run.log: {len(clean) - 110 - 40} bytes dropped here; the last 40 follow]\n".encode()
                        + clean[-40:])


def test_the_log_is_written_while_the_run_goes_on(tmp_path):
    # a person follows a run with tail -f: its lines are there before it ends
    read_end, write_end = os.pipe()
    log = tmp_path / "run.log"
    with open(log, "wb") as sink:
        copier = LogCopier(read_end, sink)
        os.write(write_end, b"step 1\n")
        deadline = time.monotonic() + 30
        while log.read_bytes() != b"step 1\n" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert log.read_bytes() == b"step 1\n"
        os.close(write_end)
        copier.finish()
    assert log.read_bytes() == b"step 1\n"


def stray_writer(line: str) -> tuple[int, subprocess.Popen]:
    """(the read end of a pipe, a process that writes ``line`` into it for ever): a process
    a harness left behind, holding the log's pipe."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", f"import sys\nwhile True: sys.stdout.write({line + chr(10)!r})"],
                            stdout=write_end)
    os.close(write_end)
    return read_end, proc


def test_a_process_left_behind_that_prints_on_does_not_hold_the_loop(tmp_path, monkeypatch):
    # a harness's grandchild that outlived it (another session, say) keeps the pipe open and
    # writes for ever: the copier reads for DRAIN_S once the harness has ended, then lets go
    monkeypatch.setattr(runlog, "DRAIN_S", 0.5)
    read_end, stray = stray_writer("on and on")
    try:
        with open(tmp_path / "run.log", "wb") as sink:
            copier = LogCopier(read_end, sink)
            t0 = time.monotonic()
            copier.finish()
            assert time.monotonic() - t0 < 10
        assert stray.wait(timeout=30) != 0  # the pipe's reader gone: it met EPIPE (or SIGPIPE) and ended
    finally:
        stray.kill()
        stray.wait()
    assert (tmp_path / "run.log").read_bytes().startswith(b"on and on\n")


class FullDisk:
    """A log file on a full disk: every write fails."""

    def __init__(self):
        self.tries = 0

    def write(self, data):
        self.tries += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        pass


def test_a_log_that_cannot_be_written_does_not_block_the_run(tmp_path):
    # the copier reads on: a writer with more to say than a pipe holds (64 KiB) ends
    read_end, write_end = os.pipe()
    writer = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdout.write('x' * (4 << 20))"],
                              stdout=write_end)
    os.close(write_end)
    sink = FullDisk()
    copier = LogCopier(read_end, sink)
    assert writer.wait(timeout=60) == 0
    copier.finish()
    assert sink.tries == 1  # given up on at the first failure, not tried for each piece


def test_a_run_that_prints_without_measure_leaves_a_bounded_log(tmp_path, monkeypatch):
    # end to end: a shell standing in for the harness prints 20 MB and fails; the log keeps
    # 1 MiB + 4 KiB and its end (the failure's last words), the run's outcome is unchanged
    from agent import runner

    monkeypatch.setattr(runlog, "LOG_HEAD_BYTES", 1 << 20)
    monkeypatch.setattr(runlog, "LOG_TAIL_BYTES", 4096)
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nhead -c 20000000 /dev/zero | tr '\\0' 'x'\necho\necho 'RuntimeError: the end'\n"
                    "exit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    out = tmp_path / "run"
    r = runner.run_experiment(tmp_path / "recipe.py", tmp_path / "data", 1.0, out, device="cpu", timeout_s=60)
    assert r["status"] == "crash" and r["returncode"] == 3
    assert r["log_tail"].splitlines()[-1] == "RuntimeError: the end"
    assert (1 << 20) + 4096 < (out / "run.log").stat().st_size < (1 << 20) + 4096 + 300


def test_a_ctrl_c_during_finish_waits_for_the_copier_and_is_raised_after(tmp_path, monkeypatch):
    # finish once closed the pipe's fd under the thread, which read on from whatever file was
    # opened next with that number (the journal the loop reads after a Ctrl-C)
    import _thread
    import threading

    monkeypatch.setattr(runlog, "DRAIN_S", 1.0)
    read_end, stray = stray_writer("on")
    timer = threading.Timer(0.2, _thread.interrupt_main)
    try:
        with open(tmp_path / "run.log", "wb") as sink:
            copier = LogCopier(read_end, sink)
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                copier.finish()
            assert copier.done.is_set() and not copier.thread.is_alive()
        with pytest.raises(OSError):
            os.fstat(read_end)  # closed by the thread, once (no other file holds the number yet)
    finally:
        timer.cancel()
        stray.kill()
        stray.wait()


def test_a_secret_free_stream_is_held_back_only_by_the_longest_secret(tmp_path, monkeypatch):
    # the fast path (no secret in a piece) still keeps back the bytes a secret may begin in
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-zzz-123456789")
    scrubber = runlog.Scrubber()
    assert scrubber.feed(b"abcdefghijklmnopqrstuvwxyz") == b"abcdefg"  # 19 bytes held back
    assert scrubber.feed(b"sk-ant-zzz-123456789 end") == b"hijklmnopqrstuvwxyz[redacted]"
    assert scrubber.end() == b" end" and scrubber.found
