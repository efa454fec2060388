"""``python -m eclip.harness run`` on bad input: one line, exit 2, and a result.json that is
this run's (never an earlier run's left in --out)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eclip import harness
from eclip.policy import check_file
from eclip.train import TEMPLATE

ROOT = Path(__file__).resolve().parents[1]


def test_a_recipe_that_is_not_utf8_is_rejected_in_one_line(tmp_path, capsys):
    bad = tmp_path / "recipe.py"
    bad.write_bytes(TEMPLATE.read_bytes() + b"\n# caf\xe9\n")  # Latin-1: Python refuses to import it
    line = TEMPLATE.read_bytes().count(b"\n") + 2
    assert [v.format("r.py") for v in check_file(bad)] == \
        [f"r.py:{line}: not UTF-8 text (byte {len(TEMPLATE.read_bytes()) + 6}: invalid continuation byte)"]
    out = tmp_path / "run"
    rc = harness.main(["run", "--recipe", str(bad), "--data", str(tmp_path), "--budget-s", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"harness: error: {bad}:{line}: not UTF-8 text " \
                              f"(byte {len(TEMPLATE.read_bytes()) + 6}: invalid continuation byte)\n", err
    assert json.loads((out / "result.json").read_text())["status"] == "rejected"


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    out = tmp_path / "afile"
    out.write_text("keep me")
    rc = harness.main(["run", "--recipe", str(TEMPLATE), "--data", str(tmp_path), "--budget-s", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"harness: error: {out}: cannot make the run directory (File exists)\n", err
    assert out.read_text() == "keep me"


def test_a_training_that_fails_on_bad_input_replaces_an_earlier_result(tmp_path, capsys):
    # An earlier run's result.json ("ok", a mean rank) once stayed in --out when the next run
    # failed on its input, and read as that run's outcome.
    out = tmp_path / "run"
    out.mkdir()
    (out / "result.json").write_text(json.dumps({"status": "ok", "val_mean_rank": 9.2}))
    rc = harness.main(["run", "--recipe", str(TEMPLATE), "--data", str(tmp_path / "nope"), "--budget-s", "1",
                       "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "error" and r["val_mean_rank"] is None and "exited with code 2" in r["reason"]
    assert "status:         error" in captured.out


@pytest.mark.parametrize("argv,message", [
    (["--recipe", "typo.py"], "typo.py: recipe file not found"),
    (["--recipe", str(TEMPLATE), "--memory-limit-gb", "nan"], "--memory-limit-gb nan: expected a finite"),
])
def test_bad_input_removes_an_earlier_result_and_creates_nothing(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "result.json").write_text(json.dumps({"status": "ok", "val_mean_rank": 9.2}))
    rc = harness.main(["run", *argv, "--data", str(tmp_path), "--budget-s", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"harness: error: {message}") and err.count("\n") == 1, err
    assert list(out.iterdir()) == []  # never read as this run's outcome
    rc = harness.main(["run", *argv, "--data", str(tmp_path), "--budget-s", "1", "--out", str(tmp_path / "a" / "b")])
    assert rc == 2 and not (tmp_path / "a").exists()  # a refused run makes no folders


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_a_memory_limit_that_is_no_number_of_gigabytes_is_one_line(value, tmp_path, capsys):
    # inf overflowed setrlimit in the child's start-up: a traceback and no result
    rc = harness.main(["run", "--recipe", str(TEMPLATE), "--data", str(tmp_path), "--budget-s", "1",
                       "--out", str(tmp_path / "run"), "--memory-limit-gb", value])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"harness: error: --memory-limit-gb {float(value):g}: expected a finite")
    assert err.count("\n") == 1


def test_the_cap_never_asks_for_more_than_an_inherited_hard_limit():
    # Under `ulimit -v` a cap above the inherited hard limit made setrlimit fail in the
    # child's preexec_fn: every run crashed before it began. Run in a child: a cap is for good.
    code = ("import resource\nfrom eclip.harness import limit_address_space\n"
            "resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))\n"
            "limit_address_space(1e6)\nprint(resource.getrlimit(resource.RLIMIT_AS))\n"
            "limit_address_space(5)\nprint(resource.getrlimit(resource.RLIMIT_AS))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-1000:]
    assert p.stdout.split("\n")[:2] == [f"({6 * 2**30}, {6 * 2**30})", f"({5 * 2**30}, {5 * 2**30})"]
    huge = "from eclip.harness import limit_address_space\nlimit_address_space(1e12)\n"  # overflowed rlim_t
    p = subprocess.run([sys.executable, "-c", huge], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-1000:]


@pytest.mark.parametrize("inside", ["", "runs/a"])
def test_a_run_directory_inside_the_cache_is_refused_before_anything_is_written(small_cache, tmp_path, capsys, inside):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_cache, data)
    before = sorted(str(p.relative_to(data)) for p in data.rglob("*"))
    out = data / inside if inside else data
    rc = harness.main(["run", "--recipe", str(TEMPLATE), "--data", str(data), "--budget-s", "1", "--out", str(out),
                       "--device", "cpu"])
    assert rc == 2 and capsys.readouterr().err == (f"harness: error: --out {out}: lies inside the cache --data {data}; "
                                                   "give a run directory outside it\n")
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*")) == before  # not even the run directory


def test_a_scored_split_of_one_image_is_refused_before_training(tmp_path, capsys):
    # alone, any model ranks the image first: a perfect score the research loop would keep
    # (the training process refuses it, in its words, before the recipe is imported)
    from eclip import prepare

    data = tmp_path / "c"
    assert prepare.main(["--dataset", "synthetic", "--num-train", "4", "--num-val", "1", "--num-test", "3",
                         "--image-size", "16", "--out", str(data), "--workers", "1"]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    rc = harness.main(["run", "--recipe", str(TEMPLATE), "--data", str(data), "--budget-s", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err == (f"train: error: {data}: the val split has a single image: a retrieval rank needs "
                               "two or more (alone, any model ranks it first)\n"), err
    assert json.loads((out / "result.json").read_text())["status"] == "error"
