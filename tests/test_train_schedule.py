"""The clock of a training run: the budget, the recipe's setup counted against it, the progress
that ``train_step`` is handed (with or without a budget, and across a resume), and the rows
of ``metrics.jsonl``."""

import itertools
import json

import pytest
from train_support import SMALL, metric_rows, recipe_at_call, run


def test_the_schedule_starts_after_the_first_step(train_cache, tmp_path, capsys):
    # The clock counts the first step (compilation on a GPU: tens of seconds cold), but the
    # recipe's schedule must not: on the clock a 1.5 s first step of a 4 s budget would hand
    # the second step progress 0.375, past any warm-up. The recipe logs what it was given.
    recipe = recipe_at_call(tmp_path, prelude="import time as _time\n",
                            before="if _calls[0] == 1:\n    _time.sleep(1.5)",
                            after="out['progress'] = torch.tensor(float(progress))")
    out = tmp_path / "run"
    budget = 4
    rc, _, err = run(["--data", train_cache, "--out", out, "--budget-s", budget, "--recipe", recipe,
                      *SMALL, "--log-every=1"], capsys)
    assert rc == 0, err
    rows = metric_rows(out)
    assert rows[0]["step"] == 1 and rows[0]["progress"] == 0.0 and rows[0]["elapsed_s"] >= 1.5
    assert len(rows) >= 3, rows
    meta = json.loads((out / "checkpoint.json").read_text())
    origin = meta["schedule_origin_s"]  # the end of the first step, just before its row was logged
    assert 1.5 <= origin <= rows[0]["elapsed_s"] + 1e-3  # rows are rounded to the millisecond
    tol = 1e-3 / (budget - origin)  # the rows' millisecond rounding, as a share
    for prev, row in itertools.pairwise(rows):
        # given as the step began: between the shares of (budget - origin) passed when the
        # previous step's row was logged and when this step's row was
        share = [(r["elapsed_s"] - origin) / (budget - origin) for r in (prev, row)]
        assert share[0] - tol <= row["progress"] <= share[1] + tol, (row, share)
    assert rows[1]["progress"] < 0.25  # on the clock it would be at least 1.5 / 4


def test_the_last_steps_get_a_row_of_their_own(train_cache, tmp_path, capsys):
    # Rows were written at step 1 and every --log-every steps only: the steps after the last
    # log point were checked and fed the summary's loss, but never reached metrics.jsonl.
    out = tmp_path / "run"
    rc, stdout, err = run(["--data", train_cache, "--out", out, "--steps", 5, *SMALL, "--log-every=3"], capsys)
    assert rc == 0, err
    rows = metric_rows(out)
    assert [(r["step"], r["samples"]) for r in rows] == [(1, 64), (3, 192), (5, 320)]
    result = json.loads((out / "result.json").read_text())
    assert result["loss"] == rows[-1]["loss"]  # the summary's loss is the last row's


def test_the_recipes_setup_is_on_the_clock(train_cache, tmp_path, capsys):
    # The clock began at the first step: a recipe could compile (or train) at its import or
    # in build_model for as long as it liked. Its import, build_model and build_optimizer
    # now count against the budget, and result.json says how long they took.
    rec = recipe_at_call(tmp_path, prelude="import time as _time\n_time.sleep(1.0)\n")
    out = tmp_path / "run"
    rc, _, err = run(["--data", train_cache, "--out", out, "--budget-s", 2, "--recipe", rec, *SMALL, "--log-every=1"],
                     capsys)
    assert rc == 0, err
    result = json.loads((out / "result.json").read_text())
    assert 1.0 <= result["setup_s"] < 2.0 and result["train_s"] >= 2.0
    assert metric_rows(out)[0]["elapsed_s"] >= 1.0  # the first step's row counts the setup before it
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["trained_s"] == pytest.approx(result["train_s"])  # what a --resume goes on from


def test_a_setup_past_the_budget_still_takes_one_step(train_cache, tmp_path, capsys):
    # as a first step that outlasts the budget does: the overrun is the harness's to judge,
    # and a step that never returns is still a timeout, not an untrained run passed as ok
    rec = recipe_at_call(tmp_path, prelude="import time as _time\n_time.sleep(1.5)\n")
    out = tmp_path / "run"
    rc, _, err = run(["--data", train_cache, "--out", out, "--budget-s", 1, "--recipe", rec, *SMALL], capsys)
    assert rc == 0, err
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 1 and result["setup_s"] >= 1.5 and result["train_s"] >= result["setup_s"]


def test_a_step_count_run_hands_the_recipe_step_over_steps(train_cache, tmp_path, capsys):
    rec = recipe_at_call(tmp_path, after="out['progress'] = torch.tensor(float(progress))")
    out = tmp_path / "run"
    rc, _, err = run(["--data", train_cache, "--out", out, "--steps", 4, "--recipe", rec, *SMALL, "--log-every=1"], capsys)
    assert rc == 0, err
    assert [r["progress"] for r in metric_rows(out)] == [0.0, 0.25, 0.5, 0.75]


def test_a_resumed_budget_run_keeps_its_schedule_origin(train_cache, tmp_path, capsys):
    log = "out['progress'] = torch.tensor(float(progress))"
    stopper = recipe_at_call(tmp_path, prelude="import time as _time\n", after=log,
                             before="if _calls[0] == 1:\n    _time.sleep(1.0)\nif _calls[0] == 4:\n"
                                    "    raise KeyboardInterrupt")
    (tmp_path / "r").mkdir()
    plain = recipe_at_call(tmp_path / "r", after=log)
    out = tmp_path / "run"
    base = ["--data", train_cache, "--out", out, "--budget-s", 4, *SMALL, "--log-every=1"]  # room for 4 steps on a busy machine
    rc, _, err = run([*base, "--recipe", stopper], capsys)
    assert rc == 130, err
    first = json.loads((out / "checkpoint.json").read_text())
    assert first["step"] == 3 and first["schedule_origin_s"] >= 1.0
    rc, _, err = run([*base, "--recipe", plain, "--resume"], capsys)
    assert rc == 0, err
    assert json.loads((out / "checkpoint.json").read_text())["schedule_origin_s"] == first["schedule_origin_s"]
    resumed = [r for r in metric_rows(out) if r["step"] > 3]
    assert resumed and resumed[0]["progress"] > 0  # the schedule goes on where it was
