"""``bench/gpu_check.sh``, the script that runs the GPU checks in priority order: its shell
plumbing on the CPU (DRY=1), its exit status when a step fails or its deadline passes, and
what it and the scripts it runs say on a machine without a GPU."""

from __future__ import annotations

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


def gpu_check(timeout: int, **env_vars: str):
    """``bench/gpu_check.sh`` run with ``env_vars`` over this environment (``DRY`` unset unless
    given); the finished process."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "DRY"}
    return subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh")],
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
