"""Usage errors of every command-line tool: one line naming the option, exit code 2."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("module,argv,message", [
    ("eclip.train", ["--data", "d", "--out", "o", "--seed=abc"], "argument --seed: invalid int value: 'abc'"),
    # torch's generators take less: the run failed at its first seeding, with a traceback
    ("eclip.train", ["--data", "d", "--out", "o", f"--seed={2**64}"],
     f"argument --seed: {2**64}: expected an int in [-2**63, 2**64)"),
    ("eclip.harness", ["run", "--recipe", "r", "--data", "d", "--budget-s", "1", "--out", "o", f"--seed={-2**63 - 1}"],
     f"argument --seed: {-2**63 - 1}: expected an int in [-2**63, 2**64)"),
    ("eclip.prepare", ["--dataset", "coco"], "argument --dataset: invalid choice: 'coco'"),
    ("eclip.harness", [], "the following arguments are required"),
    ("eclip.encode", ["--recipe", "r", "--checkpoint", "c", "--inputs", "i"], "the following arguments are required: --out"),
    ("agent.loop", ["--budget-s", "abc"], "argument --budget-s: invalid float value: 'abc'"),
    ("agent.report", [], "the following arguments are required"),
])
def test_usage_errors_are_one_line(module, argv, message, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and message in err, err
    assert re.match(rf"python -m {module}( run)?: error: ", err), err  # the harness's subcommand names itself
    assert err.endswith(" (--help for usage)\n"), err  # the one line says where the usage is


@pytest.mark.parametrize("argv,message", [
    (["--budget-s", "0"], "--budget-s 0.0: must be a positive number of seconds"),
    (["--budget-s", "nan"], "--budget-s nan: must be a positive number of seconds"),
    (["--budget-s", "inf"], "--budget-s inf: must be a positive number of seconds"),
    (["--timeout-s", "-1"], "--timeout-s -1.0: must be a positive number of seconds"),
    # every run would time out, and the failed baselines would stop the session
    (["--budget-s", "10", "--timeout-s", "10"], "--timeout-s 10: must exceed --budget-s 10 (a run also starts up "
                                                "and is scored; by default it gets budget × 1.5 + 120 s)"),
    # the workspace root joined with the tag is reset to the loop's first commit: a tag must
    # not reach another repository (.., an absolute path)
    *[([f"--tag={tag}"], f"--tag {tag!r}: must be one folder name of letters, digits, '.', '_' and '-', not starting "
                       "with '.' or '-'") for tag in ("..", ".", "/tmp/x", "a/b", "", "-x")],
    (["--max-experiments", "-1"], "--max-experiments -1: must be 0 or more"),
    (["--max-hours", "-1"], "--max-hours -1.0: must be a positive number of hours"),
    (["--min-delta", "nan"], "--min-delta nan: must be 0 or more"),
    (["--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N"),
    # the Claude proposer's limits, checked whichever proposer runs (a resumed study may switch)
    (["--max-turns", "0"], "--max-turns 0: must be at least 1"),
    (["--max-tokens", "0"], "--max-tokens 0: must lie in 1..21333 (longer replies need streaming, which the "
                            "proposer does not use)"),
    (["--max-tokens", "30000"], "--max-tokens 30000: must lie in 1..21333 (longer replies need streaming, which "
                                "the proposer does not use)"),
    (["--max-cost-usd", "nan"], "--max-cost-usd nan: must be a positive number of dollars"),
    (["--max-cost-usd", "-5"], "--max-cost-usd -5.0: must be a positive number of dollars"),
    (["--fix-attempts", "-1"], "--fix-attempts -1: must be 0 or more"),
    (["--api-pause-s", "-1"], "--api-pause-s -1.0: must be 0 or more seconds"),
])
def test_loop_refuses_bad_options_before_touching_a_workspace(argv, message, tmp_path, capsys):
    from agent import loop

    rc = loop.main(["--workspace-root", str(tmp_path / "ws"), "--data", str(tmp_path / "none"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"loop: error: {message}\n", err
    assert not (tmp_path / "ws").exists()  # nothing created


def test_loop_with_an_unusable_workspace_root_is_one_line(tmp_path, capsys):
    from agent import loop
    from eclip import prepare

    cache = tmp_path / "data"
    assert prepare.main(["--dataset", "synthetic", "--num-train", "20", "--num-val", "8", "--num-test", "8",
                         "--out", str(cache), "--workers", "1"]) == 0
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    capsys.readouterr()
    rc = loop.main(["--workspace-root", str(blocker), "--data", str(cache), "--budget-s", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"loop: error: {blocker / 'default'}: cannot create the workspace (Not a directory)\n", err


def test_loop_whose_built_in_data_cannot_be_prepared_is_one_line(tmp_path, monkeypatch, capfd):
    # prepare's own error, then a CalledProcessError traceback, exit 1, once came out of this
    from agent import loop

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic").write_text("not a cache")  # the default --data, in the way
    rc = loop.main(["--workspace-root", str(tmp_path / "ws"), "--budget-s", "1"])
    err = capfd.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1] == ("loop: error: preparing the built-in dataset in data/synthetic failed "
                                    "(exit code 2)"), err
    assert not (tmp_path / "ws").exists()


def test_prepare_help_shows_only_the_defaults_there_are():
    from eclip import prepare

    text = " ".join(prepare.build_parser().format_help().split())
    assert "(default: None)" not in text  # those options say their own fallback
    assert "(default 224; 64 for synthetic)" in text and "(default: 0.1)" in text


def test_help_shows_a_default_of_zero_or_false():
    # only None has no default to show: 0, False and "" are real defaults, and hiding them
    # would leave the reader guessing
    from eclip.errors import DefaultsFormatter, OneLineParser

    parser = OneLineParser(prog="tool", formatter_class=DefaultsFormatter)
    parser.add_argument("--workers", type=int, default=0, help="worker processes")
    parser.add_argument("--fast", action="store_true", help="skip the checks")
    parser.add_argument("--name", default="", help="a label")
    parser.add_argument("--out", default=None, help="where to write (default: next to the input)")
    text = " ".join(parser.format_help().split())
    assert "worker processes (default: 0)" in text
    assert "skip the checks (default: False)" in text
    assert "a label (default: )" in text
    assert "where to write (default: next to the input)" in text and "(default: None)" not in text


def test_report_refuses_final_options_without_final(tmp_path, capsys):
    from agent import report

    for argv in (["--force"], ["--data", "d"], ["--budget-s", "30"], ["--device", "cpu"]):
        assert report.main([str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err
        assert err == f"report: error: {argv[0]} applies to --final only (add --final, or leave it out)\n", err


def test_prepare_into_an_unwritable_place_is_one_line(tmp_path, capsys):
    from eclip import prepare

    blocker = tmp_path / "afile"
    blocker.write_text("x")  # --out inside a file: its directory cannot be made
    rc = prepare.main(["--dataset", "synthetic", "--num-train", "10", "--out", str(blocker / "cache")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"prepare: error: {blocker / 'cache'}: cannot write the cache (") and err.count("\n") == 1, err
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("damage", ["journal emptied", "git history deleted"])
def test_loop_refuses_a_workspace_whose_records_disagree(damage, tmp_path, capsys):
    # Starting over would number new runs from 1 and overwrite experiments/1, /2, ...
    import shutil

    from agent import loop
    from agent.workspace import Workspace

    ws = Workspace.open_or_create(tmp_path / "ws" / "t", loop.TEMPLATE)
    run1 = ws.experiments / "1"
    run1.mkdir()
    (run1 / "result.json").write_text('{"status": "ok"}')
    ws.journal_path.write_text('{"event": "experiment", "n": 1}\n')
    if damage == "journal emptied":
        ws.journal_path.write_text("")
        message = "journal.jsonl: missing or empty, but"
    else:
        shutil.rmtree(ws.root / ".git")
        message = ".git: missing, but the workspace has a journal or runs"
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    rc = loop.main(["--workspace-root", str(tmp_path / "ws"), "--tag", "t", "--data", str(data)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("loop: error: ") and message in err and err.count("\n") == 1, err
    assert (run1 / "result.json").read_text() == '{"status": "ok"}'


def test_journal_skips_damaged_lines_once_each(tmp_path, capsys):
    # A torn last line (a kill mid-write) and damage elsewhere are told apart, a wrongly typed
    # field is skipped rather than crashing the comparisons, and each line is reported once.
    from agent import journal

    path = tmp_path / "journal.jsonl"
    path.write_text('{"event": "start", "n": 1}\n'
                    'garbage\n'
                    '{"event": "end", "n": "two", "val_mean_rank": 3.0}\n'
                    '{"event": "end", "n": 1, "val_mean_rank": "abc"}\n'
                    '{"event": "end", "n": 1, "val_mean_rank": 12.5}\n'
                    '{"event": "end", "n": 2, "sta')
    for _ in range(3):
        events = journal.read(path)
    assert [(e["event"], e["n"]) for e in events] == [("start", 1), ("end", 1)]
    assert journal.experiments(events)[0]["val_mean_rank"] == 12.5
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"journal: {path}:2: not JSON; line skipped",
        f"journal: {path}:3: n is 'two', not an experiment number; line skipped",
        f"journal: {path}:4: val_mean_rank is 'abc', not a finite number; line skipped",
        f"journal: {path}:6: torn line (the loop was killed mid-write); line skipped",
    ]


def test_report_keeps_a_plot_and_refuses_bad_final_options(tmp_path, capsys):
    from agent import loop, report
    from agent.workspace import Workspace

    ws = Workspace.open_or_create(tmp_path / "ws", loop.TEMPLATE)
    ws.journal_path.write_text("")
    plot = ws.root / "progress.png"
    plot.write_bytes(b"an earlier plot")
    assert report.main([str(ws.root)]) == 0  # no experiments (yet, or the journal was emptied)
    out = capsys.readouterr().out
    assert "plot:           not written (no experiments recorded)" in out
    assert "per_hour:       none\n" in out  # as the other empty figures, not Python's None
    assert plot.read_bytes() == b"an earlier plot"
    for argv, message in ((["--budget-s", "-1"], "--budget-s -1.0: must be a positive number of seconds"),
                          (["--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N")):
        assert report.main([str(ws.root), "--final", *argv]) == 2
        assert capsys.readouterr().err == f"report: error: {message}\n"


@pytest.mark.parametrize("module,argv,rc", [
    ("eclip.train", ["--data", "no-such-cache", "--out", "o", "--steps", "1"], 2),
    ("eclip.harness", ["run", "--recipe", "no-such-recipe.py", "--data", "d", "--budget-s", "1", "--out", "o"], 2),
    ("agent.loop", ["--budget-s", "1", "--timeout-s", "1"], 2),
])
def test_a_sigterm_during_the_shutdown_keeps_the_exit_code(module, argv, rc, tmp_path):
    # A process group's SIGTERM reaches a training process twice; the copy may land after
    # the command has returned and written its result, while the interpreter shuts down: it
    # turned an interrupted run's 130 into 143. Here the copy comes from an exit handler.
    code = ("import atexit, os, runpy, signal, sys\n"
            "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))\n"
            f"sys.argv = [{module!r}, *{argv!r}]\n"
            f"runpy.run_module({module!r}, run_name='__main__')\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == rc, (proc.returncode, proc.stderr[-500:])


def test_loop_whose_preparation_was_killed_names_the_signal(tmp_path, monkeypatch, capsys):
    # a negative return code became the exit status 256 - 9 = 247
    from agent import loop

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, -9))
    rc = loop.main(["--workspace-root", str(tmp_path / "ws"), "--budget-s", "1"])
    err = capsys.readouterr().err
    assert rc == 137 and err == "loop: error: preparing the built-in dataset in data/synthetic failed (killed by SIGKILL)\n"


def test_a_seed_at_either_end_of_the_range_is_taken():
    # the range is torch's: [-2**63, 2**64), both ends of it seed a generator
    import torch

    from eclip.errors import seed_value

    for value in (-(2**63), 2**64 - 1):
        assert seed_value(str(value)) == value
        torch.Generator().manual_seed(value)
