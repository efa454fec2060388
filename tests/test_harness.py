"""``python -m eclip.harness run``: the policy gate, a scored run, secrets, out-of-memory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eclip.harness import scrub_environment
from eclip.train import TEMPLATE

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = ('"model": {"vision.width": 64, "vision.depth": 1, "text.width": 64, "text.depth": 1, '
               '"embed_dim": 64},')


@pytest.fixture
def cache(small_cache):
    return small_cache


def recipe(tmp_path, extra="", model=SMALL_MODEL):
    text = TEMPLATE.read_text().replace('    "model": {},', "    " + model, 1)
    path = tmp_path / "recipe.py"
    path.write_text(text + extra)
    return path


def harness(*args, env=None):
    """The harness in its own process, as the research loop runs it."""
    return subprocess.run([sys.executable, "-m", "eclip.harness", "run", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)


def test_a_recipe_is_trained_and_scored(cache, tmp_path):
    out = tmp_path / "run"
    p = harness("--recipe", recipe(tmp_path), "--data", cache, "--budget-s", 3, "--out", out,
                "--compile-cache", tmp_path / "cc")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "ok" and 0 <= r["val_mean_rank"] <= 59 and r["steps"] > 0
    assert r["train_s"] >= 3 and r["warmup_s"] > 0 and r["metrics"]["n_images"] == 60
    assert "val_mean_rank:" in p.stdout


def test_a_rejected_recipe_never_runs(cache, tmp_path):
    out = tmp_path / "run"
    bad = recipe(tmp_path, extra="\n\ndef leak():\n    return open('/etc/hostname').read()\n")
    p = harness("--recipe", bad, "--data", cache, "--budget-s", 3, "--out", out)
    assert p.returncode == 2
    assert "use of 'open' is not allowed" in p.stderr and p.stderr.count("\n") == 1
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "rejected" and r["val_mean_rank"] is None
    assert r["violations"][0].startswith(f"{bad}:")
    assert not (out / "checkpoint.json").exists()


def test_out_of_memory_is_a_status_not_a_crash(cache, tmp_path):
    hog = recipe(tmp_path, extra=(
        "\n\n_base_build_model = build_model\n\n"
        "def build_model(spec):\n"
        "    _STATE['hog'] = torch.ones(16 * 2**30, dtype=torch.uint8)  # 16 GiB\n"
        "    return _base_build_model(spec)\n"))
    out = tmp_path / "run"
    p = harness("--recipe", hog, "--data", cache, "--budget-s", 3, "--out", out, "--device", "cpu",
                "--memory-limit-gb", 8)
    assert p.returncode == 1, p.stderr[-2000:]
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "oom" and "allocate" in r["reason"]


def test_secrets_are_scrubbed():
    env = {"ANTHROPIC_API_KEY": "sk-test", "HF_TOKEN": "x", "PATH": "/bin", "MY_SECRET": "s", "HOME": "/root"}
    gone = scrub_environment(env)
    assert sorted(gone) == ["ANTHROPIC_API_KEY", "HF_TOKEN", "MY_SECRET"]
    assert env == {"PATH": "/bin", "HOME": "/root"}
