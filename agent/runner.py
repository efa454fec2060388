"""Run one experiment through the harness, in its own process group, under a hard limit.

The loop never imports the training code: it starts ``python -m eclip.harness run`` and
reads the ``result.json`` the harness writes. The child gets an environment without
secrets, its own session (so the whole group can be killed at once), and on Linux a
parent-death signal, so it dies with the loop even when the loop is killed with -9.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent import journal
from agent.runlog import LogCopier, log_tail, redact_file
from eclip.fileio import read_regular, remove
from eclip.process import die_with_parent, prctl, scrub_environment

EVAL_CAP_S = 120.0  # evaluation and start-up allowance on top of the training budget
MARGIN = 0.5  # plus this fraction of the budget before the run is killed as a timeout
DEVICE_NAME = re.compile(r"cpu|cuda(:\d+)?")  # what the harness's --device takes besides auto


def seconds_error(flag: str, value: float | None) -> str | None:
    """The message for a run length that is not a positive, finite number of seconds."""
    if value is None or (math.isfinite(value) and value > 0):
        return None
    return f"{flag} {value}: must be a positive number of seconds"


def device_error(name: str, auto: bool = False) -> str | None:
    """The message for a --device the harness would refuse (``auto`` allowed where it is)."""
    if (auto and name == "auto") or DEVICE_NAME.fullmatch(name):
        return None
    return f"--device {name}: expected {'auto, ' if auto else ''}cpu, cuda or cuda:N"


def clean_env() -> dict:
    """The loop's environment without secrets, and offline for model hubs: a recipe naming a
    pretrained tower cannot make a run download anything."""
    env = dict(os.environ)
    scrub_environment(env)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def protect_secrets() -> None:
    """Make this process non-dumpable (Linux): other processes of the same user — a training
    run included — can then neither read its /proc/<pid>/environ, which still holds the API
    key, nor attach to it. Root is not stopped by this."""
    prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0


SIGNALS = {int(s) for s in signal.Signals}


def kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads, if any is left: a Ctrl-C's wait in Popen may
    have reaped a harness that was ending, and its group with it."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def finished_result(out: Path, since: float = 0.0) -> dict | None:
    """``out/result.json`` if a run wrote it at or after ``since`` (a Unix time), else None
    (run_experiment deletes any older file before it starts a run, so a caller that was gone
    meanwhile still finds the outcome). A result the harness had not scored yet is None too.
    A result that is not ``ok`` carries the log tail."""
    path = out / "result.json"
    try:
        if path.stat().st_mtime < since:
            return None
        # a regular file only: a FIFO a run left there, its harness killed, would block for ever
        result = json.loads(read_regular(path).decode("utf-8"))
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8 text
        return None
    if not isinstance(result, dict) or result.get("ranked_by") == "caller":
        return None  # the training process's result, which the harness had not scored yet
    result = checked_result(result)
    if result.get("status") != "ok":
        result["log_tail"] = log_tail(out / "run.log")
    return result


def checked_result(result: dict) -> dict:
    """``result`` as the journal can hold it: the training process's fields pass through
    the harness, and a recipe's code runs in that process, so a field of another type (a
    status that is no string, a figure that is no number) must fail the run, not the loop
    (the journal refuses a line it could not read back)."""
    score = result.get("val_mean_rank")
    scored = journal.fits(score, journal.NUMBER)
    # the loop's own words for a scored run (keep, ...) are no run's status: with no score the
    # journal refused the line, and every resume recovered the same result again
    if not isinstance(result.get("status"), str) or result["status"] in journal.SCORED_STATUSES or not (
            scored or score is None and result["status"] != "ok"):
        return {"status": "crash", "val_mean_rank": None, "reason": (
            f"the run's result.json has status {result.get('status')!r} and val_mean_rank {score!r}")}
    return {k: None if k in journal.RESULT_NUMBERS and v is not None and not journal.fits(v, journal.ANY_NUMBER)
            else v for k, v in result.items()}


def run_experiment(recipe: Path, data: Path, budget_s: float, out: Path, *, compile_cache: Path | None = None,
                   device: str = "auto", timeout_s: float | None = None, seed: int = 42,
                   final: bool = False, isolate: bool = False) -> dict:
    """Run the harness on ``recipe``; returns its result.json (plus ``duration_s``), or a
    result with status ``timeout`` / ``crash`` and the log tail when there is none.
    ``final``: train on train+val and score the held-out test split. ``isolate``: the
    harness's ``--isolate`` (the recipe's processes cannot read the cache)."""
    # The harness runs in the package root (where ``-m eclip.harness`` imports this project),
    # not in the caller's folder: every path it is given must be absolute, or a workspace
    # opened from elsewhere would hand it another folder's recipe and runs.
    recipe, data, out = recipe.resolve(), data.resolve(), out.resolve()
    compile_cache = compile_cache.resolve() if compile_cache is not None else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").unlink(missing_ok=True)
    limit = timeout_s if timeout_s is not None else budget_s * (1 + MARGIN) + EVAL_CAP_S
    cmd = [sys.executable, "-m", "eclip.harness", "run", "--recipe", str(recipe), "--data", str(data),
           "--budget-s", str(budget_s), "--out", str(out), "--device", device, "--seed", str(seed)]
    if compile_cache is not None:
        cmd += ["--compile-cache", str(compile_cache)]
    if final:
        cmd.append("--final")
    if isolate:
        cmd.append("--isolate")
    t0 = time.perf_counter()
    # a new file, never through a link: an earlier run in this folder could have left one
    remove(out / "run.log")
    with open(os.open(out / "run.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666), "wb") as log:
        # through a pipe, whose reader bounds the log and keeps secrets out (agent.runlog)
        read_end, write_end = os.pipe()
        try:
            proc = subprocess.Popen(cmd, stdout=write_end, stderr=subprocess.STDOUT, env=clean_env(),
                                    start_new_session=True, preexec_fn=die_with_parent,
                                    cwd=Path(__file__).resolve().parents[1])
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # the harness holds it now: the pipe ends when its processes do
        copier, rc = None, None
        try:
            copier = LogCopier(read_end, log)  # from here on the thread closes read_end
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)  # the whole group: compile workers included
            proc.wait()
        except BaseException:  # Ctrl-C or a kill of the loop: never leave the run behind
            kill_group(proc.pid)
            proc.wait()
            raise
        finally:  # before the log is closed, a second Ctrl-C included
            if copier is not None:
                copier.finish()
            else:  # no copier came to be (no thread could start): the harness was killed above
                os.close(read_end)
    duration = time.perf_counter() - t0
    redact_file(out / "run.log")  # what a run wrote to the log's path itself stays clean too
    if rc is None:
        return {"status": "timeout", "val_mean_rank": None, "duration_s": duration,
                "reason": f"killed after {limit:.0f} s", "log_tail": log_tail(out / "run.log")}
    result = finished_result(out)
    if result is None:
        said = {}
        if rc < 0 and -rc in SIGNALS:  # nothing in its log says why: the signal is all there is
            said["reason"] = (f"the harness was killed by {signal.Signals(-rc).name} before it wrote a result"
                              + (" (the kernel's out-of-memory killer, or a kill from outside)"
                                 if rc == -signal.SIGKILL else ""))
        return {"status": "crash", "val_mean_rank": None, "duration_s": duration, "returncode": rc, **said,
                "log_tail": log_tail(out / "run.log")}
    return dict(result, duration_s=duration)


def data_fingerprint(data: Path) -> str | None:
    """The prepared cache's fingerprint (eclip.prepare's hash of its options and sources), or
    None when its manifest cannot be read."""
    try:
        fp = json.loads((data / "manifest.json").read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    return fp if isinstance(fp, str) else None


def other_fingerprint(data: Path, recorded: str | None) -> str | None:
    """The fingerprint of the cache at ``data`` when it differs from the ``recorded`` one
    (another cache, or this one rebuilt with other options); None when they agree or either
    is unknown (a study journaled before fingerprints were)."""
    fp = data_fingerprint(data)
    return fp if recorded and fp and fp != recorded else None
