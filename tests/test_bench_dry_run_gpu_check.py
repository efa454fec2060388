"""``bench/gpu_check.sh``, the script that runs the GPU checks in priority order: its shell
plumbing on the CPU (DRY=1), its exit status when a step fails or its deadline passes, and
what it and the scripts it runs say on a machine without a GPU; the settings it refuses
before any step, its logs from one run only, and step 4 (the benchmark JSON and the guard's
verdict) with stand-ins for the GPU and the suites."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from bench_support import kernel_table, train_check


@pytest.mark.parametrize("script", [kernel_table, train_check])
def test_without_a_gpu_and_without_dry_run_the_scripts_say_so(script, capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert script.main([]) == 1
    assert "no CUDA device" in capsys.readouterr().out


ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("DRY", "STEPS", "ONLY", "HARNESS_S", "HARNESS_ISOLATE", "TABLE_SIZES", "DEADLINE")


def gpu_check(timeout: int, *args: str, **env_vars: str):
    """``bench/gpu_check.sh`` with ``args``, run with ``env_vars`` over this environment (the
    script's own settings unset unless given); the finished process."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args],
                          env=dict(env, **env_vars), capture_output=True, text=True, timeout=timeout)


def fake_python(tmp_path, cases: str) -> str:
    """An interpreter for gpu_check.sh that answers the shell ``case`` patterns ``cases``
    itself and passes everything else to this one; its path."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\ncase \"$*\" in\n{cases}esac\nexec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    return str(fake)


@pytest.mark.slow
def test_gpu_check_script_dry_run(tmp_path):
    # The shell plumbing: steps 2, 2b and 3 with DRY=1 (CPU, tiny), logs in $OUT, the
    # summary at the end; steps 1 and 4 are skipped without a GPU.
    proc = gpu_check(600, DRY="1", OUT=str(tmp_path), PYTHON=sys.executable, STEPS="1 2 2b 3 4",
                     ONLY="template,blocks")
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    assert "== 1." not in out and "== 4." not in out
    summary = out[out.index("==== summary"):]
    assert "compiled step (lean:panel): ok" in summary and "smoke_status: ok" in summary
    assert "harness_status: ok" in summary
    assert summary.count("per step: wall") == 2 and summary.count("speed: ") == 2  # ONLY's two rows
    assert {p.name for p in tmp_path.iterdir()} >= {"train.log", "profile.log", "kernels.log", "kernel_table.md"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("dry", [{}, {"DRY": "0"}], ids=["unset", "DRY=0"])  # DRY=1 alone rehearses
def test_gpu_check_script_without_a_gpu_stops_at_once(tmp_path, dry):
    # its steps once ran on the CPU for minutes (the profiler's two modes up to their limits)
    proc = gpu_check(120, OUT=str(tmp_path), PYTHON=sys.executable, **dry)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == ("no CUDA device: nothing to check here (DRY=1 rehearses the "
                                            "script's plumbing on the CPU)")
    assert not list(tmp_path.iterdir())  # no step ran, no log written


def test_gpu_check_script_names_an_interpreter_without_torch(tmp_path):
    # it once said "no CUDA device" for an interpreter that cannot import torch at all
    proc = gpu_check(60, OUT=str(tmp_path), PYTHON="false")
    assert proc.returncode == 1 and proc.stdout.splitlines()[-1] == (
        "torch and triton do not import with false (PYTHON= picks another interpreter)"), proc.stdout


def test_gpu_check_script_fails_when_the_cuda_tests_cannot_run(tmp_path):
    # without pytest, step 1 (the first check in priority order) said "skipped" and the run
    # still exited 0; a GPU machine is faked by an interpreter that says CUDA is there
    fake = fake_python(tmp_path, '  *"import pytest"*) exit 1 ;;\n'
                                 '  *"sys.exit(not torch.cuda.is_available())"*) exit 0 ;;\n')
    proc = gpu_check(120, OUT=str(tmp_path / "out"), PYTHON=fake, STEPS="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == ("NOT CHECKED: step 1, the CUDA tests: pytest does not import "
                                            "(make gpudeps, and carry .gpudeps)")


@pytest.mark.parametrize("step,script", [("2", "train_check.py"), ("2b", "profile_step.py"), ("3", "kernel_table.py")])
def test_gpu_check_script_fails_when_a_step_fails(tmp_path, step, script):
    # a step whose script fails after printing fails the run (the status of the script, not
    # of the grep or tee after it), and the summary shows no table of an earlier run
    fake = fake_python(tmp_path, f'  *{script}*) echo "half a step"; exit 1 ;;\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "kernel_table.md").write_text("a table of an earlier run\n")
    proc = gpu_check(120, DRY="1", OUT=str(out), PYTHON=fake, STEPS=step)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "half a step" in proc.stdout and "a table of an earlier run" not in proc.stdout


def test_gpu_check_script_stops_at_its_deadline(tmp_path):
    # DEADLINE caps the whole run (one device command may take 600 s): with none left,
    # every step says it was skipped, the summary still prints and the exit status is 1.
    proc = gpu_check(120, DRY="1", OUT=str(tmp_path), PYTHON=sys.executable, DEADLINE="0")
    out = proc.stdout
    assert proc.returncode == 1, out
    assert out.count("skipped: DEADLINE (0 s) reached") == 4  # steps 2, 2b (two modes) and 3
    assert "==== summary" in out and "smoke_status" not in out


# Stand-ins for gpu_check.sh's interpreter: the device line, a GPU there or not, and each
# step's script saying what it was asked (the tests below take a fraction of a second each)
DEVICE_LINE = '  *"import torch, triton"*) echo "device: fake"; exit 0 ;;\n'
GPU = '  *"sys.exit(not torch.cuda.is_available())"*) exit 0 ;;\n'
STEP_SCRIPTS = ''.join(f'  *{script}*) echo "ran {script} $*"; exit 0 ;;\n'
                       for script in ("train_check.py", "profile_step.py", "kernel_table.py"))


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("YES", True), ("0", False), ("false", False),
                                      ("No", False), ("", False)])
def test_gpu_check_yes_no_settings(tmp_path, value, on):
    # HARNESS_ISOLATE=0 once ran the harness isolated (any non-empty value did); DRY=true was
    # a real run
    fake = fake_python(tmp_path, DEVICE_LINE + GPU + STEP_SCRIPTS)
    proc = gpu_check(60, OUT=str(tmp_path / "out"), PYTHON=fake, STEPS="2", DRY=value, HARNESS_ISOLATE=value)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = next(line for line in proc.stdout.splitlines() if line.startswith("ran train_check.py"))
    assert ("--harness-isolate" in args.split()) is on and ("--dry-run" in args.split()) is on
    assert proc.stdout.startswith("dry run: ") is on


@pytest.mark.parametrize("name", ["DRY", "HARNESS_ISOLATE"])
@pytest.mark.parametrize("value", ["2", "maybe", "on"])
def test_gpu_check_refuses_an_unknown_yes_no_value_before_anything_runs(tmp_path, name, value):
    fake = fake_python(tmp_path, DEVICE_LINE + GPU + STEP_SCRIPTS)
    proc = gpu_check(60, OUT=str(tmp_path / "out"), PYTHON=fake, STEPS="2", **{name: value})
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr == f"gpu_check: {name}={value}: not a yes/no value (1, true, yes; 0, false, no)\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("steps,ran", [
    ("2,3", ["2", "3"]), ("2, 2b ,3", ["2", "2b", "3"]), ("3 2", ["2", "3"]), ("2,,2b", ["2", "2b"]),
    ("2b\n3", ["2b", "3"]),
])
def test_gpu_check_steps_take_commas_or_spaces(tmp_path, steps, ran):
    # STEPS="1,3" (commas, as ONLY and TABLE_SIZES take) once ran no step and exited 0
    proc = gpu_check(60, OUT=str(tmp_path / "out"), PYTHON=fake_python(tmp_path, DEVICE_LINE + STEP_SCRIPTS),
                     DRY="1", STEPS=steps)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line.split(".")[0][3:] for line in proc.stdout.splitlines() if line.startswith("== ")] == ran


@pytest.mark.parametrize("args,env,message", [
    ((), {"STEPS": "1,5"}, "gpu_check: STEPS: unknown step '5' (known: 1 2 2b 3 4)"),
    ((), {"STEPS": "2;3"}, "gpu_check: STEPS: unknown step '2;3' (known: 1 2 2b 3 4)"),
    ((), {"STEPS": "*"}, "gpu_check: STEPS: unknown step '*' (known: 1 2 2b 3 4)"),
    ((), {"STEPS": " , "}, "gpu_check: STEPS: no step named (known: 1 2 2b 3 4)"),
    (("--quik",), {}, "gpu_check: arguments '--quik': the only one known is --quick"),
    (("--quick", "2"), {}, "gpu_check: arguments '--quick 2': the only one known is --quick"),
])
def test_gpu_check_refuses_unknown_steps_and_arguments_before_anything_runs(tmp_path, args, env, message):
    fake = fake_python(tmp_path, DEVICE_LINE + STEP_SCRIPTS)
    proc = gpu_check(60, *args, OUT=str(tmp_path / "out"), PYTHON=fake, DRY="1", **env)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr == message + "\n", proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_check_script_starts_its_logs_afresh(tmp_path):
    # the logs were appended to: with $OUT reused, an earlier run's lines showed in this
    # run's summary as if they were this run's
    out = tmp_path / "out"
    out.mkdir()
    for name, line in [("train.log", "speed: a row of an earlier run"), ("profile.log", "per step: an earlier run"),
                       ("guard.log", "guard: a verdict of an earlier run"), ("benchmarks.json", "{}")]:
        (out / name).write_text(line + "\n")
    fake = fake_python(tmp_path, DEVICE_LINE + '  *train_check.py*) echo "speed: this run"; '
                                               'echo "FAILED speed blocks: RuntimeError: no"; exit 1 ;;\n')
    proc = gpu_check(60, OUT=str(out), PYTHON=fake, DRY="1", STEPS="2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "earlier run" not in proc.stdout
    # the summary, printed last, repeats a section's failure from train_check.py
    summary = proc.stdout[proc.stdout.index("==== summary"):].splitlines()[1:]
    assert summary == ["speed: this run", "FAILED speed blocks: RuntimeError: no"]
    assert (out / "train.log").read_text() == "speed: this run\nFAILED speed blocks: RuntimeError: no\n"
    assert sorted(p.name for p in out.iterdir()) == ["train.log"]


def _fake_suites(tmp_path, slug: str, made: Path) -> str:
    """An interpreter for gpu_check.sh on a GPU whose device is ``slug``, whose benchmark
    suites write ``made`` as their JSON; the arguments pytest got land in ``pytest_args``."""
    return fake_python(tmp_path, DEVICE_LINE + GPU + f'  *"slug(current_device())"*) echo {slug}; exit 0 ;;\n'
                       f'  *"-m pytest bench"*) echo "$*" > {tmp_path}/pytest_args\n'
                       f'    for a; do case "$a" in --benchmark-json=*) cp {made} "${{a#--benchmark-json=}}" ;; esac; done\n'
                       '    echo "12 passed"; exit 0 ;;\n')


def _regressed_run(tmp_path) -> Path:
    """The committed CPU baseline with one guarded ratio doubled: a run with one regression."""
    run = json.loads((ROOT / "bench" / "baselines" / "cpu-x86-64-2-threads.json").read_text())
    ours = next(b for b in run["benchmarks"] if not b["extra_info"].get("plain")
                and not b["extra_info"].get("reference") and b["extra_info"].get("ratio_to_plain"))
    ours["extra_info"]["ratio_to_plain"] *= 2
    made = tmp_path / "made.json"
    made.write_text(json.dumps(run))
    return made


def test_gpu_check_step_4_brings_back_the_benchmark_json_and_the_verdict(tmp_path):
    # the guard ran the suites into a temporary folder of the device machine and its output
    # was cut to 30 lines: the GPU's raw figures never came back, nor, at times, the verdict
    made, out = _regressed_run(tmp_path), tmp_path / "out"
    proc = gpu_check(120, OUT=str(out), PYTHON=_fake_suites(tmp_path, "cpu-x86-64-2-threads", made), STEPS="4")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the regression
    assert json.loads((out / "benchmarks.json").read_text()) == json.loads(made.read_text())
    pytest_args = (tmp_path / "pytest_args").read_text().split()
    assert "--benchmark-enable" in pytest_args and f"--benchmark-json={out / 'benchmarks.json'}" in pytest_args
    summary = proc.stdout[proc.stdout.index("==== summary"):].splitlines()[1:]
    assert summary[0] == "benchmarks: pytest exit 0, the figures in $OUT/benchmarks.json"
    assert summary[1].startswith("guard: ") and "1 regressed" in summary[1], summary
    assert summary[2].startswith("REGRESSION ") and len(summary) == 3, summary
    assert (out / "suites.log").read_text() == "12 passed\n"


def test_gpu_check_step_4_saves_a_baseline_from_the_run_in_out(tmp_path):
    made, out = _regressed_run(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "fake-gpu.json").write_text('{"device": "a device of an earlier run", "benchmarks": []}')
    proc = gpu_check(120, OUT=str(out), PYTHON=_fake_suites(tmp_path, "fake-gpu", made), STEPS="4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((out / "fake-gpu.json").read_text()) == json.loads(made.read_text())
    summary = proc.stdout[proc.stdout.index("==== summary"):].splitlines()[1:]
    assert summary[0] == "benchmarks: pytest exit 0, the figures in $OUT/benchmarks.json"
    assert summary[1].startswith("guard: saved ")
    assert summary[-1].startswith("NOT CHECKED: step 4, the regression guard: no baseline for this device")


def test_gpu_check_step_4_without_time_left_says_nothing_was_compared(tmp_path):
    proc = gpu_check(60, OUT=str(tmp_path / "out"), DEADLINE="0", STEPS="4",
                     PYTHON=_fake_suites(tmp_path, "cpu-x86-64-2-threads", tmp_path / "unused.json"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout[proc.stdout.index("==== summary"):].splitlines()[1:] == [
        "benchmarks: not run: DEADLINE reached, no benchmark JSON written",
        "NOT CHECKED: step 4, the regression guard: the suites wrote no benchmark JSON (not run: DEADLINE reached)"]
