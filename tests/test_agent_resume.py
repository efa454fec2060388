"""Resume after ``kill -9`` at every phase of an experiment.

A driver process runs the real loop with a scripted runner and SIGKILLs itself at one
phase of the first experiment after the baselines; a restart (in-process, scripted) must
reconcile git, journal and experiment folders and continue: nothing recorded lost or
duplicated, the tree at the best commit, numbering continued. The journal is checked line
by line. A last test kills a loop whose harness run is real and checks the run dies with it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import journal, loop, records
from agent.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]

# The driver: the loop with a scripted runner that writes result.json like the harness,
# and a SIGKILL of its own process at the named phase of experiment 3.
DRIVER = r'''
import json, os, signal, sys
from agent import journal, loop
from agent.workspace import Workspace

phase, ranks, argv = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
calls = iter(ranks)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

def fake_runner(recipe, data, budget_s, out, **kw):
    rank = next(calls)
    if phase == "during-run" and rank == "KILL":
        die()
    result = {"status": "ok", "val_mean_rank": rank}
    (out / "result.json").write_text(json.dumps(result))
    return dict(result, duration_s=0.01)

loop.run_experiment = fake_runner
real_commit, real_append = Workspace.commit, journal.append

def commit(self, message):
    if phase == "before-commit" and message.startswith("experiment"):
        die()
    sha = real_commit(self, message)
    if phase == "after-commit":
        die()
    return sha

def append(path, event):
    if event.get("event") == "end" and event.get("n") == 3:
        if phase == "before-end":
            die()
        if phase == "during-end":
            with open(path, "a") as f:  # half of the line reaches the disk, then the kill
                f.write(json.dumps(event)[:25])
                f.flush()
                os.fsync(f.fileno())
            die()
    real_append(path, event)

Workspace.commit, journal.append = commit, append
sys.exit(loop.main(argv))
'''


def _args(root, cache, max_experiments):
    return ["--tag", "k", "--workspace-root", str(root), "--data", str(cache), "--budget-s", "1",
            "--noise-runs", "2", "--max-experiments", str(max_experiments)]


def _scripted(ranks):
    calls = iter(ranks)

    def fake(recipe, data, budget_s, out, **kw):
        result = {"status": "ok", "val_mean_rank": next(calls)}
        (out / "result.json").write_text(json.dumps(result))
        return dict(result, duration_s=0.01)
    return fake


def _lines(ws):
    """The journal's raw lines: (event, n, status) per parsed line, 'TORN' for a torn one."""
    out = []
    for line in ws.journal_path.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            out.append("TORN")
            continue
        out.append((e["event"], e.get("n"), e.get("status")))
    return out


BASE = [("session", None, None), ("start", 1, None), ("end", 1, "baseline"), ("start", 2, None),
        ("end", 2, "baseline")]
S = ("session", None, None)
START3, START4 = ("start", 3, None), ("start", 4, None)


@pytest.mark.parametrize("phase, first_run, pre, post", [
    # killed with the new recipe written but not committed: nothing of experiment 3 was
    # recorded, so the restart proposes it again (same seed, same history) under number 3
    ("before-commit", [], [], [S, START3, ("end", 3, "keep"), START4, ("end", 4, "discard")]),
    # committed, not journaled: the commit is left dangling, the proposal repeated
    ("after-commit", [], [], [S, START3, ("end", 3, "keep"), START4, ("end", 4, "discard")]),
    # the run in flight: recorded interrupted at restart, the next number continues
    ("during-run", ["KILL"], [START3], [("end", 3, "interrupted"), S, START4, ("end", 4, "keep")]),
    # the run finished and wrote result.json, the end line never came: its real outcome is recovered
    ("before-end", [80], [START3], [("end", 3, "keep"), S, START4, ("end", 4, "discard")]),
    # half of the end line written: skipped on reading, the outcome recovered from result.json
    ("during-end", [80], [START3, "TORN"], [("end", 3, "keep"), S, START4, ("end", 4, "discard")]),
])
def test_kill_at_each_phase_then_resume(small_cache, tmp_path, phase, first_run, pre, post):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", DRIVER, phase, json.dumps([100, 100, *first_run]),
                           *_args(tmp_path, small_cache, 2)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ws = Workspace(tmp_path / "k")
    before = ws.journal_path.read_text()
    assert _lines(ws) == BASE + pre
    # the restart; an interrupted experiment does not count towards --max-experiments (it
    # scored nothing, by no fault of the recipe's): after one, 1 more makes the study's 1
    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "run_experiment", _scripted({"during-run": [80], "before-end": [95],
                                                  "during-end": [95]}.get(phase, [80, 95])))
    try:
        assert loop.main(_args(tmp_path, small_cache, 1 if phase == "during-run" else 2)) == 0
    finally:
        mp.undo()
    assert ws.journal_path.read_text().startswith(before)  # append-only: no old byte changed
    assert _lines(ws) == BASE + pre + post
    exps = journal.experiments(journal.read(ws.journal_path))
    assert [e["n"] for e in exps] == [1, 2, 3, 4]  # nothing lost, nothing twice
    best = records.state(exps, ws.git("rev-list", "--max-parents=0", "HEAD"), 0.0)
    assert ws.head() == best["best_commit"] == next(e["commit"] for e in exps if e.get("kept"))
    assert ws.git("status", "--porcelain") == ""
    rows = ws.results_path.read_text().splitlines()[1:]
    assert [r.split("\t")[4] for r in rows] == [e["status"] for e in exps]
    if phase in ("before-end", "during-end"):
        assert exps[2]["result"]["recovered"] is True and exps[2]["val_mean_rank"] == 80


def _procs_mentioning(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(pid))
    return found


def test_a_real_run_dies_with_the_loop(small_cache, tmp_path):
    """kill -9 of the loop while a real harness run trains: the run notices and exits."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "agent.loop", "--tag", "orphan", "--workspace-root", str(tmp_path),
           "--data", str(small_cache), "--budget-s", "600", "--noise-runs", "1", "--device", "cpu"]
    loop_proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ws = Workspace(tmp_path / "orphan")
    marker = str(ws.experiments / "1")
    try:
        deadline = time.time() + 60
        while not _procs_mentioning(marker) and time.time() < deadline:
            time.sleep(0.2)
        assert _procs_mentioning(marker), "the harness run never started"
        time.sleep(1.0)
    finally:
        loop_proc.kill()
        loop_proc.wait()
    deadline = time.time() + 15
    while _procs_mentioning(marker) and time.time() < deadline:
        time.sleep(0.2)
    survivors = _procs_mentioning(marker)
    for pid in survivors:  # never leave a 600 s run behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert survivors == []
    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "run_experiment", _scripted([100]))
    try:
        assert loop.main(["--tag", "orphan", "--workspace-root", str(tmp_path), "--data", str(small_cache),
                          "--budget-s", "1", "--noise-runs", "1", "--max-experiments", "0"]) == 0
    finally:
        mp.undo()
    exps = journal.experiments(journal.read(ws.journal_path))
    assert [(e["n"], e["status"]) for e in exps] == [(1, "interrupted"), (2, "baseline")]


def _without_start_lines(ws, numbers, legacy: bool):
    """The journal with the start lines of ``numbers`` gone (a hand edit, damage); ``legacy``:
    its end lines also lose what they repeat of the start (as written before they did)."""
    lines = []
    for line in ws.journal_path.read_text().splitlines():
        e = json.loads(line)
        if e.get("event") == "start" and e.get("n") in numbers:
            continue
        if legacy and e.get("event") == "end":
            e = {k: v for k, v in e.items() if k not in ("kind", "commit", "description")}
        lines.append(json.dumps(e))
    ws.journal_path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("legacy", [False, True])
def test_lost_start_lines_neither_crash_the_loop_nor_lose_a_baseline(small_cache, tmp_path, monkeypatch, capsys,
                                                                      legacy):
    monkeypatch.setattr(loop, "run_experiment", _scripted([100, 104, 90, 95]))
    assert loop.main(_args(tmp_path, small_cache, 2)) == 0  # 1, 2 baselines; 3 keep; 4 discard
    ws = Workspace(tmp_path / "k")
    kept = next(e for e in journal.experiments(journal.read(ws.journal_path)) if e.get("kept"))["commit"]
    _without_start_lines(ws, {1, 3}, legacy)
    capsys.readouterr()
    if legacy:  # the kept experiment's commit is recorded nowhere: one line, nothing appended
        before = ws.journal_path.read_text()
        assert loop.main(_args(tmp_path, small_cache, 2)) == 1
        assert capsys.readouterr().err.strip() == (
            "loop: error: experiment 3 was kept, but no journal line of it records its commit (its start line is "
            "missing or damaged): the best recipe is unknown. Restore the line; the workspace's git log names each "
            "experiment's commit")
        assert ws.journal_path.read_text() == before
        from agent import report

        assert report.main([str(ws.root), "--final"]) == 2
        assert capsys.readouterr().err.startswith("report: error: experiment 3 was kept, but no journal line")
        # a scored run's status still tells its kind: baseline 1 still counts for the noise floor
        exps = journal.experiments(journal.read(ws.journal_path))
        assert [e.get("kind") for e in exps] == ["baseline", "baseline", "experiment", "experiment"]
        return
    # the end lines say it all: both baselines still set the noise floor (σ of 100 and 104),
    # their checkpoints' rule still applies, and the kept commit is still the best
    st = records.state(journal.experiments(journal.read(ws.journal_path)), ws.root_commit(), 0.0)
    assert (st["baselines"], st["best_commit"], st["threshold"]) == (2, kept, pytest.approx(2 * 2 ** 1.5))
    assert loop.main(_args(tmp_path, small_cache, 2)) == 0
    assert "noise floor was fixed by" not in capsys.readouterr().err and ws.head() == kept


def _drop_lines(ws, keep):
    """The journal with only the lines ``keep(event)`` accepts (damage, or a hand edit)."""
    lines = [line for line in ws.journal_path.read_text().splitlines() if keep(json.loads(line))]
    ws.journal_path.write_text("\n".join(lines) + "\n")


def test_two_runs_recovered_at_once_are_judged_one_after_the_other(small_cache, tmp_path, monkeypatch, capsys):
    # 3 (90) is kept; 4 (92) is a discard against it, though it beats the baselines' 102. Both
    # end lines lost, both results on disk: recovering 3 as keep must count when 4 is judged
    monkeypatch.setattr(loop, "run_experiment", _scripted([100, 104, 90, 92]))
    assert loop.main(_args(tmp_path, small_cache, 2)) == 0
    ws = Workspace(tmp_path / "k")
    kept = next(e for e in journal.experiments(journal.read(ws.journal_path)) if e.get("kept"))["commit"]
    _drop_lines(ws, lambda e: not (e["event"] == "end" and e.get("n") in (3, 4)))
    assert loop.main(_args(tmp_path, small_cache, 2)) == 0  # nothing left to run: recovery only
    exps = journal.experiments(journal.read(ws.journal_path))
    assert [(e["n"], e["status"], e["kept"]) for e in exps] == [
        (1, "baseline", False), (2, "baseline", False), (3, "keep", True), (4, "discard", False)]
    assert ws.head() == kept
    assert [line.split("\t")[4] for line in ws.results_path.read_text().splitlines()[1:]] == [
        "baseline", "baseline", "keep", "discard"]


def test_a_recovered_result_with_the_loops_own_status_is_a_crash_not_a_dead_journal(small_cache, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setattr(loop, "run_experiment", _scripted([100, 104, 90]))
    assert loop.main(_args(tmp_path, small_cache, 1)) == 0
    ws = Workspace(tmp_path / "k")
    _drop_lines(ws, lambda e: not (e["event"] == "end" and e.get("n") == 3))
    # what a recipe's code can leave in place of the harness's result: a status of the loop's
    (ws.experiments / "3" / "result.json").write_text(json.dumps({"status": "keep", "val_mean_rank": None}))
    assert loop.main(_args(tmp_path, small_cache, 1)) == 0
    e3 = journal.experiments(journal.read(ws.journal_path))[2]
    assert (e3["status"], e3["kept"], e3["result"]["reason"]) == (
        "crash", False, "the run's result.json has status 'keep' and val_mean_rank None")
    assert loop.main(_args(tmp_path, small_cache, 1)) == 0  # and the next session runs as ever


@pytest.mark.parametrize("budget", ["1", "30"])
def test_a_study_whose_first_session_line_is_lost_checks_no_settings_silently(small_cache, tmp_path, monkeypatch,
                                                                             capsys, budget):
    monkeypatch.setattr(loop, "run_experiment", _scripted([100, 104]))
    assert loop.main(_args(tmp_path, small_cache, 0)) == 0
    ws = Workspace(tmp_path / "k")
    _drop_lines(ws, lambda e: e["event"] != "session")
    before = ws.journal_path.read_text()
    capsys.readouterr()
    argv = _args(tmp_path, small_cache, 1)
    argv[argv.index("--budget-s") + 1] = budget  # another budget, or the same: neither can be checked
    assert loop.main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"loop: error: {tmp_path / 'k'}: the journal holds no readable session line from before the study's first "
        "baseline (damaged, or a journal older than those lines), so the --data, --budget-s and --device its scores "
        "were measured with are unknown and this session's cannot be checked against them: restore the line, or "
        "start a new --tag")
    assert ws.journal_path.read_text() == before


def test_the_first_baselines_end_line_dates_it_when_its_start_line_is_lost(small_cache, tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.setattr(loop, "run_experiment", _scripted([100, 104]))
    assert loop.main(_args(tmp_path, small_cache, 0)) == 0
    ws = Workspace(tmp_path / "k")
    _drop_lines(ws, lambda e: not (e["event"] == "start" and e.get("n") in (1, 2)))  # both baselines'
    argv = _args(tmp_path, small_cache, 0)
    assert loop.main(argv) == 0  # the session line before the end line still holds the settings
    argv[argv.index("--budget-s") + 1] = "30"
    capsys.readouterr()
    assert loop.main(argv) == 2
    assert "this study's scores were measured with --budget-s 1.0" in capsys.readouterr().err


def test_a_journal_with_no_readable_run_is_refused_not_begun_again(small_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "run_experiment", _scripted([100, 104, 90]))
    assert loop.main(_args(tmp_path, small_cache, 1)) == 0
    ws = Workspace(tmp_path / "k")
    head, table = ws.head(), ws.results_path.read_text()
    ws.journal_path.write_text("".join("#" + line + "\n" for line in ws.journal_path.read_text().splitlines()))
    capsys.readouterr()
    assert loop.main(_args(tmp_path, small_cache, 1)) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"loop: error: {ws.journal_path}: no readable run in it, but {ws.experiments} holds 3 runs; "
                       "restore the journal, or use another --tag")
    assert ws.head() == head and ws.results_path.read_text() == table  # the kept commit and the table untouched


def test_a_results_table_with_no_rows_left_is_rewritten_not_appended_to(tmp_path):
    path = tmp_path / "results.tsv"
    path.write_text("commit\tval_mean_rank\nabc\t1.0\n")  # a table of runs the journal no longer holds
    journal.rebuild_results(path, [{"event": "start", "n": 1, "time": 0.0, "kind": "baseline", "commit": "x"}])
    assert path.read_text() == "\t".join(journal.COLUMNS) + "\n"
    journal.rebuild_results(tmp_path / "none.tsv", [])
    assert not (tmp_path / "none.tsv").exists()  # no table and nothing to put in it: none made


def test_a_folder_in_place_of_the_results_table_is_one_line(small_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "run_experiment", _scripted([100, 104]))
    assert loop.main(_args(tmp_path, small_cache, 0)) == 0
    ws = Workspace(tmp_path / "k")
    ws.results_path.unlink()
    ws.results_path.mkdir()
    capsys.readouterr()
    assert loop.main(_args(tmp_path, small_cache, 0)) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"loop: error: {ws.results_path}: Is a directory; mend it, then resume"], err
