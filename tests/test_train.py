"""``python -m eclip.train`` and the one training loop, on a small built-in dataset, on the CPU."""

import json

import pytest
import torch

from eclip import prepare, train
from eclip.checkpoint import load_checkpoint, save_checkpoint
from eclip.loop import load_recipe

# A model small enough that a test run takes seconds on 2 cores.
SMALL = ["--model.vision.patch_size=16", "--model.vision.width=64", "--model.vision.depth=2",
         "--model.text.width=64", "--model.text.depth=1", "--model.embed_dim=64",
         "--model.expert.width=32", "--model.vision.pool=cls", "--model.text.pool=cls",
         "--batch_size=64", "--log-every=2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "syn"
    rc = prepare.main(["--dataset", "synthetic", "--num-train", "2000", "--num-val", "100", "--num-test", "60",
                       "--out", str(out), "--workers", "1"])
    assert rc == 0
    return out


def recipe_with(tmp_path, extra: str):
    """The template recipe plus ``extra`` code appended (to wrap train_step)."""
    path = tmp_path / "recipe.py"
    path.write_text(train.TEMPLATE.read_text() + "\n\n" + extra)
    return path


def recipe_at_call(tmp_path, before: str = "", after: str = "", prelude: str = ""):
    """The template recipe whose train_step counts its calls in ``_calls[0]`` and runs the
    code ``before`` ahead of the real step and ``after`` behind it (the step's metrics are
    ``out``), both written as at the function's top level, e.g.
    ``"if _calls[0] == 5:\\n    raise KeyboardInterrupt"``; ``prelude`` goes at module level."""
    def indent(code):
        return "".join(f"    {line}\n" for line in code.splitlines())
    return recipe_with(tmp_path, (
        f"{prelude}_base_train_step = train_step\n_calls = [0]\n\n"
        "def train_step(model, optimizer, batch, progress):\n"
        "    _calls[0] += 1\n"
        f"{indent(before)}"
        "    out = _base_train_step(model, optimizer, batch, progress)\n"
        f"{indent(after)}"
        "    return out\n"))


def run(argv, capsys):
    rc = train.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_short_run_learns(cache, tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = run(["--data", cache, "--out", out, "--steps", 200, *SMALL], capsys)
    assert rc == 0, err
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["steps"] == 200 and result["eval_split"] == "val"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
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


@pytest.mark.parametrize("nan_step", [None, 3, 5])
def test_out_of_memory_mid_run_keeps_the_row_in_flight(cache, tmp_path, capsys, nan_step):
    # An OOM at step 6 (--log-every=2: rows pushed at steps 1, 2, 4): the row of step 4, still
    # in flight, is logged, and a NaN not yet read back — in that row (step 3) or after it
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
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [1, 2, 4]


def test_a_cuda_device_with_an_index_becomes_current(monkeypatch):
    # Triton kernels and CUDA events go to the current device: cuda:N must be made current
    # (a bare "cuda" is; torch.cuda.set_device refuses a device without an index).
    from eclip.loop import use_device

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    for name in ("cpu", "cuda", "cuda:1"):
        use_device(torch.device(name))
    assert calls == [1]


def test_checkpoint_round_trip(cache, tmp_path):
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


@pytest.mark.parametrize("argv,message", [
    (["--steps", "5", "--bogus=1"], "--bogus: unknown training option"),
    (["--steps", "5", "--lr=fast"], "--lr=fast: expected float"),
    (["--steps", "5", "--preset", "huge"], "preset: unknown preset 'huge'"),
    (["--steps", "5", "--model.vision.nope=3"], "vision.nope: unknown model config field"),
    (["--steps", "5", "--budget-s", "3"], "exactly one of --budget-s or --steps"),
    (["--steps", "5", "stray"], "unrecognised argument 'stray'"),
    (["--steps", "5", "--resume"], "no checkpoint here"),
    (["--steps", "5", "--compile_mode=fastest"], "compile_mode: expected one of default, reduce-overhead,"),
    (["--steps", "5", "--compile_scope=all"], "compile_scope: expected one of step, blocks, got 'all'"),
    (["--steps", "5", "--compile_scope=blocks", "--compile_mode=reduce-overhead"],
     "compile_scope: 'blocks' runs eager code between the blocks"),
    (["--steps", "5", "--batch_size=0"], "recipe: batch_size: expected an int >= 1, got 0"),
    (["--steps", "5", "--crop_scale=0"], "recipe: crop_scale: expected a number in (0, 1], got 0.0"),
    (["--steps", "5", "--lr=-1"], "recipe: lr: expected a finite number in (0, inf), got -1.0"),
    (["--steps", "5", "--lr=nan"], "recipe: lr: expected a finite number"),
    (["--steps", "5", "--beta1=1.5"], "recipe: beta1: expected a finite number in [0, 1), got 1.5"),
    (["--steps", "5", "--eps=0"], "recipe: eps: expected a finite number in (0, inf)"),
    (["--steps", "5", "--warmup=2"], "recipe: warmup: expected a finite number in [0, 1)"),
    (["--steps", "5", "--precision=fp16"], "recipe: precision: expected one of auto, bf16, fp32, got 'fp16'"),
    (["--steps", "5", "--compile=maybe"], "recipe: compile: expected one of auto, True, False, got 'maybe'"),
    (["--steps", "5", "--loss_mode=slow"], "recipe: loss_mode: expected one of auto, lean"),
    (["--budget-s", "nan"], "--budget-s and --steps must be positive (and the budget finite)"),
    (["--budget-s", "inf"], "--budget-s and --steps must be positive (and the budget finite)"),
    (["--steps", "5", "--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N"),
    (["--steps", "5", "--model=abc"], "--model=abc: model is a group of settings; set one with --model.<field>=value"),
    # a field the recipe sets from its own entry would be overwritten without a word
    (["--steps", "5", "--model.expert.enabled=true"],
     "recipe: model.expert.enabled: set by the recipe entry 'expert' (use --expert=...)"),
    (["--steps", "5", "--folds", "0"], "--folds 0: this cache has 3 folds, so expected --folds 3"),
    # two of three folds would train on a fold that is never validated: not cross-validation
    (["--steps", "5", "--folds", "2"], "--folds 2: this cache has 3 folds, so expected --folds 3 "
                                       "(prepare --folds 2 makes a cache with 2)"),
])
def test_bad_options_exit_2_with_one_line(cache, tmp_path, capsys, argv, message):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text("kept\n")  # a previous run's log
    rc, _, err = run(["--data", cache, "--out", out, *argv], capsys)
    assert rc == 2 and err.startswith("train: error: ") and message in err, err
    assert err.strip().count("\n") == 0
    assert (out / "metrics.jsonl").read_text() == "kept\n"  # nothing of it lost


@pytest.mark.parametrize("make", ["file", "corrupt_checkpoint", "steps_done"])
def test_unusable_out_or_checkpoint_is_one_line(cache, tmp_path, capsys, make):
    if make == "file":  # --out names a file
        out = tmp_path / "afile"
        out.write_text("x")
        argv, message = ["--steps", "2"], "afile"
    elif make == "steps_done":  # resuming a 2-step checkpoint "up to" step 2
        out = tmp_path / "run"
        rc, _, err = run(["--data", cache, "--out", out, "--steps", "2", *SMALL], capsys)
        assert rc == 0, err
        argv, message = ["--steps", "2", "--resume"], "--steps 2: the checkpoint in"
    else:  # a checkpoint whose weights file is cut short
        out = tmp_path / "run"
        rc, _, err = run(["--data", cache, "--out", out, "--steps", "2", *SMALL], capsys)
        assert rc == 0, err
        weights = out / "checkpoint.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        argv, message = ["--steps", "4", "--resume"], "checkpoint.safetensors: unreadable"
    rc, _, err = run(["--data", cache, "--out", out, *argv, *SMALL], capsys)
    assert rc == 2 and err.startswith("train: error: ") and message in err, err
    assert err.strip().count("\n") == 0


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


def test_overrides_that_prefix_an_option_are_overrides(cache, tmp_path, capsys):
    # --compile is a prefix of --compile-cache: argparse's abbreviations once swallowed it
    out = tmp_path / "run"
    rc, _, err = run(["--data", cache, "--out", out, "--steps", 1, *SMALL, "--compile=false", "--seed", 3], capsys)
    assert rc == 0, err
    result = json.loads((out / "result.json").read_text())
    assert result["hparams"]["compile"] is False and result["seed"] == 3
    rc, _, err = run(["--data", cache, "--out", out, "--steps", 1, "--see=3"], capsys)
    assert rc == 2 and "--see: unknown training option" in err, err


def test_missing_or_stale_cache(tmp_path, capsys, cache):
    rc, _, err = run(["--data", tmp_path / "none", "--out", tmp_path / "o", "--steps", 1], capsys)
    assert rc == 2 and "no such cache directory" in err
    out = tmp_path / "run"
    assert run(["--data", cache, "--out", out, "--steps", 2, *SMALL], capsys)[0] == 0
    meta = json.loads((out / "checkpoint.json").read_text())
    (out / "checkpoint.json").write_text(json.dumps(dict(meta, cache_fingerprint="other")))
    rc, _, err = run(["--data", cache, "--out", out, "--steps", 4, "--resume", *SMALL], capsys)
    assert rc == 2 and "trained on another cache" in err


@pytest.mark.parametrize("sizes_recorded", [True, False])
def test_damaged_cache_file_is_one_line(tmp_path, capsys, cache, sizes_recorded):
    # A cache file cut short: caught by its recorded size, or (a cache from before sizes were
    # recorded) when safetensors cannot read it; one line naming the file either way.
    import shutil

    damaged = tmp_path / "cache"
    shutil.copytree(cache, damaged)
    ann = damaged / "annotations.safetensors"
    ann.write_bytes(ann.read_bytes()[:500])
    manifest = json.loads((damaged / "manifest.json").read_text())
    assert "annotations.safetensors" in manifest["sizes"]
    if not sizes_recorded:
        del manifest["sizes"]
        (damaged / "manifest.json").write_text(json.dumps(manifest))
    rc, _, err = run(["--data", damaged, "--out", tmp_path / "o", "--steps", 1], capsys)
    message = "has another size than when it was built" if sizes_recorded else "unreadable"
    assert rc == 2 and "annotations.safetensors" in err and message in err, err
    assert err.strip().count("\n") == 0
    if sizes_recorded:  # and prepare rebuilds it instead of reusing it
        from eclip.data.cache import is_current

        assert not is_current(damaged, manifest["fingerprint"])


def test_folds_and_final(cache, tmp_path, capsys):
    rc, stdout, err = run(["--data", cache, "--out", tmp_path / "cv", "--steps", 3, "--folds", 3, *SMALL], capsys)
    assert rc == 0, err
    r = json.loads((tmp_path / "cv" / "result.json").read_text())
    assert [f["status"] for f in r["folds"]] == ["ok", "ok", "ok"]
    ranks = [f["val_mean_rank"] for f in r["folds"]]
    assert r["val_mean_rank"] == pytest.approx(sum(ranks) / 3) and "folds_mean_rank:" in stdout
    # each train+val image is validated exactly once over the folds, and never trained on then
    from eclip.data.cache import load_cache
    n_trainval = int((load_cache(cache).split <= 1).sum())
    folds = [json.loads((tmp_path / "cv" / f"fold{k}" / "result.json").read_text()) for k in range(3)]
    assert sum(f["metrics"]["n_images"] for f in folds) == n_trainval
    for f in folds:
        meta = json.loads((tmp_path / "cv" / f["eval_split"] / "checkpoint.json").read_text())
        assert meta["train_rows"] + f["metrics"]["n_images"] == n_trainval
    rc, _, err = run(["--data", cache, "--out", tmp_path / "fin", "--steps", 3, "--final", *SMALL], capsys)
    assert rc == 0, err
    r = json.loads((tmp_path / "fin" / "result.json").read_text())
    assert r["eval_split"] == "test" and r["metrics"]["n_images"] == 60 and r["test_mean_rank"] == r["val_mean_rank"]


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


def test_resume_refuses_another_mode(cache, tmp_path, capsys):
    out = tmp_path / "fin"
    assert run(["--data", cache, "--out", out, "--steps", 2, "--final", *SMALL], capsys)[0] == 0
    rc, _, err = run(["--data", cache, "--out", out, "--steps", 4, "--resume", *SMALL], capsys)
    assert rc == 2 and "checkpoint trained on 2100 images for 'test'; this run has 2000 for 'val'" in err, err
    # weights of the same shapes from another model config (4 heads, not 8) are refused too
    rc, _, err = run(["--data", cache, "--out", out, "--steps", 4, "--final", "--resume", *SMALL,
                      "--model.vision.heads=8"], capsys)
    assert rc == 2 and "checkpoint has model vision.heads = 4, this run 8" in err, err
    assert err.strip().count("\n") == 0
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 2  # untouched
    # the expert term's schedule shapes no weight: a resume may change it, as it may the lr
    rc, _, err = run(["--data", cache, "--out", out, "--steps", 3, "--final", "--resume", *SMALL,
                      "--expert_probability=0.3", "--lr=5e-4"], capsys)
    assert rc == 0, err
    rc, _, err = run(["--data", cache, "--out", out, "--steps", 2, "--log-every", 0], capsys)
    assert rc == 2 and "--log-every 0: must be at least 1" in err


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


def test_refused_resume_creates_nothing(cache, tmp_path, capsys):
    out = tmp_path / "never-trained"
    rc, _, err = run(["--data", cache, "--out", out, "--steps", 2, "--resume"], capsys)
    assert rc == 2 and "no checkpoint here" in err, err
    assert not out.exists()


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


def test_first_ctrl_c_finishes_the_step_and_saves(cache, tmp_path, capsys):
    # A real SIGINT in the middle of step 5: the handler lets the step finish, then the loop
    # stops with a checkpoint of 5 steps and a result with status interrupted.
    stopper = recipe_at_call(tmp_path, prelude="import os as _os, signal as _signal\n",
                             before="if _calls[0] == 5:\n    _os.kill(_os.getpid(), _signal.SIGINT)")
    out = tmp_path / "run"
    rc, stdout, err = run(["--data", cache, "--out", out, "--steps", 20, "--recipe", stopper, *SMALL], capsys)
    assert rc == 130 and "status:         interrupted" in stdout, err
    assert "stopping after this step" in err
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 5
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "interrupted" and result["steps"] == 5 and result["val_mean_rank"] is None


def test_ctrl_c_during_the_evaluation_keeps_the_checkpoint_and_writes_a_result(cache, tmp_path, capsys,
                                                                              monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "evaluate_split", interrupted)
    out = tmp_path / "run"
    rc, stdout, err = run(["--data", cache, "--out", out, "--steps", 3, *SMALL], capsys)
    assert rc == 130 and "status:         interrupted" in stdout and "during the evaluation" in err
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 3
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "interrupted" and result["steps"] == 3 and result["metrics"] is None


def test_a_recipe_that_fails_to_import_names_its_line(cache, tmp_path, capsys):
    bad = recipe_with(tmp_path, "x = undefined_name\n")
    line = bad.read_text().splitlines().index("x = undefined_name") + 1
    rc, _, err = run(["--data", cache, "--out", tmp_path / "o", "--steps", 1, "--recipe", bad], capsys)
    assert rc == 2 and err.strip().count("\n") == 0, err
    assert f"recipe.py:{line}: recipe failed to import (NameError: name 'undefined_name' is not defined)" in err
    bad = recipe_with(tmp_path, "raise ValueError('first line\\nsecond line')\n")
    rc, _, err = run(["--data", cache, "--out", tmp_path / "o", "--steps", 1, "--recipe", bad], capsys)
    assert rc == 2 and err.strip().count("\n") == 0 and "(ValueError: first line)" in err, err
    # memory exhausted while importing is an out-of-memory run (status oom, exit 1), not bad input
    bad = recipe_with(tmp_path, "raise MemoryError\n")
    rc, _, err = run(["--data", cache, "--out", tmp_path / "o", "--steps", 1, "--recipe", bad], capsys)
    assert rc == 1 and json.loads((tmp_path / "o" / "result.json").read_text())["status"] == "oom", err


def test_a_cuda_index_beyond_the_devices_is_one_line(monkeypatch):
    from eclip.errors import EclipError
    from eclip.loop import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(EclipError, match=r"--device cuda:7: this machine has 1 CUDA device \(cuda:0 to cuda:0\)"):
        pick_device("cuda:7")


def test_compile_cache_option_beats_an_inherited_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inherited"))
    rc, _, err = run(["--data", tmp_path / "none", "--out", tmp_path / "o", "--steps", 1,
                      "--compile-cache", tmp_path / "mine"], capsys)
    assert rc == 2 and "no such cache directory" in err  # stops at the data, after the cache is set
    import os
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "mine").resolve())
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inherited"))
    run(["--data", tmp_path / "none", "--out", tmp_path / "o", "--steps", 1], capsys)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inherited")  # no option: kept
