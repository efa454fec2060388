"""Interrupted runs of ``python -m eclip.train`` and ``--resume``: Ctrl-C and SIGTERM during a
step, during the evaluation and during the save, and resumed runs that match an uninterrupted
one or only evaluate the checkpoint."""

import json
import os
import signal
import time

import pytest
import torch
from train_support import SMALL, metric_rows, recipe_at_call, run

from eclip import train


@pytest.mark.parametrize("placement", ["device", "host"])
def test_resume_matches_an_uninterrupted_run(train_cache, tmp_path, capsys, placement):
    # host: images stay in host memory and a thread gathers batches ahead; the batches drawn
    # ahead at the interruption must not leak into the checkpoint's sampler state
    # the expert path on: its generator (draws, mixup) must resume exactly too
    base = ["--data", train_cache, "--steps", 8, *SMALL, "--expert=true", "--expert_probability=0.7",
            "--expert_cold_start=0.0", "--expert_ramp=0.0", "--data-placement", placement]
    rc, _, err = run([*base, "--out", tmp_path / "straight"], capsys)
    assert rc == 0, err
    stopper = recipe_at_call(tmp_path, before="if _calls[0] == 5:\n    raise KeyboardInterrupt")
    out = tmp_path / "resumed"
    rc, stdout, _ = run([*base, "--out", out, "--recipe", stopper], capsys)
    assert rc == 130 and "status:         interrupted" in stdout
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 4
    resume = [a for a in base if a != placement] + ["auto"]  # auto on resume: the checkpoint's placement
    rc, _, err = run([*resume, "--out", out, "--resume"], capsys)
    assert rc == 0, err
    a = json.loads((tmp_path / "straight" / "result.json").read_text())
    b = json.loads((out / "result.json").read_text())
    assert b["steps"] == 8 and a["data_placement"] == b["data_placement"] == placement
    assert 0 < a["expert_samples"] == b["expert_samples"] < a["samples"]  # some steps drew it, others not
    assert a["val_mean_rank"] == b["val_mean_rank"] and a["metrics"] == b["metrics"]
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "straight" / "checkpoint.safetensors"))
    wb = load_file(str(out / "checkpoint.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_resume_continues_torchs_global_generator(train_cache, tmp_path, capsys):
    # dropout (a pretrained text tower trains with it) and a recipe's torch.rand draw from
    # torch's global generator: resumed, it started from the seed again, and the run went
    # another way than the uninterrupted one
    noise = "model.logit_scale.data += torch.rand(()) * 1e-2"
    base = ["--data", train_cache, "--steps", 6, *SMALL]
    rc, _, err = run([*base, "--out", tmp_path / "straight", "--recipe", recipe_at_call(tmp_path, before=noise)],
                     capsys)
    assert rc == 0, err
    (tmp_path / "s").mkdir()  # the resumed process counts its calls afresh: 2 of them, no stop
    stopper = recipe_at_call(tmp_path / "s", before=f"if _calls[0] == 4:\n    raise KeyboardInterrupt\n{noise}")
    out = tmp_path / "resumed"
    assert run([*base, "--out", out, "--recipe", stopper], capsys)[0] == 130
    rc, _, err = run([*base, "--out", out, "--resume", "--recipe", stopper], capsys)
    assert rc == 0, err
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "straight" / "checkpoint.safetensors"))
    wb = load_file(str(out / "checkpoint.safetensors"))
    assert wa.keys() == wb.keys() and "state.torch_rng" in wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_resume_with_another_seed_is_refused(train_cache, tmp_path, capsys):
    # it went on from the checkpoint's generators, and recorded the new seed: a run that no
    # seed reproduces
    out = tmp_path / "run"
    assert run(["--data", train_cache, "--out", out, "--steps", 2, "--seed", 3, *SMALL], capsys)[0] == 0
    before = (out / "checkpoint.safetensors").read_bytes()
    rc, _, err = run(["--data", train_cache, "--out", out, "--steps", 4, "--resume", *SMALL], capsys)
    assert rc == 2 and err == (f"train: error: {out / 'checkpoint.safetensors'}: checkpoint was trained with --seed 3, "
                               "this run has --seed 42; resume with --seed 3\n")
    assert (out / "checkpoint.safetensors").read_bytes() == before
    assert run(["--data", train_cache, "--out", out, "--steps", 4, "--resume", "--seed", 3, *SMALL], capsys)[0] == 0


def test_resume_asking_for_another_length_warns_of_the_schedule(train_cache, tmp_path, capsys):
    # --steps 4, then --resume --steps 8: the learning rate had decayed to its floor by step 4
    # and rose again to about half its peak at step 5, without a word
    out = tmp_path / "run"
    assert run(["--data", train_cache, "--out", out, "--steps", 4, *SMALL], capsys)[0] == 0
    rc, _, err = run(["--data", train_cache, "--out", out, "--steps", 8, "--resume", *SMALL], capsys)
    assert rc == 0, err
    assert ("train: warning: the checkpoint's run asked for --steps 4; this one asks for --steps 8, over which the "
            "learning-rate schedule is laid again: from step 5 the rate follows the new length's schedule") in err
    lr = {r["step"]: r["lr"] for r in metric_rows(out) if "lr" in r}  # logged at steps 1, 2, 4, 6, 8
    assert lr[6] > lr[4]  # what it warns of: the rate rises again after step 4
    # an interrupted run resumed with the length it asked for: no warning
    stopper = recipe_at_call(tmp_path, before="if _calls[0] == 3:\n    raise KeyboardInterrupt")
    cut = tmp_path / "cut"
    assert run(["--data", train_cache, "--out", cut, "--steps", 6, "--recipe", stopper, *SMALL], capsys)[0] == 130
    rc, _, err = run(["--data", train_cache, "--out", cut, "--steps", 6, "--resume", *SMALL], capsys)
    assert rc == 0 and "warning" not in err, err
    # a budget in place of the steps: another length too (half a second more than it trained)
    budget = round(json.loads((cut / "checkpoint.json").read_text())["trained_s"] + 0.5, 3)
    rc, _, err = run(["--data", train_cache, "--out", cut, "--budget-s", budget, "--resume", *SMALL], capsys)
    assert rc == 0 and f"the checkpoint's run asked for --steps 6; this one asks for --budget-s {budget:g}" in err, err


def test_optimizer_settings_given_with_resume_apply(train_cache, tmp_path, capsys):
    # load_state_dict puts the saved groups' weight decay and betas back: --weight_decay and
    # --beta2 given with --resume once changed nothing while the recorded hparams said they had.
    out = tmp_path / "run"
    rc, _, err = run(["--data", train_cache, "--out", out, "--steps", 2, *SMALL], capsys)
    assert rc == 0, err
    before = json.loads((out / "checkpoint.json").read_text())["optimizer"]["param_groups"]
    rc, _, err = run(["--data", train_cache, "--out", out, "--steps", 4, *SMALL, "--resume", "--weight_decay=0.5",
                      "--beta2=0.9"], capsys)
    assert rc == 0, err
    meta = json.loads((out / "checkpoint.json").read_text())
    groups = meta["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in before] == [0.1, 0.0]  # the template's decayed and exempt groups
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0] and all(g["betas"][1] == 0.9 for g in groups)
    from safetensors.torch import load_file

    moments = [k for k in load_file(str(out / "checkpoint.safetensors")) if k.startswith("optim.")]
    assert meta["step"] == 4 and any(k.endswith(".exp_avg_sq") for k in moments)  # the state came along


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGTERM twice"])  # Ctrl-C; a scheduler or `timeout`
def test_first_ctrl_c_finishes_the_step_and_saves(train_cache, tmp_path, capsys, sig):
    # A real signal in the middle of step 5: the handler lets the step finish, then the loop
    # stops with a checkpoint of 5 steps and a result with status interrupted. A SIGTERM to
    # a harness's process group reaches the training process twice: the repeat changes nothing.
    name, times = sig.split()[0], 2 if sig.endswith("twice") else 1
    stopper = recipe_at_call(tmp_path, prelude="import os as _os, signal as _signal\n",
                             before=f"if _calls[0] == 5:\n    for _ in range({times}):\n"
                                    f"        _os.kill(_os.getpid(), _signal.{name})")
    out = tmp_path / "run"
    rc, stdout, err = run(["--data", train_cache, "--out", out, "--steps", 20, "--recipe", stopper, *SMALL], capsys)
    assert rc == 130 and "status:         interrupted" in stdout, err
    assert err.count(f"{name}: stopping after this step") == 1
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the process's own handler is back
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 5
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "interrupted" and result["steps"] == 5 and result["val_mean_rank"] is None


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_during_the_evaluation_keeps_the_checkpoint_and_writes_a_result(train_cache, tmp_path, capsys,
                                                                              monkeypatch, sig):
    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, sig))
        time.sleep(5)  # the signal's handler raises before this ends
        raise AssertionError("the signal was not taken as Ctrl-C")

    monkeypatch.setattr(train, "evaluate_split", interrupted)
    out = tmp_path / "run"
    rc, stdout, err = run(["--data", train_cache, "--out", out, "--steps", 3, *SMALL], capsys)
    assert rc == 130 and "status:         interrupted" in stdout and "during the evaluation" in err
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 3
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "interrupted" and result["steps"] == 3 and result["metrics"] is None


@pytest.mark.parametrize("length", [["--steps", "3"], ["--budget-s", "1"]])
def test_resume_with_nothing_left_to_train_evaluates_the_checkpoint(train_cache, tmp_path, capsys, monkeypatch, length):
    # An evaluation cut short leaves a trained checkpoint without metrics: --resume with the
    # same options evaluates it (no step runs, and the run says so instead of refusing it or
    # passing it off as a training).
    real = train.evaluate_split

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "evaluate_split", interrupted)
    out = tmp_path / "run"
    rc, _, err = run(["--data", train_cache, "--out", out, *length, *SMALL], capsys)
    assert rc == 130 and "--resume with the same options evaluates it" in err, err
    before = (out / "checkpoint.safetensors").read_bytes()
    steps = json.loads((out / "checkpoint.json").read_text())["step"]
    monkeypatch.setattr(train, "evaluate_split", real)
    rc, stdout, err = run(["--data", train_cache, "--out", out, *length, *SMALL, "--resume"], capsys)
    assert rc == 0, err
    assert f"has trained {steps} steps in" in err and "no step runs (evaluating it)" in err
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["steps"] == steps and result["val_mean_rank"] is not None
    from safetensors.torch import load, load_file
    now, then = load_file(str(out / "checkpoint.safetensors")), load(before)
    assert now.keys() == then.keys() and all(torch.equal(now[k], then[k]) for k in now)  # the weights as they were


def test_a_late_repeat_of_sigterm_does_not_cut_the_save_short(train_cache, tmp_path, capsys, monkeypatch):
    # the copy of a group's SIGTERM that the harness passes on may arrive after the last
    # step, while the checkpoint is written: it must change nothing
    stopper = recipe_at_call(tmp_path, prelude="import os as _os, signal as _signal\n",
                             before="if _calls[0] == 3:\n    _os.kill(_os.getpid(), _signal.SIGTERM)")
    real = train.ckpt.save_checkpoint

    def save_with_a_late_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train.ckpt, "save_checkpoint", save_with_a_late_signal)
    out = tmp_path / "run"
    rc, stdout, err = run(["--data", train_cache, "--out", out, "--steps", 20, "--recipe", stopper, *SMALL], capsys)
    assert rc == 130 and "status:         interrupted" in stdout, err
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize("where", ["import", "build_model"])
def test_a_ctrl_c_while_setting_up_is_one_line_and_leaves_no_folder(train_cache, tmp_path, capsys, where):
    # before the training loop takes Ctrl-C and SIGTERM over (the recipe's import, its model
    # and optimizer, the data to the device) they once ended in a traceback and an empty --out
    from train_support import recipe_with

    code = {"import": "raise KeyboardInterrupt\n",
            "build_model": "def build_model(spec):\n    raise KeyboardInterrupt\n"}[where]
    out = tmp_path / "run"
    rc, stdout, err = run(["--data", train_cache, "--out", out, "--steps", 3, *SMALL, "--recipe",
                           recipe_with(tmp_path, code)], capsys)
    assert rc == 130 and stdout == ""
    assert err == "train: interrupted while setting up (before its first step): no checkpoint or result of it written\n"
    assert not out.exists()


@pytest.mark.parametrize("forced", [False, True])
def test_the_progress_bar_shows_on_a_pipe_only_when_asked(train_cache, tmp_path, capsys, monkeypatch, forced):
    # the harness reads its training process's stderr through a pipe and passes it on: at a
    # terminal it asks for the bar, which tqdm hides when its stream is not one
    from eclip.loop import PROGRESS_ENV

    if forced:
        monkeypatch.setenv(PROGRESS_ENV, "1")
    else:
        monkeypatch.delenv(PROGRESS_ENV, raising=False)
    rc, _, err = run(["--data", train_cache, "--out", tmp_path / "run", "--steps", 2, *SMALL], capsys)
    assert rc == 0 and ("train: 100%" in err) is forced, err


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_while_the_checkpoint_is_written_waits_for_it(train_cache, tmp_path, capsys, monkeypatch, sig):
    # the loop had let go of the signals: a stop then (a scheduler's timeout at the budget's
    # end) lost the trained steps and left the last run's "ok" result, said "while setting up"
    real = train.ckpt.save_checkpoint

    def save_with_a_stop(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, sig))
        return real(*args, **kwargs)

    monkeypatch.setattr(train.ckpt, "save_checkpoint", save_with_a_stop)
    out = tmp_path / "run"
    rc, stdout, err = run(["--data", train_cache, "--out", out, "--steps", 3, *SMALL], capsys)
    assert rc == 130 and "status:         interrupted" in stdout, err
    assert "interrupted as the checkpoint was written (it is saved; no metrics" in err
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 3
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "interrupted" and result["steps"] == 3 and result["metrics"] is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_while_the_checkpoint_is_written_stops_at_once(train_cache, tmp_path, capsys,
                                                                       monkeypatch):
    real = train.ckpt.save_checkpoint

    def save_with_two_stops(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the second's handler raises before this ends
        return real(*args, **kwargs)

    monkeypatch.setattr(train.ckpt, "save_checkpoint", save_with_two_stops)
    out = tmp_path / "run"
    rc, _, err = run(["--data", train_cache, "--out", out, "--steps", 3, *SMALL], capsys)
    assert rc == 130 and err.splitlines()[-1] == (
        "train: stopped at once by a second Ctrl-C, before the checkpoint is written (an atomic write: the "
        "previous file, if any, is as it was)")
    assert not (out / "checkpoint.safetensors").exists() and not (out / "result.json").exists()


def test_a_full_disk_at_the_save_is_one_line_and_leaves_no_stale_result(train_cache, tmp_path, capsys, monkeypatch):
    # safetensors' I/O error is no OSError: a traceback, and the last run's "ok" result.json
    # stayed beside a metrics log of this run's steps
    from safetensors import SafetensorError

    out = tmp_path / "run"
    assert run(["--data", train_cache, "--out", out, "--steps", 2, *SMALL], capsys)[0] == 0
    before = (out / "checkpoint.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(train.ckpt, "save_file", full)
    rc, _, err = run(["--data", train_cache, "--out", out, "--steps", 4, "--resume", *SMALL], capsys)
    assert rc == 2 and err.splitlines()[-1] == (
        f"train: error: {out / 'checkpoint.safetensors'}: cannot write the checkpoint (Error while serializing: I/O "
        "error: No space left on device (os error 28)); the previous one, if any, is as it was")
    assert (out / "checkpoint.safetensors").read_bytes() == before and not (out / "result.json").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == 4


def test_a_stop_between_the_loops_end_and_the_save_still_saves(train_cache, tmp_path, capsys, monkeypatch):
    # the loop let go of the signals before the prefetcher's join, a device sync and the
    # state dicts: a stop there lost every step
    real = train.run_loop

    def loop_then_stop(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(train, "run_loop", loop_then_stop)
    out = tmp_path / "run"
    rc, stdout, err = run(["--data", train_cache, "--out", out, "--steps", 3, *SMALL], capsys)
    assert rc == 130 and "status:         interrupted" in stdout, err
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 3
    assert json.loads((out / "result.json").read_text())["status"] == "interrupted"


def test_a_late_copy_of_a_sigterm_after_the_save_changes_nothing(train_cache, tmp_path, capsys, monkeypatch):
    # one sent to a process group arrives twice (directly, and passed on by the harness): the
    # second, after the save, once raised and lost the result ("while setting up")
    real_save, real_peak = train.ckpt.save_checkpoint, train.peak_bf16_flops

    def save_with_a_stop(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(*args, **kwargs)

    def peak_after_a_copy(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_peak(*args, **kwargs)

    monkeypatch.setattr(train.ckpt, "save_checkpoint", save_with_a_stop)
    monkeypatch.setattr(train, "peak_bf16_flops", peak_after_a_copy)
    out = tmp_path / "run"
    rc, stdout, err = run(["--data", train_cache, "--out", out, "--steps", 3, *SMALL], capsys)
    assert rc == 130 and "status:         interrupted" in stdout and "setting up" not in err, err
    assert json.loads((out / "result.json").read_text())["status"] == "interrupted"
