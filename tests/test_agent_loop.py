"""The research loop: keep/discard against the noise floor (scripted runner), resume and
restarts across sessions, stops, timeouts with no surviving process, --isolate, and one whole
loop with real harness runs."""

import json
import os
import time

import pytest

from agent import journal, loop, records
from agent.runner import run_experiment
from agent.workspace import Workspace
from eclip.train import TEMPLATE


@pytest.fixture
def cache(small_cache):
    return small_cache


def scripted(ranks):
    """A fake runner returning the given mean ranks in order (None: a crash)."""
    calls = iter(ranks)

    def fake(recipe, data, budget_s, out, **kw):
        r = next(calls)
        return {"status": "ok", "val_mean_rank": r, "duration_s": 0.1} if r is not None else \
            {"status": "crash", "val_mean_rank": None, "log_tail": "Traceback: boom"}
    return fake


def test_keep_and_discard_against_the_noise_floor(cache, tmp_path, monkeypatch, capsys):
    # baselines 100, 102, 98 → best 100, σ = 2, threshold 4: 97 is noise, 90 a real gain.
    monkeypatch.setattr(loop, "run_experiment", scripted([100, 102, 98, 97, 90, None, 89]))
    rc = loop.main(["--tag", "t", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
                    "--max-experiments", "4"])
    assert rc == 0
    ws = Workspace(tmp_path / "t")
    exps = journal.experiments(journal.read(ws.journal_path))
    assert [e["status"] for e in exps] == ["baseline"] * 3 + ["discard", "keep", "crash", "discard"]
    kept = exps[4]
    assert ws.head() == kept["commit"]  # the tree sits at the best commit
    changed = ws.git("diff", "--name-only", kept["commit"] + "^", kept["commit"]).split()
    assert "recipe.py" in changed  # the kept commit holds the change, not only the journal's word
    assert ws.git("status", "--porcelain") == ""
    rows = ws.results_path.read_text().splitlines()
    assert rows[0].split("\t") == list(journal.COLUMNS) and len(rows) == 8
    assert rows[5].split("\t")[4] == "keep"
    for e in exps[3:]:
        assert (ws.experiments / str(e["n"]) / "diff.patch").read_text()  # kept and discarded alike
    assert (ws.root / "progress.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "best_mean_rank: 90" in out
    # every run gets its line, the baselines' minutes too
    assert "loop: #1 baseline  val_mean_rank 100.00 (baseline 1 of 3, for the noise floor)" in out
    assert "loop: #3 baseline  val_mean_rank 98.00 (baseline 3 of 3, for the noise floor)" in out


def test_a_journal_cut_by_hand_never_has_a_run_written_over_an_earlier_ones_folder(cache, tmp_path, monkeypatch):
    # found by a review: the next number came from the journal alone; with its last lines
    # removed, the next run wrote into the folder of the run they had recorded
    def marking(ranks, session):
        fake = scripted(ranks)

        def run(recipe, data, budget_s, out, **kw):
            (out / "mine").write_text(session)  # which session's run wrote the folder
            return fake(recipe, data, budget_s, out, **kw)
        return run

    argv = ["--tag", "t", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
            "--noise-runs", "2"]
    monkeypatch.setattr(loop, "run_experiment", marking([100, 100, 90], "first"))
    assert loop.main(argv + ["--max-experiments", "1"]) == 0
    ws = Workspace(tmp_path / "t")
    lines = ws.journal_path.read_text().splitlines(keepends=True)
    ws.journal_path.write_text("".join(line for line in lines if '"n": 3' not in line))  # experiment 3's lines
    monkeypatch.setattr(loop, "run_experiment", marking([95], "second"))
    assert loop.main(argv + ["--max-experiments", "1"]) == 0
    assert (ws.experiments / "3" / "mine").read_text() == "first"  # untouched
    exps = journal.experiments(journal.read(ws.journal_path))
    assert [e["n"] for e in exps] == [1, 2, 4] and (ws.experiments / "4" / "mine").read_text() == "second"


def test_resume_records_the_run_in_flight_and_continues(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "run_experiment", scripted([100, 100]))
    assert loop.main(["--tag", "r", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
                      "--noise-runs", "2", "--max-experiments", "0"]) == 0
    ws = Workspace(tmp_path / "r")
    # the loop dies (kill -9) after committing and journaling the start of experiment 3
    ws.recipe.write_text(ws.recipe.read_text().replace('"lr": 1e-3', '"lr": 5e-4'))
    commit = ws.commit("experiment 3: lr")
    journal.append(ws.journal_path, {"event": "start", "n": 3, "kind": "experiment", "commit": commit,
                                     "description": "lr 1e-3 -> 5e-4", "hparams": {}, "time": time.time()})
    with open(ws.journal_path, "a") as f:
        f.write('{"event": "end", "n": 3, "sta')  # torn mid-write
    # it died while the harness evaluated: the training process's result, not yet scored
    run3 = ws.experiments / "3"
    run3.mkdir(parents=True, exist_ok=True)
    (run3 / "result.json").write_text(json.dumps({"status": "ok", "val_mean_rank": None, "ranked_by": "caller"}))
    monkeypatch.setattr(loop, "run_experiment", scripted([80]))
    assert loop.main(["--tag", "r", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
                      "--noise-runs", "2", "--max-experiments", "1"]) == 0  # the interrupted one does not count
    assert "loop: stopping: --max-experiments 1 reached (interrupted runs do not count)" in capsys.readouterr().err
    exps = journal.experiments(journal.read(ws.journal_path))
    assert [(e["n"], e["status"]) for e in exps] == [(1, "baseline"), (2, "baseline"), (3, "interrupted"), (4, "keep")]
    assert ws.head() == exps[3]["commit"] and "lr 1e-3 -> 5e-4" not in ws.git("log", "-1", "--format=%s")


def test_a_recipe_that_never_returns_is_killed_as_timeout(cache, tmp_path):
    text = TEMPLATE.read_text() + "\n\ndef train_step(model, optimizer, batch, progress):\n    while True:\n        pass\n"
    recipe = tmp_path / "recipe.py"
    recipe.write_text(text)
    out = tmp_path / "run"
    r = run_experiment(recipe, cache, 1.0, out, device="cpu", timeout_s=12)
    assert r["status"] == "timeout" and r["val_mean_rank"] is None
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    for pid in pids:  # nothing of that run survives
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        assert str(out).encode() not in cmdline, pid


def test_a_whole_loop_with_real_runs(cache, tmp_path, capsys):
    rc = loop.main(["--tag", "real", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1.5",
                    "--noise-runs", "2", "--max-experiments", "3", "--device", "cpu"])
    assert rc == 0
    ws = Workspace(tmp_path / "real")
    exps = journal.experiments(journal.read(ws.journal_path))
    assert [e["status"] for e in exps[:2]] == ["baseline", "baseline"] and len(exps) == 5
    assert all(e["status"] in ("keep", "discard", "diverged", "no-op") for e in exps[2:])
    for e in exps:
        if e["status"] in ("baseline", "keep", "discard"):
            result = json.loads((ws.experiments / str(e["n"]) / "result.json").read_text())
            assert result["status"] == "ok" and result["val_mean_rank"] == e["val_mean_rank"]
        # the harness's checkpoint, kept for baselines and kept experiments only (--keep-checkpoints kept)
        assert (ws.experiments / str(e["n"]) / "checkpoint.safetensors").exists() == \
            (e["status"] in ("baseline", "keep"))
        if e["status"] in ("baseline", "keep", "discard"):
            assert e["result"]["checkpoint_bytes"] > 10_000
    assert ws.git("status", "--porcelain") == ""


def test_results_table_is_rebuilt_from_the_journal(cache, tmp_path, monkeypatch):
    # A kill between the journal line and the table row: the row comes back, never twice.
    monkeypatch.setattr(loop, "run_experiment", scripted([100, 100, 80]))
    args = ["--tag", "x", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
            "--noise-runs", "2", "--max-experiments", "1"]
    assert loop.main(args) == 0
    ws = Workspace(tmp_path / "x")
    full = ws.results_path.read_text()
    ws.results_path.write_text("".join(full.splitlines(keepends=True)[:-1]))  # the last row lost
    assert loop.main(args) == 0  # nothing left to run; the restart reconciles
    assert ws.results_path.read_text() == full


def test_a_study_resumes_only_under_the_settings_its_scores_were_measured_with(cache, tmp_path, monkeypatch,
                                                                                capsys):
    # A resume with another cache, budget or device once went on without a word: its runs
    # were kept or discarded against a best and a noise floor measured under other settings.
    monkeypatch.setattr(loop, "run_experiment", scripted([100, 100, 90, 80]))
    base = ["--tag", "s", "--workspace-root", str(tmp_path), "--data", str(cache), "--device", "cpu"]
    assert loop.main([*base, "--budget-s", "10", "--noise-runs", "2", "--max-experiments", "1"]) == 0
    capsys.readouterr()
    other = tmp_path / "other-cache"
    other.mkdir()
    (other / "manifest.json").write_text("{}")
    for argv, was, now in [(["--budget-s", "5"], "--budget-s 10.0", "--budget-s 5.0"),
                           (["--budget-s", "10.000001", "--device", "auto"], "--budget-s 10.0 --device cpu",
                            "--budget-s 10.000001 --device auto"),
                           (["--budget-s", "10", "--data", str(other)], f"--data {cache.resolve()}",
                            f"--data {other.resolve()}")]:
        rc = loop.main([*base, *argv, "--max-experiments", "2"])
        err = capsys.readouterr().err
        assert rc == 2 and err == (f"loop: error: {tmp_path / 's'}: this study's scores were measured with {was}; "
                                   f"this session asks {now}. Scores under other settings do not compare: "
                                   "resume with the study's, or start a new --tag\n"), err
    exps = journal.experiments(journal.read(Workspace(tmp_path / "s").journal_path))
    assert len(exps) == 3  # nothing ran under the other settings
    # the default --data, missing in this folder, is refused before it is prepared (minutes)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop.subprocess, "run", lambda *a, **k: pytest.fail("prepared before the refusal"))
    rc = loop.main(["--tag", "s", "--workspace-root", str(tmp_path), "--device", "cpu", "--budget-s", "10"])
    assert rc == 2 and "this study's scores were measured with --data" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(loop, "run_experiment", scripted([70]))
    assert loop.main([*base, "--budget-s", "10", "--max-experiments", "2"]) == 0  # the study's own: it goes on
    assert len(journal.experiments(journal.read(Workspace(tmp_path / "s").journal_path))) == 4


def test_a_cache_rebuilt_in_place_is_other_data(cache, tmp_path, monkeypatch, capsys):
    # the same path, prepared again with other options: half the validation images once
    # halved the mean rank, and the loop kept the next experiment for it
    import shutil

    data = tmp_path / "data"
    shutil.copytree(cache, data)
    monkeypatch.setattr(loop, "run_experiment", scripted([100, 100, 70]))
    base = ["--tag", "s", "--workspace-root", str(tmp_path), "--data", str(data), "--budget-s", "1", "--noise-runs", "2"]
    assert loop.main([*base, "--max-experiments", "0"]) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    study_fp = manifest["fingerprint"]
    (data / "manifest.json").write_text(json.dumps(dict(manifest, fingerprint="0123456789abcdef0123")))
    capsys.readouterr()
    assert loop.main([*base, "--max-experiments", "1"]) == 2
    assert capsys.readouterr().err == (
        f"loop: error: {data}: the cache was rebuilt since this study's scores were measured on it (its fingerprint is "
        f"0123456789ab, the study's {study_fp[:12]}). Scores on other data do not compare: restore the cache, or "
        "start a new --tag\n")
    (data / "manifest.json").write_text(json.dumps(manifest))  # restored: the study goes on
    assert loop.main([*base, "--max-experiments", "1"]) == 0
    assert [e["status"] for e in journal.experiments(journal.read(Workspace(tmp_path / "s").journal_path))] == [
        "baseline", "baseline", "keep"]


def test_a_brief_edited_by_hand_survives_discards_and_lands_with_the_next_commit(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "run_experiment", scripted([100, 100]))
    args = ["--tag", "b", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
            "--noise-runs", "2", "--max-experiments", "0"]
    assert loop.main(args) == 0
    ws = Workspace(tmp_path / "b")
    brief = ws.root / "program.md"
    brief.write_text(brief.read_text() + "\nIdea: try a smaller learning rate.\n")
    monkeypatch.setattr(loop, "run_experiment", scripted([120, 90]))  # a discard, then a keep
    assert loop.main(args[:-1] + ["2"]) == 0
    exps = journal.experiments(journal.read(ws.journal_path))
    assert [e["status"] for e in exps[2:]] == ["discard", "keep"]
    assert "Idea: try a smaller learning rate." in ws.git("show", f"{exps[3]['commit']}:program.md")
    assert ws.git("status", "--porcelain") == ""


def test_sigterm_stops_the_loop_as_ctrl_c_does(cache, tmp_path, monkeypatch, capsys):
    # a scheduler preempting the loop: the run in flight is journaled interrupted and the
    # tree goes back to the best commit, with the summary block printed
    import signal

    runs = scripted([100, 100])

    def runner(recipe, data, budget_s, out, **kw):
        if (out / "diff.patch").read_text():  # the first experiment (baselines have no diff)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            raise AssertionError("SIGTERM was not taken as Ctrl-C")
        return runs(recipe, data, budget_s, out, **kw)

    monkeypatch.setattr(loop, "run_experiment", runner)
    rc = loop.main(["--tag", "s", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
                    "--noise-runs", "2", "--max-experiments", "3"])
    assert rc == 130 and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ws = Workspace(tmp_path / "s")
    exps = journal.experiments(journal.read(ws.journal_path))
    assert [e["status"] for e in exps] == ["baseline", "baseline", "interrupted"]
    assert ws.head() == ws.root_commit() and "best_mean_rank: 100" in capsys.readouterr().out


def test_interrupted_baselines_are_not_failures_of_the_recipe(cache, tmp_path, monkeypatch):
    # Each stop during a baseline (Ctrl-C, a scheduler) once counted as a failed attempt:
    # after 2 × --noise-runs of them every resume refused, "the baseline recipe keeps failing".
    def stopped(recipe, data, budget_s, out, **kw):
        raise KeyboardInterrupt

    argv = ["--tag", "i", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
            "--noise-runs", "1", "--max-experiments", "0"]
    monkeypatch.setattr(loop, "run_experiment", stopped)
    assert [loop.main(argv) for _ in range(3)] == [130] * 3
    monkeypatch.setattr(loop, "run_experiment", scripted([50]))
    assert loop.main(argv) == 0
    exps = journal.experiments(journal.read(Workspace(tmp_path / "i").journal_path))
    assert [e["status"] for e in exps] == ["interrupted"] * 3 + ["baseline"]


def test_failed_baselines_of_an_earlier_session_do_not_stop_a_new_one(cache, tmp_path, monkeypatch, capsys):
    # a session with a bad option (a device the machine lacks) fails its baselines; they once
    # counted for good, and every later session was refused at once
    argv = ["--tag", "f", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
            "--noise-runs", "1", "--max-experiments", "0"]
    monkeypatch.setattr(loop, "run_experiment", scripted([None, None, None]))
    with pytest.raises(SystemExit, match="the baseline recipe failed 2 times this session"):
        loop.main(argv)
    monkeypatch.setattr(loop, "run_experiment", scripted([40.0]))
    assert loop.main(argv) == 0
    exps = journal.experiments(journal.read(Workspace(tmp_path / "f").journal_path))
    assert [e["status"] for e in exps] == ["crash", "crash", "baseline"]


def test_more_noise_runs_after_the_experiments_began_are_not_run(cache, tmp_path, monkeypatch, capsys):
    # A baseline after a keep once reset the best score to the baseline mean while the best
    # commit stayed the kept one: a later experiment worse than the kept one could be kept.
    argv = ["--tag", "n", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1"]
    monkeypatch.setattr(loop, "run_experiment", scripted([10, 5]))
    assert loop.main([*argv, "--noise-runs", "1", "--max-experiments", "1"]) == 0
    # one baseline measures no spread: said, rather than a floor of 0 without a word
    assert ("loop: note: --noise-runs 1 measures no noise: the floor is --min-delta alone (0), so a change is "
            "kept on any gain above it") in capsys.readouterr().err
    monkeypatch.setattr(loop, "run_experiment", scripted([8]))
    assert loop.main([*argv, "--noise-runs", "3", "--max-experiments", "2"]) == 0
    out, err = capsys.readouterr()
    assert "loop: note: --noise-runs 3 not applied: the noise floor was fixed by 1 baseline run when" in err
    ws = Workspace(tmp_path / "n")
    exps = journal.experiments(journal.read(ws.journal_path))
    assert [(e["kind"], e["status"]) for e in exps] == [("baseline", "baseline"), ("experiment", "keep"),
                                                        ("experiment", "discard")]
    assert ws.head() == exps[1]["commit"] and "best_mean_rank: 5" in out


def test_a_study_split_into_sessions_proposes_what_one_session_would(cache, tmp_path, monkeypatch):
    # the same scores, one session of 3 experiments against three sessions of one each
    ranks = [100, 102, 98, 90, 95, 85]

    def descriptions(tag, sessions):
        monkeypatch.setattr(loop, "run_experiment", scripted(list(ranks)))
        for total in sessions:
            assert loop.main(["--tag", tag, "--workspace-root", str(tmp_path), "--data", str(cache),
                              "--budget-s", "1", "--seed", "7", "--max-experiments", str(total)]) == 0
        exps = journal.experiments(journal.read(Workspace(tmp_path / tag).journal_path))
        return [(e["status"], e["description"]) for e in exps[3:]]

    whole = descriptions("whole", [3])
    assert len(whole) == 3 and [s for s, _ in whole] == ["keep", "discard", "keep"]
    assert descriptions("split", [1, 2, 3]) == whole


def test_a_kill_while_recording_an_unrun_proposal_keeps_its_outcome(cache, tmp_path, monkeypatch):
    args = ["--tag", "u", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
            "--noise-runs", "2", "--max-experiments", "0"]
    monkeypatch.setattr(loop, "run_experiment", scripted([100, 100]))
    assert loop.main(args) == 0
    ws = Workspace(tmp_path / "u")
    why = [f"{ws.recipe}:9: use of 'open' is not allowed"]

    def killed(*a, **kw):  # the loop dies between the start line and the end line
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(records, "record_end", killed)
        with pytest.raises(KeyboardInterrupt):
            records.record_unrun(ws, 3, "rejected: reads a file", {}, "rejected", why)
    assert loop.main(args) == 0  # resumes: reconcile records what the start line says
    e = journal.experiments(journal.read(ws.journal_path))[2]
    assert (e["n"], e["status"], e["result"]["reason"], e["commit"]) == (3, "rejected", why, None)


def test_min_delta_reaches_the_keep_decision(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "run_experiment", scripted([100, 100, 97, 94]))
    assert loop.main(["--tag", "m", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
                      "--noise-runs", "2", "--max-experiments", "2", "--min-delta", "5"]) == 0
    exps = journal.experiments(journal.read(Workspace(tmp_path / "m").journal_path))
    assert [e["status"] for e in exps[2:]] == ["discard", "keep"]  # 97 is within 5 of 100, 94 is not


def test_isolate_reaches_every_run_and_the_final_one(cache, tmp_path, monkeypatch, capsys):
    from agent import final, report

    asked = []

    def fake(recipe, data, budget_s, out, **kw):
        asked.append(kw.get("isolate"))
        return {"status": "ok", "val_mean_rank": 100 - len(asked), "duration_s": 0.1}

    monkeypatch.setattr(loop.sandbox, "probe", lambda: None)
    monkeypatch.setattr(loop, "run_experiment", fake)
    monkeypatch.setattr(final, "run_experiment", fake)
    assert loop.main(["--tag", "t", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
                      "--noise-runs", "1", "--max-experiments", "1", "--isolate"]) == 0
    ws = Workspace(tmp_path / "t")
    assert [e["isolate"] for e in journal.read(ws.journal_path) if e.get("event") == "session"] == [True]
    assert report.main([str(ws.root), "--final"]) == 0  # retrained as the session ran
    assert asked == [True, True, True]


def test_isolate_is_refused_before_anything_runs_where_no_sandbox_can_be_built(cache, tmp_path, monkeypatch,
                                                                               capsys):
    monkeypatch.setattr(loop.sandbox, "probe", lambda: "unshare (user namespaces): Operation not permitted")
    monkeypatch.setattr(loop, "run_experiment", lambda *a, **k: pytest.fail("ran"))
    assert loop.main(["--tag", "t", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
                      "--isolate"]) == 2
    assert capsys.readouterr().err.strip() == ("loop: error: --isolate: cannot build the sandbox on this machine: "
                                               "unshare (user namespaces): Operation not permitted")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("argv,on_cpu,why,isolated,note", [
    ([], True, None, True, None),  # the default: a CPU run on a machine with a sandbox is isolated
    ([], True, "unshare (user namespaces): Operation not permitted", False,
     "loop: note: the runs are not isolated (unshare (user namespaces): Operation not permitted): code that "
     "evades the recipe check can read the cache's held-out pairs"),
    ([], False, None, False,  # a GPU run: the sandbox is not verified there, so auto does not use it
     "loop: note: the runs are not isolated (the sandbox is not yet verified on a GPU; --isolate on uses it "
     "there): code that evades the recipe check can read the cache's held-out pairs"),
    (["--isolate", "on"], False, None, True, None),
    (["--isolate=off"], True, None, False, None),  # asked not to: no probe, no note
])
def test_isolate_auto_uses_the_sandbox_for_cpu_runs_where_it_can_be_built(cache, tmp_path, monkeypatch, capsys,
                                                                            argv, on_cpu, why, isolated, note):
    asked = []

    def fake(recipe, data, budget_s, out, **kw):
        asked.append(kw.get("isolate"))
        return {"status": "ok", "val_mean_rank": 100 - len(asked), "duration_s": 0.1}

    def probe():
        if "--isolate=off" in argv:
            pytest.fail("probed though told --isolate off")
        return why

    monkeypatch.setattr(loop.sandbox, "probe", probe)
    monkeypatch.setattr(loop, "_probe_once", probe)  # its memo would hold the real machine's answer
    monkeypatch.setattr(loop, "runs_on_cpu", lambda device: on_cpu)
    monkeypatch.setattr(loop, "run_experiment", fake)
    assert loop.main(["--tag", "t", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
                      "--noise-runs", "1", "--max-experiments", "1", *argv]) == 0
    ws = Workspace(tmp_path / "t")
    assert [e["isolate"] for e in journal.read(ws.journal_path) if e.get("event") == "session"] == [isolated]
    assert asked == [isolated, isolated]
    printed = capsys.readouterr()
    notes = [line for line in printed.err.splitlines() if "isolated" in line]
    assert notes == ([note] if note else [])
    assert f"\nisolated:       {'yes' if isolated else 'no'}\n" in printed.out  # in the summary block


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_a_cache_every_sandbox_would_show_is_said_before_any_run(cache, tmp_path, monkeypatch, capsys, mode):
    # under a folder the sandbox binds, each isolated run was refused in turn: the baselines
    # failed one after another, "the baseline recipe failed", the reason in each run's log only
    why = f"{cache.resolve()} is visible inside the sandbox (it lies under /x, a folder given to it); move it out"
    asked = []
    monkeypatch.setattr(loop.sandbox, "probe", lambda: None)
    monkeypatch.setattr(loop, "_probe_once", lambda: None)
    monkeypatch.setattr(loop, "runs_on_cpu", lambda device: True)
    monkeypatch.setattr(loop.sandbox, "hidden_problem", lambda hide: asked.append(hide) or why)
    monkeypatch.setattr(loop, "run_experiment", scripted([100, 90]))
    argv = ["--tag", "t", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
            "--noise-runs", "1", "--max-experiments", "1", "--isolate", mode]
    if mode == "on":
        assert loop.main(argv) == 2
        assert capsys.readouterr().err.strip() == f"loop: error: --isolate: {why}"
        assert not (tmp_path / "t").exists()
    else:  # auto: the runs go on, not isolated, and the note says why
        assert loop.main(argv) == 0
        assert f"loop: note: the runs are not isolated ({why}): " in capsys.readouterr().err
    assert asked == [[str(cache.resolve())]]


def test_isolate_takes_only_its_three_modes(capsys):
    with pytest.raises(SystemExit) as e:
        loop.main(["--isolate", "maybe"])
    assert e.value.code == 2
    assert "argument --isolate: invalid choice: 'maybe'" in capsys.readouterr().err


def test_a_second_ctrl_c_while_the_plot_is_drawn_still_gives_the_summary(cache, tmp_path, monkeypatch, capsys):
    # the plot (matplotlib's import: about a second) comes after the journal is complete; a
    # second Ctrl-C there once ended the loop in a traceback, without its summary block
    from agent import report

    def interrupted(ws):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot_progress", interrupted)
    monkeypatch.setattr(loop, "run_experiment", scripted([100]))
    assert loop.main(["--tag", "p", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
                      "--noise-runs", "1", "--max-experiments", "0"]) == 0
    out, err = capsys.readouterr()
    assert "loop: progress plot not drawn (KeyboardInterrupt)" in err and "best_mean_rank: 100" in out


def test_a_reader_gone_from_the_output_is_left_to_the_commands_quiet_exit(cache, tmp_path, monkeypatch, capsys):
    # `python -m agent.loop | head`: the loop's handlers of its own file errors took the broken
    # pipe for one ("Broken pipe; mend it, then resume", twice, exit 1); exit_main makes it 141
    class Gone:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(loop, "run_experiment", scripted([100, 100, 90]))
    monkeypatch.setattr(loop.sys, "stdout", Gone())
    with pytest.raises(BrokenPipeError):
        loop.main(["--tag", "t", "--workspace-root", str(tmp_path), "--data", str(cache), "--budget-s", "1",
                   "--noise-runs", "2", "--max-experiments", "1", "--isolate", "off"])
    assert "Broken pipe" not in capsys.readouterr().err
