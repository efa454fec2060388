"""What the research loop decides and reports from its journal: the keep rule at its edges
(``records.state`` and ``records.outcome``), ``agent.report``'s summary with its best score and
noise floor, the progress plot's axis, a results.tsv row whatever its description, and the
warning when the baselines trained at different speeds (a shared machine)."""

import pytest

from agent import journal, records
from agent.workspace import Workspace


def _fixture_journal(ws):
    """Five ended runs: baselines 100 and 90, a discard, a keep at 70, a crash."""
    ws.mkdir()
    rows = [(1, "baseline", 100.0, False), (2, "baseline", 90.0, False), (3, "discard", 93.0, False),
            (4, "keep", 70.0, True), (5, "crash", None, False)]
    for i, (n, status, rank, kept) in enumerate(rows):
        journal.append(ws / "journal.jsonl", {"event": "start", "n": n, "time": 1000.0 + 100 * i,
                                              "kind": "baseline" if status == "baseline" else "experiment",
                                              "commit": f"c{n}", "description": f"change {n}"})
        journal.append(ws / "journal.jsonl", {"event": "end", "n": n, "time": 1090.0 + 100 * i,
                                              "status": status, "val_mean_rank": rank, "kept": kept})


def test_report_on_a_journal_fixture(tmp_path, capsys):
    from agent import report
    ws = tmp_path / "w"
    _fixture_journal(ws)
    assert report.main([str(ws)]) == 0
    out = capsys.readouterr().out
    assert ["4", "keep", "70.00", "change", "4"] in [line.split() for line in out.splitlines()]
    assert "best_mean_rank: 70.0" in out and "baseline_mean:  95.0" in out
    assert "counts:         baseline 2, crash 1, discard 1, keep 1" in out
    assert "per_hour:       36.7" in out  # 5 experiments from the first start to the last end: 490 s
    assert "baseline_speed: none" in out  # the fixture's results carry no figures
    assert (ws / "progress.png").read_bytes()[:4] == b"\x89PNG"
    assert report.main([str(tmp_path / "none")]) == 2


def test_report_best_and_noise_floor_follow_the_loops_rule(tmp_path, capsys):
    # the floor the loop keeps against is max(--min-delta, 2σ), with the --min-delta of the
    # session in force (a resume may raise it): baselines 100 and 102 give 2σ = 2.83. The best
    # is their mean, not the lower of the two (the first best of the running trail)
    from agent import report
    ws = tmp_path / "w"
    ws.mkdir()
    path = ws / "journal.jsonl"
    journal.append(path, {"event": "session", "time": 900.0, "min_delta": 1.0})
    for n, rank in ((1, 100.0), (2, 102.0)):
        journal.append(path, {"event": "start", "n": n, "time": 1000.0 * n, "kind": "baseline", "commit": f"c{n}",
                              "description": "baseline"})
        journal.append(path, {"event": "end", "n": n, "time": 1000.0 * n + 90, "status": "baseline",
                              "val_mean_rank": rank, "kept": False})
    assert report.main([str(ws)]) == 0
    out = capsys.readouterr().out
    assert "noise_floor:    2.83" in out and "best_mean_rank: 101.0" in out
    journal.append(path, {"event": "session", "time": 3000.0, "min_delta": 5.0})
    assert report.main([str(ws)]) == 0
    assert "noise_floor:    5.00" in capsys.readouterr().out


def test_the_progress_plot_numbers_experiments_with_whole_numbers(tmp_path, monkeypatch):
    # two experiments span 1..2 on the x axis, where matplotlib's default ticks are 1.0, 1.2, ...
    import matplotlib.pyplot as plt

    from agent import report
    ws = tmp_path / "w"
    ws.mkdir()
    for n, rank in ((1, 100.0), (2, 90.0)):
        journal.append(ws / "journal.jsonl", {"event": "start", "n": n, "time": 1000.0 * n, "kind": "baseline",
                                              "commit": f"c{n}", "description": ""})
        journal.append(ws / "journal.jsonl", {"event": "end", "n": n, "time": 1000.0 * n + 90,
                                              "status": "baseline", "val_mean_rank": rank, "kept": False})
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    report.plot_progress(Workspace(ws))
    (ax,) = figures[0].axes
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_a_result_row_is_one_line_whatever_its_description(tmp_path):
    # a proposer's description or an error text with tabs or line breaks once split a row
    path = tmp_path / "results.tsv"
    journal.add_result_row(path, {"commit": "abc1234", "val_mean_rank": 12.5, "status": "crash",
                                  "description": "two\tcolumns\nand\r\ntwo lines"})
    header, row = path.read_text().splitlines()
    assert row.split("\t") == ["abc1234", "12.5", "", "", "crash", "two columns and two lines"]
    assert header.split("\t") == list(journal.COLUMNS)


def test_the_keep_rule_at_its_edges():
    # "kept only if it beats the best by more than max(--min-delta, 2σ)", σ the sample spread
    base = [{"n": i, "kind": "baseline", "status": "baseline", "val_mean_rank": r, "ended": True}
            for i, r in enumerate([100.0, 102.0, 98.0], 1)]
    ok = lambda r: {"status": "ok", "val_mean_rank": r}  # noqa: E731
    st = records.state(base, "root", 0.0)
    assert (st["best"], st["sigma"], st["threshold"]) == (100.0, 2.0, 4.0)
    assert records.outcome("experiment", ok(96.0), st) == ("discard", False)  # by exactly the floor: not more
    assert records.outcome("experiment", ok(96.5), st) == ("discard", False)  # within 2σ (σ of a sample, not pstdev)
    assert records.outcome("experiment", ok(95.9), st) == ("keep", True)
    st = records.state(base, "root", 5.0)  # --min-delta above 2σ sets the threshold
    assert st["threshold"] == 5.0
    assert records.outcome("experiment", ok(95.5), st) == ("discard", False)
    assert records.outcome("experiment", ok(94.9), st) == ("keep", True)
    # identical baselines (a deterministic run): σ = 0, and an equal score is no gain
    same = [dict(b, val_mean_rank=100.0) for b in base]
    assert records.outcome("experiment", ok(100.0), records.state(same, "root", 0.0)) == ("discard", False)


def test_throughput_spread_reads_the_scored_baselines_steady_rates():
    def exp(status, seconds, warmup=1.0, steps=11, samples=1100, drop=()):
        r = {"samples": samples, "steps": steps, "train_s": seconds, "warmup_s": warmup}
        return {"status": status, "result": {k: v for k, v in r.items() if k not in drop}}

    # 1000 samples after the first step, in 10 s and 12.5 s: 100 and 80 samples/s
    assert journal.steady_rate(exp("baseline", 11.0)["result"]) == 100.0
    # the recipe's setup is on train_s's clock, not in the steps: 1000 samples in 10 s again
    assert journal.steady_rate(dict(exp("baseline", 13.0)["result"], setup_s=2.0)) == 100.0
    assert journal.throughput_spread([exp("baseline", 11.0), exp("baseline", 13.5)]) == 1.25
    # a cold compile cache lengthens the first step only: the same steady rate, no spread
    assert journal.throughput_spread([exp("baseline", 11.0), exp("baseline", 40.0, warmup=30.0)]) == 1.0
    # an experiment's model differs, a failed baseline's rate means nothing, a figure may be
    # missing, one step has no steady part
    mixed = [exp("baseline", 11.0), exp("keep", 2.0), exp("crash", 100.0), exp("baseline", 5.0, drop=("warmup_s",)),
             exp("baseline", 5.0, steps=1, samples=100), exp("baseline", 12.0)]
    assert abs(journal.throughput_spread(mixed) - 1.1) < 1e-12
    assert journal.throughput_spread([exp("baseline", 11.0), exp("baseline", 1.0)]) is None
    # baselines of an earlier session on another device are not compared with this one's
    def on(device, seconds):
        e = exp("baseline", seconds)
        return dict(e, result=dict(e["result"], device=device))

    # 100 samples/s on the A100, 200 on the H100: all three together would be 2x apart
    assert journal.throughput_spread([on("NVIDIA A100", 11.0), on("NVIDIA H100", 6.0), on("NVIDIA H100", 6.0)]) == 1.0
    assert journal.throughput_spread([on("NVIDIA A100", 11.0), on("NVIDIA H100", 6.0)]) is None


@pytest.mark.parametrize("seconds,warned", [((11.0, 11.1, 10.9, 40.0), False), ((11.0, 11.1, 14.0, 40.0), True)])
def test_the_loop_warns_when_its_baselines_trained_at_different_speeds(small_cache, tmp_path, monkeypatch, capsys,
                                                                         seconds, warned):
    # a shared machine shows in the baselines' throughput (the same recipe, the same data)
    # before it shows in their scores; the warning comes once, after the last baseline
    from agent import loop

    runs = iter(seconds)
    monkeypatch.setattr(loop, "run_experiment", lambda *a, **kw: {
        "status": "ok", "val_mean_rank": 50.0, "samples": 1100, "steps": 11, "train_s": next(runs), "warmup_s": 1.0,
        "duration_s": 0.1})
    assert loop.main(["--tag", "s", "--workspace-root", str(tmp_path), "--data", str(small_cache), "--budget-s", "1",
                      "--max-experiments", "1"]) == 0  # the fourth run, an experiment, is never compared
    err = capsys.readouterr().err
    assert err.count("loop: warning: the baselines trained at speeds") == warned
    if warned:
        assert "speeds 1.30x apart" in err  # fastest over slowest: 1000 samples in 10 s and in 13 s
    from agent import report  # and the report says it too, for whoever reads the study later

    assert report.main([str(tmp_path / "s")]) == 0
    assert f"baseline_speed: {1.3 if warned else 10.1 / 9.9:.2f}x apart" in capsys.readouterr().out
    # a resumed study says it again as it starts (its last baseline may have been recovered
    # from its result file after a kill, with no warning then); the new experiment is not compared
    runs = iter((11.0,))
    assert loop.main(["--tag", "s", "--workspace-root", str(tmp_path), "--data", str(small_cache), "--budget-s", "1",
                      "--max-experiments", "2"]) == 0
    assert capsys.readouterr().err.count("loop: warning: the baselines trained at speeds 1.30x apart") == warned


def test_a_report_read_by_a_reader_that_leaves_early_ends_quietly(tmp_path):
    # `agent.report W | head -3`: the rest of the report once ended in a BrokenPipeError traceback
    import subprocess
    import sys
    from pathlib import Path

    _fixture_journal(tmp_path / "w")
    proc = subprocess.Popen([sys.executable, "-m", "agent.report", str(tmp_path / "w")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err


def test_a_description_matplotlib_would_read_as_math_is_drawn_as_written(tmp_path, capsys):
    # "$...$" is math to matplotlib: a kept change described "scale lr by $\sqrt{2}^{1}^{2}$"
    # failed the report with a 69-line traceback, and --final after it
    from agent import report

    ws = tmp_path / "w"
    _fixture_journal(ws)
    journal.append(ws / "journal.jsonl", {"event": "start", "n": 6, "time": 2000.0, "kind": "experiment",
                                          "commit": "c6", "description": "scale lr by $\\sqrt{2}^{1}^{2}$\tnow"})
    journal.append(ws / "journal.jsonl", {"event": "end", "n": 6, "time": 2090.0, "status": "keep",
                                          "val_mean_rank": 60.0, "kept": True})
    assert report.main([str(ws)]) == 0
    out = capsys.readouterr().out
    assert "scale lr by $\\sqrt{2}^{1}^{2}$ now" in out  # one row, the tab a space
    assert f"plot:           {ws / 'progress.png'}" in out
