"""What makes a training run fast, and how its speed is reported: compiling the step or each
transformer block, bf16 autocast, the CUDA device made current, and the MFU of a run."""

import json

import pytest
import torch
from train_support import SMALL, run

from eclip import train


def test_a_cuda_device_with_an_index_becomes_current(monkeypatch):
    # Triton kernels and CUDA events go to the current device: cuda:N must be made current
    # (a bare "cuda" is; torch.cuda.set_device refuses a device without an index).
    from eclip.loop import use_device

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    for name in ("cpu", "cuda", "cuda:1"):
        use_device(torch.device(name))
    assert calls == [1]


@pytest.mark.slow
def test_block_compilation_trains_and_checkpoints_like_eager(train_cache, tmp_path, capsys):
    # compile_scope=blocks compiles each transformer block in place: the same losses as an
    # eager run up to compiled-kernel rounding, and checkpoints with the eager names.
    from torch._dynamo.utils import counters

    counters.clear()
    runs = {}
    for name, extra in (("eager", ["--compile=false"]), ("blocks", ["--compile=true", "--compile_scope=blocks"])):
        out = tmp_path / name
        rc, _, err = run(["--data", train_cache, "--out", out, "--steps", 3, *SMALL, *extra,
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
def test_block_compilation_with_the_expert_path_stays_under_the_recompile_limit(train_cache, tmp_path, capsys):
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
        rc, _, err = run(["--data", train_cache, "--out", tmp_path / "run", "--steps", 20, *SMALL, "--compile=true",
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


def test_bf16_autocast_step_with_the_expert_term(train_cache, tmp_path, capsys):
    # Under autocast the CLIP embeddings enter the loss in bf16 while the expert and phrase
    # embeddings leave autocast in fp32: the recipe must match them (caught on a GPU first).
    rc, _, err = run(["--data", train_cache, "--out", tmp_path / "bf16", "--steps", 3, "--precision=bf16", "--expert=true",
                      "--expert_probability=1.0", "--expert_cold_start=0.0", "--expert_ramp=0.0", *SMALL], capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "bf16" / "result.json").read_text())
    assert result["status"] == "ok" and result["steps"] == 3
    assert 0 < result["expert_samples"] <= result["samples"]  # the expert term did run


def test_mfu_counts_the_expert_path(train_cache, tmp_path, capsys, monkeypatch):
    from eclip.data.cache import load_cache
    from eclip.model import build_model, model_config

    monkeypatch.setattr(train, "peak_bf16_flops", lambda device: 1e12)  # a CPU has no table entry
    argv = ["--data", train_cache, "--steps", 4, "--expert_probability=1.0", "--expert_cold_start=0.0",
            "--expert_ramp=0.0", *SMALL]
    results = {}
    for name, on in (("off", "false"), ("on", "true")):
        rc, _, err = run([*argv, "--out", tmp_path / name, f"--expert={on}"], capsys)
        assert rc == 0, err
        results[name] = json.loads((tmp_path / name / "result.json").read_text())
    off, on = results["off"], results["on"]
    assert off["expert_samples"] == 0 and on["expert_samples"] > 0
    data = load_cache(train_cache)
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
