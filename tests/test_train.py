"""``python -m eclip.train`` and the one training loop, on a small built-in dataset, on the CPU."""

import itertools
import json
import os
import re
import signal
import time

import pytest
import torch
from train_support import SMALL, metric_rows, recipe_at_call, run

from eclip import prepare, train
from eclip.checkpoint import load_checkpoint, save_checkpoint
from eclip.loop import load_recipe


@pytest.fixture
def cache(train_cache):
    return train_cache


def test_short_run_learns(cache, tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = run(["--data", cache, "--out", out, "--steps", 200, *SMALL], capsys)
    assert rc == 0, err
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["steps"] == 200 and result["eval_split"] == "val"
    rows = metric_rows(out)
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5, (first, last)
    random = (100 - 1) / 2
    assert result["val_mean_rank"] < random / 3, result["val_mean_rank"]
    assert result["warmup_s"] > 0 and result["samples_per_s"] > 0 and result["mfu"] is None  # CPU: no peak known
    assert 1 <= result["logit_scale"] <= 100
    for line in ("status:         ok", "val_mean_rank:", "steps:          200", "i2t_R@5:"):
        assert line in stdout
    assert (out / "checkpoint.safetensors").is_file() and (out / "checkpoint.json").is_file()


@pytest.mark.parametrize("placement", ["device", "host"])
def test_resume_matches_an_uninterrupted_run(cache, tmp_path, capsys, placement):
    # host: images stay in host memory and a thread gathers batches ahead; the batches drawn
    # ahead at the interruption must not leak into the checkpoint's sampler state
    # the expert path on: its generator (draws, mixup) must resume exactly too
    base = ["--data", cache, "--steps", 8, *SMALL, "--expert=true", "--expert_probability=0.7",
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


def test_optimizer_settings_given_with_resume_apply(cache, tmp_path, capsys):
    # load_state_dict puts the saved groups' weight decay and betas back: --weight_decay and
    # --beta2 given with --resume once changed nothing while the recorded hparams said they had.
    out = tmp_path / "run"
    rc, _, err = run(["--data", cache, "--out", out, "--steps", 2, *SMALL], capsys)
    assert rc == 0, err
    before = json.loads((out / "checkpoint.json").read_text())["optimizer"]["param_groups"]
    rc, _, err = run(["--data", cache, "--out", out, "--steps", 4, *SMALL, "--resume", "--weight_decay=0.5",
                      "--beta2=0.9"], capsys)
    assert rc == 0, err
    meta = json.loads((out / "checkpoint.json").read_text())
    groups = meta["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in before] == [0.1, 0.0]  # the template's decayed and exempt groups
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0] and all(g["betas"][1] == 0.9 for g in groups)
    from safetensors.torch import load_file

    moments = [k for k in load_file(str(out / "checkpoint.safetensors")) if k.startswith("optim.")]
    assert meta["step"] == 4 and any(k.endswith(".exp_avg_sq") for k in moments)  # the state came along


def test_nan_loss_is_reported_as_diverged(cache, tmp_path, capsys):
    nan = recipe_at_call(tmp_path, after="if _calls[0] == 3:\n    out['loss'] = out['loss'] * float('nan')")
    out = tmp_path / "run"
    rc, stdout, _ = run(["--data", cache, "--out", out, "--steps", 20, "--recipe", nan, *SMALL], capsys)
    assert rc == 1 and "status:         diverged" in stdout
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "diverged" and result["val_mean_rank"] is None
    # read back without a sync: the NaN of step 3 is pushed at step 4 (--log-every=2) and
    # read at the next log point, step 6; it is still reported at step 3
    assert "loss nan at step 3" in result["reason"] and result["steps"] == 6
    assert f"reason:         {result['reason']}\n" in stdout  # the summary says why, as the JSON does


@pytest.mark.parametrize("nan_step", [None, 3, 5])
def test_out_of_memory_mid_run_keeps_the_row_in_flight(cache, tmp_path, capsys, nan_step):
    # An OOM at step 6 (--log-every=2: rows pushed at steps 1, 2, 4): the row of step 4, still
    # in flight, is logged, then step 5's, and a NaN not yet read back — in that row (step 3) or after it
    # (step 5) — makes the run "diverged" rather than "oom".
    hog = recipe_at_call(tmp_path, before="if _calls[0] == 6:\n    raise torch.OutOfMemoryError('CUDA out of memory (simulated)')",
                         after=f"if _calls[0] == {nan_step}:\n    out['loss'] = out['loss'] * float('nan')")
    out = tmp_path / "run"
    rc, _, _ = run(["--data", cache, "--out", out, "--steps", 20, "--recipe", hog, *SMALL], capsys)
    result = json.loads((out / "result.json").read_text())
    assert rc == 1 and result["steps"] == 5
    if nan_step:
        assert result["status"] == "diverged" and f"loss nan at step {nan_step}" in result["reason"]
    else:
        assert result["status"] == "oom" and "out of memory (simulated)" in result["reason"]
        rows = metric_rows(out)
        assert [r["step"] for r in rows if "loss" in r] == [1, 2, 4, 5]  # and step 5, never pushed


def test_a_cuda_device_with_an_index_becomes_current(monkeypatch):
    # Triton kernels and CUDA events go to the current device: cuda:N must be made current
    # (a bare "cuda" is; torch.cuda.set_device refuses a device without an index).
    from eclip.loop import use_device

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    for name in ("cpu", "cuda", "cuda:1"):
        use_device(torch.device(name))
    assert calls == [1]


def test_checkpoint_round_trip(cache, tmp_path, monkeypatch):
    recipe = load_recipe(train.TEMPLATE)
    recipe.HPARAMS["model"] = {"vision.patch_size": 16, "vision.width": 64, "vision.depth": 1,
                               "text.width": 64, "text.depth": 1, "expert.width": 32}
    from eclip.loop import ModelSpec
    spec = ModelSpec(vocab_size=300, context_length=48, phrase_length=16, image_size=64, device=torch.device("cpu"))
    model = recipe.build_model(spec)
    opt = recipe.build_optimizer(model)
    model(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), torch.ones(2, 5, dtype=torch.long),
          torch.ones(2, 5, dtype=torch.bool))[0].sum().backward()
    opt.step()
    save_checkpoint(tmp_path, model, opt, {"x": torch.arange(3)}, {"step": 1})
    model2, opt2 = recipe.build_model(spec), None
    opt2 = recipe.build_optimizer(model2)
    meta, state = load_checkpoint(tmp_path, model2, opt2)
    assert meta["step"] == 1 and torch.equal(state["x"], torch.arange(3))
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(v, v2), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for pid, st in s1["state"].items():
        for key, v in st.items():
            assert torch.equal(v, s2["state"][pid][key]), (pid, key)
    other = load_recipe(train.TEMPLATE)  # a checkpoint from another config is refused
    other.HPARAMS["model"] = dict(recipe.HPARAMS["model"], **{"vision.width": 32})
    from eclip.errors import EclipError
    with pytest.raises(EclipError, match="checkpoint does not fit this model"):
        load_checkpoint(tmp_path, other.build_model(spec), None)
    # weights without an optimizer's state, or another optimizer's: one line naming the file
    with pytest.raises(EclipError, match=r"checkpoint\.safetensors: the checkpoint's optimizer state does not "
                                         r"fit this optimizer \(.*parameter groups"):
        load_checkpoint(tmp_path, model2, torch.optim.SGD(model2.parameters(), lr=0.1))
    import eclip.checkpoint as ck
    meta, source = ck.read_meta_from(tmp_path)
    monkeypatch.setattr(ck, "read_meta_from", lambda d: ({k: v for k, v in meta.items() if k != "optimizer"}, source))
    with pytest.raises(EclipError, match=r"checkpoint has no optimizer state .* cannot be resumed"):
        load_checkpoint(tmp_path, model2, opt2)


@pytest.mark.slow
def test_block_compilation_trains_and_checkpoints_like_eager(cache, tmp_path, capsys):
    # compile_scope=blocks compiles each transformer block in place: the same losses as an
    # eager run up to compiled-kernel rounding, and checkpoints with the eager names.
    from torch._dynamo.utils import counters

    counters.clear()
    runs = {}
    for name, extra in (("eager", ["--compile=false"]), ("blocks", ["--compile=true", "--compile_scope=blocks"])):
        out = tmp_path / name
        rc, _, err = run(["--data", cache, "--out", out, "--steps", 3, *SMALL, *extra,
                          "--compile-cache", tmp_path / "cc"], capsys)
        assert rc == 0, err
        runs[name] = out
    from safetensors.torch import load_file
    ea, bl = (load_file(str(runs[k] / "checkpoint.safetensors")) for k in ("eager", "blocks"))
    assert ea.keys() == bl.keys() and not any("_orig_mod" in k for k in bl)
    la, lb = (json.loads((runs[k] / "result.json").read_text())["loss"] for k in ("eager", "blocks"))
    assert la == pytest.approx(lb, rel=1e-3)
    assert counters["stats"]["unique_graphs"] >= 2  # a vision and a text block graph at least


@pytest.mark.slow
def test_block_compilation_with_the_expert_path_stays_under_the_recompile_limit(cache, tmp_path, capsys):
    # Expert subsets of varying size, phrases, random crops and evaluation all go through the
    # same compiled Block code: with static shapes they hit dynamo's limit of 8 graphs.
    import logging

    from torch._dynamo.utils import counters

    counters.clear()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        rc, _, err = run(["--data", cache, "--out", tmp_path / "run", "--steps", 20, *SMALL, "--compile=true",
                          "--compile_scope=blocks", "--expert=true", "--expert_cold_start=0.0",
                          "--expert_probability=1.0", "--crop_scale=0.1", "--compile-cache", tmp_path / "cc"], capsys)
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
    assert rc == 0, err
    assert not [r for r in records if "recompile_limit" in r.getMessage()]
    assert 2 <= counters["stats"]["unique_graphs"] <= 8


def test_block_compilation_compiles_each_block_in_place():
    import torch

    from eclip.loop import ModelSpec, load_recipe
    from eclip.towers import Block

    r = load_recipe(train.TEMPLATE)
    r.HPARAMS.update(compile=True, compile_scope="blocks")
    model = r.build_model(ModelSpec(vocab_size=64, context_length=8, phrase_length=4, image_size=32,
                                    device=torch.device("cpu")))
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert r._STATE["clip_loss"] is r._clip_loss and r._STATE["graphs"] is False
    r.Block = type("NotABlock", (), {})  # as with pretrained towers: nothing to compile is an error
    with pytest.raises(ValueError, match="'blocks' found no transformer block"):
        r.build_model(ModelSpec(vocab_size=64, context_length=8, phrase_length=4, image_size=32,
                                device=torch.device("cpu")))


def test_folds_and_final(cache, tmp_path, capsys):
    rc, stdout, err = run(["--data", cache, "--out", tmp_path / "cv", "--steps", 3, "--folds", 3, *SMALL], capsys)
    assert rc == 0, err
    r = json.loads((tmp_path / "cv" / "result.json").read_text())
    assert [f["status"] for f in r["folds"]] == ["ok", "ok", "ok"]
    ranks = [f["val_mean_rank"] for f in r["folds"]]
    assert r["val_mean_rank"] == pytest.approx(sum(ranks) / 3) and "folds_mean_rank:" in stdout
    assert "folds_done:     3/3\n" in stdout
    # a fold is not resumed on its own, and the message says what to do instead
    rc, _, err = run(["--data", cache, "--out", tmp_path / "cv" / "fold1", "--steps", 4, "--resume", *SMALL], capsys)
    assert rc == 2 and "(a fold of a --folds run is not resumed on its own: run --folds again)" in err, err
    # each train+val image is validated exactly once over the folds, and never trained on then
    from eclip.data.cache import load_cache
    n_trainval = int((load_cache(cache).split <= 1).sum())
    folds = [json.loads((tmp_path / "cv" / f"fold{k}" / "result.json").read_text()) for k in range(3)]
    assert sum(f["metrics"]["n_images"] for f in folds) == n_trainval
    for f in folds:
        meta = json.loads((tmp_path / "cv" / f["eval_split"] / "checkpoint.json").read_text())
        assert meta["train_rows"] + f["metrics"]["n_images"] == n_trainval
    rc, stdout, err = run(["--data", cache, "--out", tmp_path / "fin", "--steps", 3, "--final", *SMALL], capsys)
    assert rc == 0, err
    assert "\ntest_mean_rank: " in stdout and "eval_split:     test\n" in stdout  # named for what it is
    r = json.loads((tmp_path / "fin" / "result.json").read_text())
    assert r["eval_split"] == "test" and r["metrics"]["n_images"] == 60 and r["test_mean_rank"] == r["val_mean_rank"]


def test_folds_whose_first_fold_diverges_end_with_the_summary(cache, tmp_path, capsys):
    # no fold has a rank then: the summary once formatted None and the run died in a traceback
    nan = recipe_at_call(tmp_path, after="if _calls[0] == 3:\n    out['loss'] = out['loss'] * float('nan')")
    out = tmp_path / "cv"
    rc, stdout, _ = run(["--data", cache, "--out", out, "--steps", 20, "--folds", 3, "--recipe", nan, *SMALL], capsys)
    assert rc == 1 and "status:         diverged" in stdout and "folds_mean_rank: None" in stdout
    assert "folds_done:     0/3\n" in stdout  # one fold of three ran, and it failed
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "diverged" and result["val_mean_rank"] is None
    assert [f["status"] for f in result["folds"]] == ["diverged"]  # the later folds are not run


def test_bf16_autocast_step_with_the_expert_term(cache, tmp_path, capsys):
    # Under autocast the CLIP embeddings enter the loss in bf16 while the expert and phrase
    # embeddings leave autocast in fp32: the recipe must match them (caught on a GPU first).
    rc, _, err = run(["--data", cache, "--out", tmp_path / "bf16", "--steps", 3, "--precision=bf16", "--expert=true",
                      "--expert_probability=1.0", "--expert_cold_start=0.0", "--expert_ramp=0.0", *SMALL], capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "bf16" / "result.json").read_text())
    assert result["status"] == "ok" and result["steps"] == 3
    assert 0 < result["expert_samples"] <= result["samples"]  # the expert term did run


def test_mfu_counts_the_expert_path(cache, tmp_path, capsys, monkeypatch):
    from eclip.data.cache import load_cache
    from eclip.model import build_model, model_config

    monkeypatch.setattr(train, "peak_bf16_flops", lambda device: 1e12)  # a CPU has no table entry
    argv = ["--data", cache, "--steps", 4, "--expert_probability=1.0", "--expert_cold_start=0.0",
            "--expert_ramp=0.0", *SMALL]
    results = {}
    for name, on in (("off", "false"), ("on", "true")):
        rc, _, err = run([*argv, "--out", tmp_path / name, f"--expert={on}"], capsys)
        assert rc == 0, err
        results[name] = json.loads((tmp_path / name / "result.json").read_text())
    off, on = results["off"], results["on"]
    assert off["expert_samples"] == 0 and on["expert_samples"] > 0
    data = load_cache(cache)
    model = build_model(model_config("tiny", image_size=data.image_size, vocab_size=data.vocab_size,
                                     context_length=data.context_length, **off["hparams"]["model"]))
    # without the expert path: 3 × the towers' forward FLOPs per sample, the captions counted
    # at the length the text tower ran (the training split's longest), not the padded context
    train_images = data.split_images("train")
    longest = int(data.lengths[torch.isin(data.caption_image, train_images)].max())
    assert longest < data.context_length
    assert off["mfu"] == pytest.approx(3 * model.flops_per_sample(longest) * off["samples_per_s"] / 1e12, rel=1e-6)
    # with the expert path the same samples/s is worth more FLOPs
    assert on["mfu"] / on["samples_per_s"] > 1.2 * off["mfu"] / off["samples_per_s"]


def test_cache_without_regions_trains(tmp_path, capsys):
    # A plain caption manifest (no regions column) is the common OpenCLIP case.
    import numpy as np
    from PIL import Image
    images = tmp_path / "im"
    images.mkdir()
    rows = ["filepath,caption"]
    for i in range(12):
        Image.fromarray(np.full((20, 20, 3), i * 20, dtype=np.uint8)).save(images / f"{i}.png")
        rows.append(f"{i}.png,picture number {i}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    assert prepare.main(["--format", "manifest", "--images", str(images), "--manifest", str(tmp_path / "m.csv"),
                         "--out", str(tmp_path / "c"), "--image-size", "16", "--workers", "1",
                         "--vocab-size", "300", "--folds", "2", "--val-frac", "0.3", "--test-frac", "0"]) == 0
    rc, _, err = run(["--data", tmp_path / "c", "--out", tmp_path / "o", "--steps", 2, "--batch_size=4",
                      "--expert=true", "--expert_cold_start=0.0", "--expert_ramp=0.0", "--expert_probability=1.0",
                      "--model.vision.patch_size=8", "--model.vision.width=32", "--model.text.width=32",
                      "--model.expert.width=16"], capsys)
    assert rc == 0, err


def test_flip_only_mirrors_without_cropping(cache):
    from eclip.data.cache import load_cache
    from eclip.data.device import DeviceData
    c = load_cache(cache)
    rows = c.split_images("train")[:32]
    data = DeviceData(c, rows, torch.device("cpu"), seed=0, crop_scale=1.0, flip=True)
    plain = DeviceData(c, rows, torch.device("cpu"), seed=0)
    idx = data._indices(32)
    data.cursor = 0  # sample the same rows again, now through the augmentation
    batch = data.sample(32)
    originals = plain.images[idx].float() / 255
    same = (batch.images - originals).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (batch.images - originals.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((same | mirrored).all()) and bool(same.any()) and bool(mirrored.any())
    boxes = plain.boxes[idx]
    flipped = torch.stack([1 - boxes[..., 2], boxes[..., 1], 1 - boxes[..., 0], boxes[..., 3]], -1) * plain.box_mask[idx][..., None]
    want = torch.where(mirrored[:, None, None], flipped, boxes) * batch.box_mask[..., None]  # the phrase's boxes
    assert batch.box_mask.any()
    torch.testing.assert_close(batch.boxes, want, atol=1e-5, rtol=0)


def test_a_save_cut_short_between_its_two_files_reads_back_whole(tmp_path, monkeypatch):
    # killed after the tensors file is renamed into place and before checkpoint.json is: the
    # meta read back is the one saved with those tensors, not the previous save's
    import eclip.checkpoint as ckpt

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, model, opt, {}, {"step": 3})
    with torch.no_grad():
        model.weight.add_(1.0)
    real = ckpt.atomic_write

    def killed_before_the_json(path, write):
        if path.name == ckpt.META:
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(ckpt, "atomic_write", killed_before_the_json)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, opt, {}, {"step": 5})
    assert json.loads((tmp_path / ckpt.META).read_text())["step"] == 3  # the previous save's
    other = torch.nn.Linear(3, 2)
    meta, _ = load_checkpoint(tmp_path, other, None)
    assert meta["step"] == 5 and torch.equal(other.weight, model.weight)
    # a checkpoint written before the header copy is read from its JSON
    from safetensors.torch import load_file
    from safetensors.torch import save_file as plain_save

    plain_save(load_file(tmp_path / ckpt.TENSORS), str(tmp_path / ckpt.TENSORS))
    assert ckpt.read_meta(tmp_path)["step"] == 3


def test_checkpoint_with_tied_weights(tmp_path):
    # Two names for one tensor (tied weights) are stored once and restored as one.
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3, bias=False)
            self.b = torch.nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight

    model = Tied()
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, model, opt, {}, {"step": 0})
    other = Tied()
    load_checkpoint(tmp_path, other, None)
    assert torch.equal(other.a.weight, model.a.weight) and other.a.weight is other.b.weight


def test_train_step_clamps_the_logit_scale_after_the_optimizer_step(cache):
    # A gradient that always asks for a larger scale: Adam then raises the log-scale by the
    # learning rate each step, so only the clamp in train_step keeps it at ln 100.
    from eclip.data.cache import load_cache
    from eclip.data.device import DeviceData
    from eclip.loop import ModelSpec
    recipe = load_recipe(train.TEMPLATE)
    recipe.HPARAMS["model"] = {"vision.width": 64, "vision.depth": 1, "text.width": 64, "text.depth": 1}
    c = load_cache(cache)
    spec = ModelSpec(vocab_size=c.vocab_size, context_length=c.context_length,
                     phrase_length=int(c.region_tokens.shape[1]), image_size=c.image_size, device=torch.device("cpu"))
    model = recipe.build_model(spec)
    opt = recipe.build_optimizer(model)
    model.logit_scale.register_hook(lambda g: torch.full_like(g, -1.0))
    hi = torch.tensor(model.cfg.logit_scale_max, dtype=torch.float32)
    with torch.no_grad():
        model.logit_scale.fill_(float(hi) - 0.0015)
    data = DeviceData(c, c.split_images("train"), torch.device("cpu"), seed=0)
    values = []
    for _ in range(5):
        metrics = recipe.train_step(model, opt, data.sample(8), 0.5)
        values.append(model.logit_scale.detach().clone())
    assert values[1] > values[0] > float(hi) - 0.0015  # below the bound it moves: the gradient arrives
    assert torch.equal(values[-1], hi)  # and is clamped in place, never beyond
    assert float(metrics["logit_scale"]) == pytest.approx(100.0, rel=1e-6)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGTERM twice"])  # Ctrl-C; a scheduler or `timeout`
def test_first_ctrl_c_finishes_the_step_and_saves(cache, tmp_path, capsys, sig):
    # A real signal in the middle of step 5: the handler lets the step finish, then the loop
    # stops with a checkpoint of 5 steps and a result with status interrupted. A SIGTERM to
    # a harness's process group reaches the training process twice: the repeat changes nothing.
    name, times = sig.split()[0], 2 if sig.endswith("twice") else 1
    stopper = recipe_at_call(tmp_path, prelude="import os as _os, signal as _signal\n",
                             before=f"if _calls[0] == 5:\n    for _ in range({times}):\n"
                                    f"        _os.kill(_os.getpid(), _signal.{name})")
    out = tmp_path / "run"
    rc, stdout, err = run(["--data", cache, "--out", out, "--steps", 20, "--recipe", stopper, *SMALL], capsys)
    assert rc == 130 and "status:         interrupted" in stdout, err
    assert err.count(f"{name}: stopping after this step") == 1
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the process's own handler is back
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 5
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "interrupted" and result["steps"] == 5 and result["val_mean_rank"] is None


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_during_the_evaluation_keeps_the_checkpoint_and_writes_a_result(cache, tmp_path, capsys,
                                                                              monkeypatch, sig):
    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, sig))
        time.sleep(5)  # the signal's handler raises before this ends
        raise AssertionError("the signal was not taken as Ctrl-C")

    monkeypatch.setattr(train, "evaluate_split", interrupted)
    out = tmp_path / "run"
    rc, stdout, err = run(["--data", cache, "--out", out, "--steps", 3, *SMALL], capsys)
    assert rc == 130 and "status:         interrupted" in stdout and "during the evaluation" in err
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 3
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "interrupted" and result["steps"] == 3 and result["metrics"] is None


@pytest.mark.parametrize("length", [["--steps", "3"], ["--budget-s", "1"]])
def test_resume_with_nothing_left_to_train_evaluates_the_checkpoint(cache, tmp_path, capsys, monkeypatch, length):
    # An evaluation cut short leaves a trained checkpoint without metrics: --resume with the
    # same options evaluates it (no step runs, and the run says so instead of refusing it or
    # passing it off as a training).
    real = train.evaluate_split

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "evaluate_split", interrupted)
    out = tmp_path / "run"
    rc, _, err = run(["--data", cache, "--out", out, *length, *SMALL], capsys)
    assert rc == 130 and "--resume with the same options evaluates it" in err, err
    before = (out / "checkpoint.safetensors").read_bytes()
    steps = json.loads((out / "checkpoint.json").read_text())["step"]
    monkeypatch.setattr(train, "evaluate_split", real)
    rc, stdout, err = run(["--data", cache, "--out", out, *length, *SMALL, "--resume"], capsys)
    assert rc == 0, err
    assert f"has trained {steps} steps in" in err and "no step runs (evaluating it)" in err
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["steps"] == steps and result["val_mean_rank"] is not None
    from safetensors.torch import load, load_file
    now, then = load_file(str(out / "checkpoint.safetensors")), load(before)
    assert now.keys() == then.keys() and all(torch.equal(now[k], then[k]) for k in now)  # the weights as they were


def test_a_late_repeat_of_sigterm_does_not_cut_the_save_short(cache, tmp_path, capsys, monkeypatch):
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
    rc, stdout, err = run(["--data", cache, "--out", out, "--steps", 20, "--recipe", stopper, *SMALL], capsys)
    assert rc == 130 and "status:         interrupted" in stdout, err
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize("mode,scope,device,want", [
    ("auto", "step", "cuda", "reduce-overhead"),  # the whole step as CUDA graphs
    ("auto", "blocks", "cuda", "default"),  # graphs per block would replay between eager code
    ("auto", "step", "cpu", "default"),  # a CPU has no graphs
    ("default", "step", "cuda", "default"),
    ("max-autotune-no-cudagraphs", "step", "cuda", "max-autotune-no-cudagraphs"),
    ("reduce-overhead", "step", "cpu", "reduce-overhead"),  # an explicit mode is kept
])
def test_compile_mode_auto_means_graphs_for_a_compiled_step_on_cuda(mode, scope, device, want):
    from eclip.loop import load_recipe

    r = load_recipe(train.TEMPLATE)
    assert r.HPARAMS["compile_mode"] == "auto"
    assert r.resolve_compile_mode(mode, scope, device) == want


def test_the_schedule_starts_after_the_first_step(cache, tmp_path, capsys):
    # The clock counts the first step (compilation on a GPU: tens of seconds cold), but the
    # recipe's schedule must not: on the clock a 1.5 s first step of a 4 s budget would hand
    # the second step progress 0.375, past any warm-up. The recipe logs what it was given.
    recipe = recipe_at_call(tmp_path, prelude="import time as _time\n",
                            before="if _calls[0] == 1:\n    _time.sleep(1.5)",
                            after="out['progress'] = torch.tensor(float(progress))")
    out = tmp_path / "run"
    budget = 4
    rc, _, err = run(["--data", cache, "--out", out, "--budget-s", budget, "--recipe", recipe,
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


def test_the_last_steps_get_a_row_of_their_own(cache, tmp_path, capsys):
    # Rows were written at step 1 and every --log-every steps only: the steps after the last
    # log point were checked and fed the summary's loss, but never reached metrics.jsonl.
    out = tmp_path / "run"
    rc, stdout, err = run(["--data", cache, "--out", out, "--steps", 5, *SMALL, "--log-every=3"], capsys)
    assert rc == 0, err
    rows = metric_rows(out)
    assert [(r["step"], r["samples"]) for r in rows] == [(1, 64), (3, 192), (5, 320)]
    result = json.loads((out / "result.json").read_text())
    assert result["loss"] == rows[-1]["loss"]  # the summary's loss is the last row's


def test_the_recipes_setup_is_on_the_clock(cache, tmp_path, capsys):
    # The clock began at the first step: a recipe could compile (or train) at its import or
    # in build_model for as long as it liked. Its import, build_model and build_optimizer
    # now count against the budget, and result.json says how long they took.
    rec = recipe_at_call(tmp_path, prelude="import time as _time\n_time.sleep(1.0)\n")
    out = tmp_path / "run"
    rc, _, err = run(["--data", cache, "--out", out, "--budget-s", 2, "--recipe", rec, *SMALL, "--log-every=1"],
                     capsys)
    assert rc == 0, err
    result = json.loads((out / "result.json").read_text())
    assert 1.0 <= result["setup_s"] < 2.0 and result["train_s"] >= 2.0
    assert metric_rows(out)[0]["elapsed_s"] >= 1.0  # the first step's row counts the setup before it
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["trained_s"] == pytest.approx(result["train_s"])  # what a --resume goes on from


def test_a_setup_past_the_budget_still_takes_one_step(cache, tmp_path, capsys):
    # as a first step that outlasts the budget does: the overrun is the harness's to judge,
    # and a step that never returns is still a timeout, not an untrained run passed as ok
    rec = recipe_at_call(tmp_path, prelude="import time as _time\n_time.sleep(1.5)\n")
    out = tmp_path / "run"
    rc, _, err = run(["--data", cache, "--out", out, "--budget-s", 1, "--recipe", rec, *SMALL], capsys)
    assert rc == 0, err
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 1 and result["setup_s"] >= 1.5 and result["train_s"] >= result["setup_s"]


def test_a_step_count_run_hands_the_recipe_step_over_steps(cache, tmp_path, capsys):
    rec = recipe_at_call(tmp_path, after="out['progress'] = torch.tensor(float(progress))")
    out = tmp_path / "run"
    rc, _, err = run(["--data", cache, "--out", out, "--steps", 4, "--recipe", rec, *SMALL, "--log-every=1"], capsys)
    assert rc == 0, err
    assert [r["progress"] for r in metric_rows(out)] == [0.0, 0.25, 0.5, 0.75]


def test_a_resumed_budget_run_keeps_its_schedule_origin(cache, tmp_path, capsys):
    log = "out['progress'] = torch.tensor(float(progress))"
    stopper = recipe_at_call(tmp_path, prelude="import time as _time\n", after=log,
                             before="if _calls[0] == 1:\n    _time.sleep(1.0)\nif _calls[0] == 4:\n"
                                    "    raise KeyboardInterrupt")
    (tmp_path / "r").mkdir()
    plain = recipe_at_call(tmp_path / "r", after=log)
    out = tmp_path / "run"
    base = ["--data", cache, "--out", out, "--budget-s", 4, *SMALL, "--log-every=1"]  # room for 4 steps on a busy machine
    rc, _, err = run([*base, "--recipe", stopper], capsys)
    assert rc == 130, err
    first = json.loads((out / "checkpoint.json").read_text())
    assert first["step"] == 3 and first["schedule_origin_s"] >= 1.0
    rc, _, err = run([*base, "--recipe", plain, "--resume"], capsys)
    assert rc == 0, err
    assert json.loads((out / "checkpoint.json").read_text())["schedule_origin_s"] == first["schedule_origin_s"]
    resumed = [r for r in metric_rows(out) if r["step"] > 3]
    assert resumed and resumed[0]["progress"] > 0  # the schedule goes on where it was


def test_the_seed_decides_the_batches(cache, tmp_path, capsys):
    rec = recipe_at_call(tmp_path, after="out['batch'] = batch.images.double().mean() + batch.tokens.double().mean()")
    seen = []
    for k, seed in enumerate((1, 2, 1)):
        out = tmp_path / f"run{k}"
        rc, _, err = run(["--data", cache, "--out", out, "--steps", 1, "--recipe", rec, *SMALL, "--seed", seed],
                         capsys)
        assert rc == 0, err
        seen.append(metric_rows(out)[0]["batch"])
    assert seen[0] == seen[2] != seen[1]


def test_final_trains_on_train_and_val_but_never_on_test(cache, tmp_path, capsys):
    from eclip.data.cache import load_cache

    out = tmp_path / "fin"
    rc, stdout, err = run(["--data", cache, "--out", out, "--steps", 1, "--final", *SMALL], capsys)
    assert rc == 0, err
    split = load_cache(cache).split
    assert json.loads((out / "checkpoint.json").read_text())["train_rows"] == int((split != 2).sum())
    # the summary names the test split's rank as such; it printed it as val_mean_rank too
    result = json.loads((out / "result.json").read_text())
    assert f"test_mean_rank: {result['test_mean_rank']:.4g}\n" in stdout and "val_mean_rank" not in stdout
    assert result["eval_split"] == "test" and result["val_mean_rank"] == result["test_mean_rank"]


def test_checkpoint_keeps_an_optimizers_plain_number_state(tmp_path):
    # AdamW keeps its step as a tensor; a recipe's optimizer may keep a Python number
    class Counting(torch.optim.SGD):
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    self.state[p]["count"] = self.state[p].get("count", 0) + 1
            return super().step(closure)

    model = torch.nn.Linear(3, 2)
    opt = Counting(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    opt.step()
    save_checkpoint(tmp_path, model, opt, {}, {"step": 2})
    model2 = torch.nn.Linear(3, 2)
    opt2 = Counting(model2.parameters(), lr=0.1)
    load_checkpoint(tmp_path, model2, opt2)
    assert [opt2.state[p].get("count") for p in model2.parameters()] == [2, 2]


def test_a_checkpoint_that_lacks_weights_of_the_model_is_refused(tmp_path):
    # a recipe's own model has no cfg to compare: the strict load is what refuses it
    from eclip.errors import EclipError

    small = torch.nn.Sequential(torch.nn.Linear(3, 2))
    save_checkpoint(tmp_path, small, torch.optim.AdamW(small.parameters()), {}, {"step": 0})
    bigger = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    with pytest.raises(EclipError, match="checkpoint does not fit this model"):
        load_checkpoint(tmp_path, bigger, None)


def test_the_evaluation_masks_the_padding_of_captions():
    from eclip.loop import encode_in_order
    from eclip.model import build_model, model_config

    torch.manual_seed(0)
    model = build_model(model_config("tiny", image_size=32, vocab_size=50, context_length=8,
                                     **{"expert.enabled": False}))
    tokens = torch.tensor([[1, 5, 7, 2, 0, 0, 0], [1, 9, 2, 0, 0, 0, 0], [1, 4, 4, 4, 4, 6, 2]])
    _, txt = encode_in_order(model, None, tokens, torch.device("cpu"))
    for row, t in zip(txt, tokens, strict=True):
        n = int((t != 0).sum())
        with torch.no_grad():
            alone = model.encode_text(t[None, :n], torch.ones(1, n, dtype=torch.bool))
        torch.testing.assert_close(row[None], alone, atol=1e-5, rtol=0)


def test_a_channels_last_model_and_its_optimizer_state_round_trip(tmp_path):
    # channels_last conv weights (and AdamW's moments, made like them) are not contiguous in
    # the default layout, which safetensors refuses to write as they are
    model = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)).square().sum().backward()
    opt.step()
    assert not model.weight.is_contiguous() and not opt.state[model.weight]["exp_avg"].is_contiguous()
    save_checkpoint(tmp_path, model, opt, {}, {"step": 1})
    model2 = torch.nn.Conv2d(3, 4, 3)
    opt2 = torch.optim.AdamW(model2.parameters())
    load_checkpoint(tmp_path, model2, opt2)
    assert torch.equal(model2.weight, model.weight) and torch.equal(model2.bias, model.bias)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state[model2.weight][key], opt.state[model.weight][key]), key


def test_save_checkpoint_times_the_writing_only(tmp_path, monkeypatch):
    # the loop subtracts this from the time after training: a clock that advances 1 s per
    # file written must read 2 s, whatever gathering the tensors took
    import eclip.checkpoint as ckpt

    clock = [100.0]
    real = ckpt.atomic_write

    def slow_write(path, write):
        clock[0] += 1.0
        real(path, write)

    monkeypatch.setattr(ckpt, "atomic_write", slow_write)
    monkeypatch.setattr(ckpt.time, "perf_counter", lambda: clock[0])
    model = torch.nn.Linear(3, 2)
    assert save_checkpoint(tmp_path, model, torch.optim.AdamW(model.parameters()), {}, {"step": 0}) == 2.0


@pytest.mark.parametrize("where", ["header", "json"])
@pytest.mark.parametrize("text,reason", [
    ('{"step": 3', r"unreadable checkpoint metadata \(Expecting"),  # cut short
    ("[1, 2]", r"unreadable checkpoint metadata \(not a JSON object\)"),
])
def test_unreadable_checkpoint_metadata_is_one_error_naming_its_file(tmp_path, where, text, reason):
    # the meta is read from the tensors file's header, or from checkpoint.json for a
    # checkpoint older than the header copy: the error names the one it came from
    from safetensors.torch import save_file

    import eclip.checkpoint as ckpt
    from eclip.errors import EclipError

    save_file({"model.weight": torch.zeros(2)}, str(tmp_path / ckpt.TENSORS),
              metadata={ckpt.HEADER_KEY: text} if where == "header" else None)
    (tmp_path / ckpt.META).write_text(text if where == "json" else '{"step": 1}')
    source = tmp_path / (ckpt.TENSORS if where == "header" else ckpt.META)
    with pytest.raises(EclipError, match=rf"^{re.escape(str(source))}: {reason}"):
        ckpt.read_meta(tmp_path)


def test_checkpoint_json_that_is_not_text_is_one_error_naming_it(tmp_path):
    # damaged bytes in checkpoint.json (read when the tensors file has no header copy) were a
    # UnicodeDecodeError traceback from `train --resume` and `eclip.encode`
    import eclip.checkpoint as ckpt
    from eclip.errors import EclipError

    (tmp_path / ckpt.META).write_bytes(b"\xff\xfe{garbage")
    with pytest.raises(EclipError, match=rf"^{re.escape(str(tmp_path / ckpt.META))}: "
                                         r"unreadable checkpoint metadata \(not UTF-8 text\)$"):
        ckpt.read_meta(tmp_path)


def test_an_alias_of_no_stored_weight_is_one_error_naming_the_file(tmp_path):
    # tied weights are stored once and named again in the metadata's aliases; an alias whose
    # weight is not in the file (edited or foreign metadata) was a bare KeyError
    from safetensors.torch import load_file, save_file

    import eclip.checkpoint as ckpt
    from eclip.errors import EclipError

    tied = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False))
    tied[1].weight = tied[0].weight
    save_checkpoint(tmp_path, tied, torch.optim.AdamW(tied.parameters()), {}, {"step": 0})
    meta, source = ckpt.read_meta_from(tmp_path)
    assert meta["aliases"] == {"1.weight": "0.weight"}  # the case being damaged below
    fresh = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False))
    fresh[1].weight = fresh[0].weight
    load_checkpoint(tmp_path, fresh, None)
    assert torch.equal(fresh[1].weight, tied[0].weight)
    meta["aliases"] = {"1.weight": "2.weight"}
    tensors = load_file(str(source))
    save_file(tensors, str(source), metadata={ckpt.HEADER_KEY: json.dumps(meta)})
    with pytest.raises(EclipError, match=rf"^{re.escape(str(source))}: checkpoint alias '1\.weight' "
                                         r"names no stored weight '2\.weight'$"):
        load_checkpoint(tmp_path, fresh, None)


@pytest.mark.parametrize("other,reason", [
    (torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)), r'Missing key\(s\) in state_dict: "1\.weight"'),
    (torch.nn.Sequential(torch.nn.Linear(4, 2)), r"size mismatch for 0\.weight"),
])
def test_a_checkpoint_that_does_not_fit_says_which_weight(tmp_path, other, reason):
    # torch's first line only says "Error(s) in loading state_dict for Sequential": the
    # reason given is the line after it, which names the weight
    from eclip.errors import EclipError

    small = torch.nn.Sequential(torch.nn.Linear(3, 2))
    save_checkpoint(tmp_path, small, torch.optim.AdamW(small.parameters()), {}, {"step": 0})
    with pytest.raises(EclipError, match=rf"checkpoint does not fit this model \({reason}"):
        load_checkpoint(tmp_path, other, None)


def test_optimizer_groups_without_their_parameters_are_refused(tmp_path):
    # groups that lack their "params" (a checkpoint written or edited by another tool) make
    # torch raise a KeyError: one error naming the file instead
    from safetensors.torch import load_file, save_file

    import eclip.checkpoint as ckpt
    from eclip.errors import EclipError

    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path, model, torch.optim.AdamW(model.parameters()), {}, {"step": 0})
    meta = ckpt.read_meta(tmp_path)
    meta["optimizer"]["param_groups"] = [{k: v for k, v in g.items() if k != "params"}
                                         for g in meta["optimizer"]["param_groups"]]
    path = tmp_path / ckpt.TENSORS
    save_file(load_file(path), str(path), metadata={ckpt.HEADER_KEY: json.dumps(meta)})
    other = torch.nn.Linear(3, 2)
    with pytest.raises(EclipError, match=rf"^{re.escape(str(path))}: the checkpoint's optimizer state does not "
                                         r"fit this optimizer \('params'\)$"):
        load_checkpoint(tmp_path, other, torch.optim.AdamW(other.parameters()))
