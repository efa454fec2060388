"""Disk use of the research loop: which runs keep their checkpoints, the free-space check
before a run, and a run that met a full disk (scripted runners that write checkpoint files
like the harness; the real harness's checkpoint is checked in test_agent_loop)."""

import json
from collections import namedtuple
from pathlib import Path

import pytest

from agent import disk, journal, loop
from agent.workspace import Workspace

MIB = 1 << 20
Usage = namedtuple("Usage", "total used free")


def writing_runner(ranks, size=MIB):
    """A fake runner that leaves a ``size``-byte checkpoint and the result (None: a crash
    after the checkpoint was written; a string: a crash whose log tail is that string)."""
    calls = iter(ranks)

    def fake(recipe, data, budget_s, out, **kw):
        rank = next(calls)
        (out / "checkpoint.safetensors").write_bytes(b"\0" * size)
        if rank is None:  # killed while encoding: the harness's files are left behind
            for name in ("eval_images.safetensors", "emb_texts.safetensors", "eval_images.log"):
                (out / name).write_bytes(b"\0" * 64)
        (out / "checkpoint.json").write_text("{}")
        ok = isinstance(rank, (int, float))
        result = {"status": "ok" if ok else "crash", "val_mean_rank": rank if ok else None}
        (out / "result.json").write_text(json.dumps(result))
        return dict(result, duration_s=0.01) if ok else dict(result, log_tail=rank or "Traceback: boom")
    return fake


def fill_during_the_third_run(monkeypatch, runner) -> None:
    """The loop's runs go to ``runner``; the disks are full (0 bytes free) from the end of
    the third run on, and as they are before."""
    runs = []

    def filling(recipe, data, budget_s, out, **kw):
        runs.append(out)
        return runner(recipe, data, budget_s, out, **kw)

    real_usage = disk.shutil.disk_usage
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: Usage(1, 1, 0) if len(runs) >= 3 else real_usage(p))
    monkeypatch.setattr(loop, "run_experiment", filling)


def run_loop(tmp_path, cache, *extra):
    return loop.main(["--tag", "d", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
                      "--noise-runs", "2", *extra])


def with_checkpoint(ws):
    return sorted(int(d.name) for d in ws.experiments.iterdir() if (d / "checkpoint.safetensors").exists())


def test_keep_set_by_policy():
    exps = [{"n": 1, "kind": "baseline", "status": "baseline", "val_mean_rank": 30.0, "ended": True},
            {"n": 2, "kind": "baseline", "status": "baseline", "val_mean_rank": 28.0, "ended": True},
            {"n": 3, "kind": "experiment", "status": "discard", "val_mean_rank": 29.0, "ended": True},
            {"n": 4, "kind": "experiment", "status": "crash", "val_mean_rank": None, "ended": True}]
    assert disk.keep_set(exps, "kept") == {1, 2}
    assert disk.keep_set(exps, "best") == {2}  # before any keep: the best-scoring baseline run
    assert disk.keep_set(exps, "none") == set() and disk.keep_set(exps, "all") is None
    exps += [{"n": 5, "kind": "experiment", "status": "keep", "kept": True, "val_mean_rank": 20.0, "ended": True},
             {"n": 6, "kind": "experiment", "status": "keep", "kept": True, "val_mean_rank": 15.0, "ended": True}]
    assert disk.keep_set(exps, "kept") == {1, 2, 5, 6}
    assert disk.keep_set(exps, "best") == {6}
    with pytest.raises(ValueError, match="'most': expected one of kept, best, all, none"):
        disk.keep_set(exps, "most")


def test_keep_set_looks_only_at_scored_baseline_runs():
    # A baseline run that failed left no model of the study's trail: "kept" lets its
    # checkpoint go. Before any keep, "best" is the best-scoring baseline run, not a discarded
    # experiment that scored lower within the noise floor (the loop's best is still the baseline).
    exps = [{"n": 1, "kind": "baseline", "status": "crash", "val_mean_rank": None, "ended": True},
            {"n": 2, "kind": "baseline", "status": "timeout", "val_mean_rank": None, "ended": True},
            {"n": 3, "kind": "baseline", "status": "baseline", "val_mean_rank": 30.0, "ended": True},
            {"n": 4, "kind": "baseline", "status": "baseline", "val_mean_rank": 28.0, "ended": True},
            {"n": 5, "kind": "experiment", "status": "discard", "val_mean_rank": 27.5, "ended": True}]
    assert disk.keep_set(exps, "kept") == {3, 4}
    assert disk.keep_set(exps, "best") == {4}


def test_only_baselines_and_kept_runs_keep_checkpoints_and_a_stricter_resume_frees_the_rest(
        small_cache, tmp_path, monkeypatch, capsys):
    # baselines 100, 100 (σ 0): 101 discard, 90 keep, a crash, 95 discard
    monkeypatch.setattr(loop, "run_experiment", writing_runner([100, 100, 101, 90, None, 95]))
    assert run_loop(tmp_path, small_cache, "--max-experiments", "4") == 0
    ws = Workspace(tmp_path / "d")
    assert with_checkpoint(ws) == [1, 2, 4]
    assert sorted(p.name for p in (ws.experiments / "5").glob("e*")) == ["eval_images.log"]  # the log stays
    for n in range(1, 7):  # the rest of each run's record stays
        assert json.loads((ws.experiments / str(n) / "result.json").read_text())["status"] in ("ok", "crash")
    exps = journal.experiments(journal.read(ws.journal_path))
    assert all(e["result"]["checkpoint_bytes"] == MIB + 2 for e in exps)  # journaled before the prune
    assert "checkpoints:    3 kept (0.00 GiB)" in capsys.readouterr().out

    assert run_loop(tmp_path, small_cache, "--max-experiments", "4", "--keep-checkpoints", "best") == 0
    assert with_checkpoint(ws) == [4]
    assert not (ws.experiments / "1" / "checkpoint.json").exists()
    out, err = capsys.readouterr()
    assert "checkpoints:    1 kept" in out
    assert "loop: deleted the checkpoints of 2 earlier runs (0.00 GiB), as --keep-checkpoints best says" in err


def test_a_short_disk_stops_the_loop_before_the_proposal(small_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "run_experiment", writing_runner([100, 100], size=4 * MIB))
    assert run_loop(tmp_path, small_cache, "--max-experiments", "0") == 0
    ws = Workspace(tmp_path / "d")
    events = len(journal.read(ws.journal_path))
    need = disk.needed_bytes(journal.experiments(journal.read(ws.journal_path)))
    assert need == int((4 * MIB + 2) * 1.25) + disk.MIN_FREE  # sized by the runs so far

    def proposer_called(*a, **k):
        raise AssertionError("a proposal was asked for although no run could follow")
    monkeypatch.setattr(loop.SearchProposer, "propose", proposer_called)
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: Usage(10 * need, 9 * need, need - 1))
    assert run_loop(tmp_path, small_cache, "--max-experiments", "3") == 1
    err = capsys.readouterr().err
    assert f"loop: stopping: {ws.root}: 1.0 GiB free, a run needs about 1.0 GiB" in err
    assert "--keep-checkpoints best or none" in err
    assert [e["event"] for e in journal.read(ws.journal_path)[events:]] == ["session"]  # nothing started

    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: Usage(10 * need, 9 * need, need))
    monkeypatch.setattr(loop.SearchProposer, "propose", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert run_loop(tmp_path, small_cache, "--max-experiments", "3") == 130  # enough room: it goes on


def test_a_run_that_met_a_full_disk_is_interrupted_and_stops_the_loop(small_cache, tmp_path, monkeypatch, capsys):
    tail = "  File \"eclip/fileio.py\", line 30\nOSError: [Errno 28] No space left on device"
    fill_during_the_third_run(monkeypatch, writing_runner([100, 100, tail, 80]))
    assert run_loop(tmp_path, small_cache, "--max-experiments", "2") == 1
    ws = Workspace(tmp_path / "d")
    exps = journal.experiments(journal.read(ws.journal_path))
    assert [e["status"] for e in exps] == ["baseline", "baseline", "interrupted"]
    assert exps[2]["result"]["reason"] == "out of disk space (the run's log: No space left on device)"
    assert ws.head() == ws.root_commit() and with_checkpoint(ws) == [1, 2]
    err = capsys.readouterr().err
    assert f"loop: stopping: a run ran out of disk space: {ws.root}: 0.0 GiB free, a run needs about 1.0 GiB" in err
    assert "--keep-checkpoints best or none" in err


def test_a_recipe_that_prints_no_space_left_while_the_disks_have_room_is_a_crash(small_cache, tmp_path,
                                                                                  monkeypatch, capsys):
    # found by a review: the words alone stopped the study (any proposal could halt it), and a
    # resumed study tried the same recipe again; with room on the disks the run is the recipe's
    tail = "ValueError: No space left on device"
    monkeypatch.setattr(loop, "run_experiment", writing_runner([100, 100, tail, 80]))
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: Usage(100 * disk.GIB, 0, 50 * disk.GIB))
    assert run_loop(tmp_path, small_cache, "--max-experiments", "2") == 0
    ws = Workspace(tmp_path / "d")
    exps = journal.experiments(journal.read(ws.journal_path))
    assert [e["status"] for e in exps] == ["baseline", "baseline", "crash", "keep"]
    assert exps[2]["result"]["reason"] == "its log says 'No space left on device', yet the disks have room now"
    assert "out_of_space" not in exps[2]["result"]
    assert "ran out of disk space" not in capsys.readouterr().err


def test_the_harnesss_disk_full_stops_the_loop_even_with_room_again(small_cache, tmp_path, monkeypatch, capsys):
    # an isolated run's copy of the training split failed and was removed: room again, yet
    # the recipe did nothing wrong, and the next run would fail the same way
    runner = writing_runner([100, 100, 90])

    def harness_full(recipe, data, budget_s, out, **kw):
        r = runner(recipe, data, budget_s, out, **kw)
        if len(list(out.parent.iterdir())) < 3:
            return r
        return {"status": "error", "val_mean_rank": None, "disk_full": True,
                "reason": "run/train_data: cannot write the cache", "log_tail": ""}

    monkeypatch.setattr(loop, "run_experiment", harness_full)
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: Usage(100 * disk.GIB, 0, 50 * disk.GIB))
    assert run_loop(tmp_path, small_cache, "--max-experiments", "2") == 1
    ws = Workspace(tmp_path / "d")
    exps = journal.experiments(journal.read(ws.journal_path))
    assert [e["status"] for e in exps] == ["baseline", "baseline", "interrupted"]
    assert exps[2]["result"]["reason"] == "out of disk space (run/train_data: cannot write the cache)"
    assert ("loop: stopping: a run ran out of disk space: the harness could not write (run/train_data: cannot write "
            "the cache); free some space") in capsys.readouterr().err


def test_a_run_that_failed_silently_on_a_disk_left_full_is_interrupted(small_cache, tmp_path, monkeypatch, capsys):
    # found by a review: the log lies on the full disk and cannot say so (empty, no result):
    # the run was a crash to repair, counted against the recipe
    fill_during_the_third_run(monkeypatch, writing_runner([100, 100, "", 80]))  # "": a log that says nothing
    assert run_loop(tmp_path, small_cache, "--max-experiments", "2") == 1
    ws = Workspace(tmp_path / "d")
    exps = journal.experiments(journal.read(ws.journal_path))
    assert [e["status"] for e in exps] == ["baseline", "baseline", "interrupted"]
    assert exps[2]["result"]["reason"] == (f"out of disk space (crash: no reason given; {ws.root}: 0 MiB free after the "
                                           "run; free some space)")
    assert f"loop: stopping: a run ran out of disk space: {ws.root}: 0 MiB free after the run" in capsys.readouterr().err


@pytest.mark.parametrize("tight", ["temporary directory", "workspace short of a run's room"])
def test_a_failed_run_on_a_machine_short_of_room_elsewhere_stays_the_recipes_failure(small_cache, tmp_path,
                                                                                      monkeypatch, tight):
    # a review: a small /tmp (a tmpfs, a container's disk) or a workspace between a run's need
    # and the files the failed run is about to lose to the prune made every failure "out of
    # space" and stopped the study; only a log that says so, or a disk too full to log, does
    import tempfile

    runner = writing_runner([100, 100, "Traceback: ValueError boom", 80])
    small = tmp_path / "tmp"
    small.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(small))
    room = {"temporary directory": (50 * disk.GIB, disk.GIB // 2),
            "workspace short of a run's room": (disk.GIB // 2, 50 * disk.GIB)}[tight]  # (workspace, tmp) free
    ran = []

    def counting(recipe, data, budget_s, out, **kw):
        ran.append(out)
        return runner(recipe, data, budget_s, out, **kw)

    def usage(p):  # the workspace: plenty before the failed run (the pre-run check), then ``room``
        free = room[1] if Path(p) == small else (room[0] if len(ran) == 3 else 50 * disk.GIB)
        return Usage(100 * disk.GIB, 0, free)

    monkeypatch.setattr(disk.shutil, "disk_usage", usage)
    monkeypatch.setattr(loop, "run_experiment", counting)
    assert run_loop(tmp_path, small_cache, "--max-experiments", "1") == 0
    exps = journal.experiments(journal.read(Workspace(tmp_path / "d").journal_path))
    assert [e["status"] for e in exps] == ["baseline", "baseline", "crash"]
    assert "out_of_space" not in exps[2]["result"]


def test_a_full_temporary_directory_counts_as_a_full_disk(tmp_path, monkeypatch):
    import tempfile

    other = tmp_path / "tmp"
    other.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(other))
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    room = {tmp_path: 2 * disk.GIB, other: disk.GIB // 2, home: 5 * disk.GIB}  # free bytes
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: Usage(10 * disk.GIB, 0, room[Path(p)]))
    assert disk.still_full(tmp_path, []) == (f"{other}: 0.50 GiB free in the temporary directory, a run needs 1 GiB; "
                                             "free some space")
    room[other] = disk.GIB
    assert disk.still_full(tmp_path, []) is None
    room[home] = disk.GIB - (1 << 20)  # compilers' caches (~/.triton, ~/.cache) lie there
    assert disk.still_full(tmp_path, []).startswith(f"{home}: 1.00 GiB free in the home directory")
    room[tmp_path] = disk.GIB - 1  # a run needs MIN_FREE at least
    assert disk.still_full(tmp_path, []).startswith(f"{tmp_path}: 1.0 GiB free, a run needs about 1.0 GiB")


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT"])  # a quota's limit, as the harness's disk_full counts it
def test_a_full_disk_under_the_loops_own_writes_stops_it_with_its_summary(small_cache, tmp_path, monkeypatch,
                                                                         capsys, code):
    import errno
    import os

    monkeypatch.setattr(loop, "run_experiment", writing_runner([100, 100, 90]))
    real = journal.append
    number = getattr(errno, code)

    def append(path, event):
        if event.get("event") == "start" and event.get("kind") == "experiment":
            raise OSError(number, os.strerror(number), str(path))
        real(path, event)

    monkeypatch.setattr(journal, "append", append)
    assert run_loop(tmp_path, small_cache, "--max-experiments", "1") == 1
    out, err = capsys.readouterr()
    ws = Workspace(tmp_path / "d")
    assert f"loop: stopping: {ws.journal_path}: {os.strerror(number)}; free some space, then resume" in err
    assert "best_mean_rank: 100" in out and ws.head() == ws.root_commit()


def test_a_full_disk_as_a_session_begins_is_one_line_not_a_traceback(small_cache, tmp_path, monkeypatch, capsys):
    import errno

    monkeypatch.setattr(loop, "run_experiment", writing_runner([100, 100]))
    assert run_loop(tmp_path, small_cache, "--max-experiments", "0") == 0
    ws = Workspace(tmp_path / "d")
    before = ws.journal_path.read_bytes()

    def full(path, event):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(journal, "append", full)  # the session line
    capsys.readouterr()
    assert run_loop(tmp_path, small_cache, "--max-experiments", "1") == 1
    assert capsys.readouterr().err.splitlines()[-1] == (f"loop: stopping: {ws.journal_path}: No space left on device; "
                                                        "free some space, then resume")
    assert ws.journal_path.read_bytes() == before


def test_prune_spares_runs_in_flight_and_clears_what_killed_runs_left(tmp_path):
    exps = [{"n": 1, "kind": "experiment", "status": "timeout", "ended": True},
            {"n": 2, "kind": "experiment", "ended": False}]  # the run under way
    names = ("checkpoint.safetensors", "checkpoint.json", "eval_images.safetensors", "emb_texts.safetensors",
             ".checkpoint.safetensors.tmp-4242", "eval_texts.log", "run.log", ".train_data.lock")
    # an isolated run's copies, an encoder's folder, the training split's copy a killed harness
    # was writing (a folder matching a loose file's pattern: its unlink once raised IsADirectoryError)
    folders = ("eval_images", "train_data", "compile_cache", ".train_data.tmp-4242-x1y2")
    # a final run killed mid-way (agent.report --final): in no experiment's record, and its
    # folder lives outside the workspace through a link, which is left alone
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    for run in ("1", "2", "final-abc1234", elsewhere):
        (tmp_path / run).mkdir()
        for name in names:
            (tmp_path / run / name).write_bytes(b"\0" * 10)
        for name in folders:
            (tmp_path / run / name / "inner").mkdir(parents=True)
            (tmp_path / run / name / "inner" / "f").write_bytes(b"\0" * 5)
    (tmp_path / "final-def5678").symlink_to(elsewhere)
    assert disk.prune(tmp_path, exps, "all") == (0, 120)  # checkpoints stay; the leftovers go
    left = ["checkpoint.json", "checkpoint.safetensors", "eval_texts.log", "run.log"]
    assert sorted(p.name for p in (tmp_path / "1").iterdir()) == left
    assert sorted(p.name for p in (tmp_path / "final-abc1234").iterdir()) == left
    assert disk.prune(tmp_path, exps, "kept") == (1, 20)  # a final run's checkpoint is the study's product
    assert sorted(p.name for p in (tmp_path / "1").iterdir()) == ["eval_texts.log", "run.log"]
    assert sorted(p.name for p in (tmp_path / "final-abc1234").iterdir()) == left
    for run in ("2", elsewhere):  # untouched
        assert sorted(p.name for p in (tmp_path / run).iterdir()) == sorted(names + folders)
    # a study journaled before sizes were: the checkpoints still on disk size the next run
    assert disk.needed_bytes([{"n": 2}], tmp_path) == int(20 * 1.25) + disk.MIN_FREE
