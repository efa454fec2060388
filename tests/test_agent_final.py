"""``agent.report --final``: the best commit retrained on train+val and scored on test, once."""

import json

import pytest

from agent import final, journal, loop, report
from agent.workspace import Workspace


def _scripted(ranks):
    calls = iter(ranks)

    def fake(recipe, data, budget_s, out, **kw):
        return {"status": "ok", "val_mean_rank": next(calls), "duration_s": 0.01}
    return fake


@pytest.fixture
def workspace(small_cache, tmp_path, monkeypatch):
    """A loop history: baselines 100 and 100 (σ = 0, so any gain keeps), a keep at 90, then a
    discard at 95."""
    monkeypatch.setattr(loop, "run_experiment", _scripted([100, 100, 90, 95]))
    assert loop.main(["--tag", "f", "--workspace-root", str(tmp_path), "--data", str(small_cache),
                      "--budget-s", "1.5", "--noise-runs", "2", "--max-experiments", "2", "--device", "cpu"]) == 0
    return Workspace(tmp_path / "f")


def test_final_retrains_the_best_commit_and_scores_test_once(workspace, monkeypatch, capsys):
    ws = workspace
    exps = journal.experiments(journal.read(ws.journal_path))
    best = next(e for e in exps if e.get("kept"))
    assert [e["status"] for e in exps] == ["baseline", "baseline", "keep", "discard"]
    capsys.readouterr()
    assert report.main([str(ws.root), "--final"]) == 0  # a real harness run, 1.5 s, on the session's data
    out = capsys.readouterr().out
    finals = [e for e in journal.read(ws.journal_path) if e.get("event") == "final"]
    assert len(finals) == 1
    ev = finals[0]
    assert ev["commit"] == best["commit"] and ev["status"] == "ok" and ev["val_mean_rank"] == 90
    run_dir = ws.experiments / f"final-{best['commit'][:7]}"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["eval_split"] == "test" and result["test_mean_rank"] == ev["test_mean_rank"]
    rt = lambda d: json.loads(json.dumps(d))  # noqa: E731
    assert rt(result["hparams"]) == rt(best["hparams"]) != rt(exps[0]["hparams"])  # the kept recipe ran
    assert (run_dir / "recipe.py").read_text().strip() == ws.git("show", f"{best['commit']}:recipe.py").strip()
    assert f"test_mean_rank: {ev['test_mean_rank']:.2f}" in out and "evaluated:      now" in out
    assert "test_i2t_R@1:" in out
    # once: a second call prints the recorded figures and trains nothing
    monkeypatch.setattr(final, "run_experiment", lambda *a, **k: pytest.fail("retrained"))
    assert report.main([str(ws.root), "--final"]) == 0
    out = capsys.readouterr().out
    assert f"test_mean_rank: {ev['test_mean_rank']:.2f}" in out and "evaluated:      earlier" in out
    assert f"final:          commit {best['commit'][:7]}" in out  # the table shows it too
    assert sum(e.get("event") == "final" for e in journal.read(ws.journal_path)) == 1
    # the final event is not an experiment: the loop's numbering and table are unaffected
    assert [e["n"] for e in journal.experiments(journal.read(ws.journal_path))] == [1, 2, 3, 4]


def test_final_needs_a_baseline_and_data(tmp_path, small_cache, capsys):
    ws = Workspace.open_or_create(tmp_path / "empty", loop.TEMPLATE)
    journal.append(ws.journal_path, {"event": "session", "time": 0.0, "data": str(small_cache), "budget_s": 1.0})
    assert report.main([str(ws.root), "--final"]) == 2
    assert "no scored baseline yet" in capsys.readouterr().err
    journal.append(ws.journal_path, {"event": "start", "n": 1, "time": 1.0, "kind": "baseline", "commit": ws.head(),
                                     "description": "baseline"})
    journal.append(ws.journal_path, {"event": "end", "n": 1, "time": 2.0, "status": "baseline",
                                     "val_mean_rank": 50.0, "kept": False})
    # the baseline is the best: its validation figure is the mean of its runs
    assert final.best_of(ws, journal.read(ws.journal_path))[1:] == (None, 50.0)
    assert report.main([str(ws.root), "--final", "--data", str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'}: no prepared cache" in capsys.readouterr().err
    assert not any(e.get("event") == "final" for e in journal.read(ws.journal_path))


def _fake_final(status="ok", rank=42.0, calls=None):
    def fake(recipe, data, budget_s, out, **kw):
        if calls is not None:
            calls.append(kw)
        r = {"status": status, "val_mean_rank": rank if status == "ok" else None, "eval_split": "test"}
        (out / "result.json").write_text(json.dumps(r))
        return r
    return fake


def test_a_failed_final_may_be_retried_and_a_new_best_needs_force(workspace, monkeypatch, capsys):
    ws = workspace
    calls = []
    monkeypatch.setattr(final, "run_experiment", _fake_final("crash", calls=calls))
    assert report.main([str(ws.root), "--final"]) == 1  # scored nothing: not "done"
    monkeypatch.setattr(final, "run_experiment", _fake_final("ok", 42.0, calls))
    assert report.main([str(ws.root), "--final"]) == 0
    assert len(calls) == 2 and calls[-1]["final"] is True
    # the loop goes on and keeps a new best: the test split was already looked at
    monkeypatch.setattr(loop, "run_experiment", _scripted([50]))
    session = journal.last_session(journal.read(ws.journal_path))
    assert loop.main(["--tag", "f", "--workspace-root", str(ws.root.parent), "--data", session["data"],
                      "--budget-s", "1.5", "--noise-runs", "2", "--max-experiments", "3", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert report.main([str(ws.root), "--final"]) == 2
    assert "already scored for commit" in capsys.readouterr().err and len(calls) == 2
    assert report.main([str(ws.root), "--final", "--force"]) == 0 and len(calls) == 3
    finals = [e for e in journal.read(ws.journal_path) if e.get("event") == "final"]
    assert [e["status"] for e in finals] == ["crash", "ok", "ok"] and finals[1]["commit"] != finals[2]["commit"]


def test_a_final_killed_after_its_run_is_recovered(workspace, monkeypatch):
    ws = workspace
    # the run finished and wrote result.json; the loop died before journaling the event
    monkeypatch.setattr(final, "run_experiment", _fake_final("ok", 37.5))
    real_append = journal.append

    def die_on_final(path, event):
        if event.get("event") == "final":
            raise KeyboardInterrupt  # stands in for the kill
        real_append(path, event)

    monkeypatch.setattr(journal, "append", die_on_final)
    with pytest.raises(KeyboardInterrupt):
        final.final_evaluation(ws)
    monkeypatch.setattr(journal, "append", real_append)
    monkeypatch.setattr(final, "run_experiment", lambda *a, **k: pytest.fail("the test split scored twice"))
    event, ran = final.final_evaluation(ws)
    assert ran and event["test_mean_rank"] == 37.5 and event["result"]["recovered"] is True


def test_an_interrupted_final_is_journaled_and_runs_again(workspace, monkeypatch, capsys):
    # Ctrl-C once gave a traceback and a final-start with no outcome
    ws = workspace

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(final, "run_experiment", interrupted)
    assert report.main([str(ws.root), "--final"]) == 130
    err = capsys.readouterr().err
    assert err == ("report: interrupted: the final run is journaled as interrupted and scored nothing; "
                   "--final runs it again\n")
    finals = [e for e in journal.read(ws.journal_path) if e.get("event") == "final"]
    assert [(e["status"], e["test_mean_rank"]) for e in finals] == [("interrupted", None)]
    monkeypatch.setattr(final, "run_experiment", _fake_final("ok", 42.0))
    assert report.main([str(ws.root), "--final"]) == 0  # no --force: nothing was scored
    # once scored, the final's own options no longer apply, and it says so
    capsys.readouterr()
    assert report.main([str(ws.root), "--final", "--budget-s", "5"]) == 0
    assert capsys.readouterr().err == ("report: note: --budget-s not applied: this commit's test score is "
                                       "recorded (the test split is scored once)\n")


def test_final_options_override_the_sessions_settings(workspace, monkeypatch, capsys):
    # the loop's session ran 1.5 s on cpu: --budget-s and --device given to --final are the
    # ones the run gets and the event records, and no note says they were not applied
    seen = []

    def fake(recipe, data, budget_s, out, **kw):
        seen.append((budget_s, kw["device"]))
        return _fake_final("ok", 42.0)(recipe, data, budget_s, out, **kw)

    monkeypatch.setattr(final, "run_experiment", fake)
    capsys.readouterr()
    assert report.main([str(workspace.root), "--final", "--budget-s", "2", "--device", "cuda:1"]) == 0
    out, err = capsys.readouterr()
    assert seen == [(2.0, "cuda:1")] and err == ""
    assert "budget_s:       2\n" in out
    (event,) = [e for e in journal.read(workspace.journal_path) if e.get("event") == "final"]
    assert event["budget_s"] == 2.0


def test_final_refuses_a_cache_other_than_the_studys(workspace, small_cache, tmp_path, monkeypatch, capsys):
    # another path is fine when it holds the same cache (moved, copied); other data is not
    import shutil

    other = tmp_path / "other"
    shutil.copytree(small_cache, other)
    monkeypatch.setattr(final, "run_experiment", lambda *a, **kw: pytest.fail("trained on other data"))
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps(dict(manifest, fingerprint="feedfacecafe0000")))
    capsys.readouterr()
    assert report.main([str(workspace.root), "--final", "--data", str(other)]) == 2
    assert capsys.readouterr().err == (f"report: error: {other}: not the cache this study was scored on (its "
                                       f"fingerprint is feedfacecafe, the study's {manifest['fingerprint'][:12]}); "
                                       "give the study's --data\n")
    (other / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(final, "run_experiment", _fake_final("ok", 42.0))
    assert report.main([str(workspace.root), "--final", "--data", str(other)]) == 0


def test_final_without_a_recorded_budget_asks_for_one(tmp_path, small_cache, monkeypatch):
    # a journal whose session records no budget (written by hand, or cut): a one-line
    # request for --budget-s, not a TypeError from float(None), and nothing journaled
    ws = Workspace.open_or_create(tmp_path / "nobudget", loop.TEMPLATE)
    journal.append(ws.journal_path, {"event": "session", "time": 0.0, "data": str(small_cache)})
    journal.append(ws.journal_path, {"event": "start", "n": 1, "time": 1.0, "kind": "baseline", "commit": ws.head(),
                                     "description": "baseline"})
    journal.append(ws.journal_path, {"event": "end", "n": 1, "time": 2.0, "status": "baseline",
                                     "val_mean_rank": 50.0, "kept": False})
    monkeypatch.setattr(final, "run_experiment", lambda *a, **k: pytest.fail("ran without a budget"))
    with pytest.raises(ValueError, match=r"journal.jsonl: no session records the budget; give --budget-s"):
        final.final_evaluation(ws)
    assert [e["event"] for e in journal.read(ws.journal_path)] == ["session", "start", "end"]


def test_summary_lines_show_recall_as_percentages():
    # the harness's recalls are fractions; the summary prints them as percentages, i2t then
    # t2i, R@1, R@5, R@10, and only those the run measured
    event = {"commit": "0123456789abcdef", "description": "wider", "status": "ok", "val_mean_rank": 12.3,
             "test_mean_rank": 15.0, "budget_s": 1.5,
             "result": {"metrics": {"i2t_r1": 0.125, "i2t_r5": 0.5, "t2i_r1": 0.25, "t2i_r10": 1.0}}}
    assert final.summary_lines(event, True) == [
        "---", "final_commit:   0123456", "description:    wider", "status:         ok",
        "val_mean_rank:  12.30", "test_mean_rank: 15.00", "trained_on:     train+val", "budget_s:       1.5",
        "evaluated:      now", "isolated:       no", "test_i2t_R@1:   12.5%", "test_i2t_R@5:   50.0%", "test_t2i_R@1:   25.0%",
        "test_t2i_R@10:  100.0%"]


def test_final_refuses_a_cache_without_a_fingerprint(workspace, small_cache, tmp_path, monkeypatch, capsys):
    # an unknown fingerprint was taken for a match: another test split scored, for good
    import shutil

    other = tmp_path / "other"
    shutil.copytree(small_cache, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "fingerprint"}))
    monkeypatch.setattr(final, "run_experiment", lambda *a, **kw: pytest.fail("trained on other data"))
    capsys.readouterr()
    assert report.main([str(workspace.root), "--final", "--data", str(other)]) == 2
    assert capsys.readouterr().err.startswith(f"report: error: {other}: its manifest records no fingerprint")


def test_final_refuses_a_folder_that_is_not_the_loops_workspace(workspace, tmp_path, monkeypatch, capsys):
    # a journal copied into a folder of another repository: git -C climbed to that repository
    # and its first commit was trained and scored as the study's baseline
    import subprocess

    other = tmp_path / "otherrepo"
    other.mkdir()
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    (other / "recipe.py").write_text("x = 1\n")
    subprocess.run(["git", "-C", str(other), "-c", "user.name=a", "-c", "user.email=a@b", "add", "recipe.py"],
                   check=True)
    subprocess.run(["git", "-C", str(other), "-c", "user.name=a", "-c", "user.email=a@b", "commit", "-qm", "mine"],
                   check=True)
    (other / "sub").mkdir()
    # its baselines only: the best is then the root commit, which the enclosing repository had
    lines = [line for line in workspace.journal_path.read_text().splitlines()
             if json.loads(line).get("n") in (None, 1, 2)]
    (other / "sub" / "journal.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(final, "run_experiment", lambda *a, **kw: pytest.fail("trained another project's commit"))
    capsys.readouterr()
    assert report.main([str(other / "sub"), "--final"]) == 2
    assert capsys.readouterr().err.startswith(f"report: error: {other / 'sub'}")


def test_a_best_commit_missing_from_the_history_is_named_and_leaves_no_folder(workspace, monkeypatch, capsys):
    events = [json.loads(line) for line in workspace.journal_path.read_text().splitlines()]
    kept = next(e for e in events if e.get("event") == "end" and e.get("kept"))
    gone = "1234567" + "0" * 33
    text = workspace.journal_path.read_text().replace(kept["commit"], gone)
    workspace.journal_path.write_text(text)
    monkeypatch.setattr(final, "run_experiment", lambda *a, **kw: pytest.fail("ran"))
    capsys.readouterr()
    assert report.main([str(workspace.root), "--final"]) == 2
    assert capsys.readouterr().err == (f"report: error: commit {gone[:12]}, the best by the journal, is not in the "
                                       f"history of {workspace.root} (a workspace whose git history was rewritten?)\n")
    assert not (workspace.experiments / "final-1234567").exists()


@pytest.mark.parametrize("line,problem", [
    ({"event": "final", "commit": "abc", "status": "ok", "test_mean_rank": 5.0}, "an ok final line without description"),
    ({"event": "end", "n": 9, "status": "crash", "description": "b\ud800"}, "text that is not UTF-8 ('\\ud800')"),
])
def test_journal_lines_the_report_could_not_print_are_skipped(tmp_path, capsys, line, problem):
    # a minimal final line crashed --final (KeyError), a lone surrogate the report and the loop
    path = tmp_path / "journal.jsonl"
    path.write_text(json.dumps(line) + "\n" + json.dumps({"event": "session", "time": 1.0}) + "\n")
    assert [e["event"] for e in journal.read(path)] == ["session"]
    assert problem in capsys.readouterr().err


def test_final_takes_device_auto_as_the_loop_does(workspace, monkeypatch, capsys):
    seen = {}

    def fake(recipe, data, budget_s, out, **kw):
        seen.update(kw)
        return {"status": "ok", "val_mean_rank": 7.0, "eval_split": "test", "duration_s": 0.01}

    monkeypatch.setattr(final, "run_experiment", fake)
    assert report.main([str(workspace.root), "--final", "--device", "auto"]) == 0  # was refused: "expected cpu, ..."
    assert seen["device"] == "auto"


def test_an_edited_fix_chain_that_loops_and_an_infinite_step_count_end():
    from agent.records import fix_target

    exps = [{"n": 3, "kind": "experiment", "ended": True, "status": "crash", "commit": "c3", "fix_of": 4},
            {"n": 4, "kind": "experiment", "ended": True, "status": "crash", "commit": "c4", "fix_of": 3}]
    assert fix_target(exps, 2) is None  # a cycle once looped for ever
    assert journal.steady_rate({"samples": 10, "steps": float("inf"), "train_s": 5.0, "warmup_s": 1.0}) is None


@pytest.mark.parametrize("study,auto_isolates,isolated", [
    ("off", True, True),  # a study run without the sandbox: its test score still gets one where auto would
    ("off", False, False),
    ("on", False, True),  # as isolated as the study's runs, whatever auto would say
])
def test_the_final_is_isolated_as_the_study_was_or_as_the_default_would(small_cache, tmp_path, monkeypatch, capsys,
                                                                         study, auto_isolates, isolated):
    monkeypatch.setattr(loop.sandbox, "probe", lambda: None)
    monkeypatch.setattr(loop.sandbox, "hidden_problem", lambda hide: None)
    monkeypatch.setattr(loop, "run_experiment", _scripted([100, 100, 90]))
    assert loop.main(["--tag", "f", "--workspace-root", str(tmp_path), "--data", str(small_cache), "--budget-s",
                      "1.5", "--noise-runs", "2", "--max-experiments", "1", "--device", "cpu", "--isolate", study]) == 0
    monkeypatch.setattr(loop, "_probe_once", lambda: None if auto_isolates else "no user namespaces")
    seen = {}

    def fake(recipe, data, budget_s, out, **kw):
        seen.update(kw)
        return {"status": "ok", "val_mean_rank": 7.0, "eval_split": "test", "isolated": kw["isolate"],
                "duration_s": 0.01}

    monkeypatch.setattr(final, "run_experiment", fake)
    capsys.readouterr()
    assert report.main([str(tmp_path / "f"), "--final"]) == 0
    assert seen["isolate"] is isolated
    assert f"isolated:       {'yes' if isolated else 'no'}" in capsys.readouterr().out
