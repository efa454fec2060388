"""One full training step (sample, forward, loss, backward, AdamW) through the training
loop's own pieces: fp32 eager against the template recipe's fast path (bf16 autocast +
compile + fused AdamW + fused loss on CUDA; on CPU the template runs fp32 eager, so the two
match, and their ratio, ~1, guards nothing: a slowdown in code both share moves both sides).
Preset ``tiny`` at 64 px on CPU, ``vit-s16`` at 224 px on CUDA; random data."""

import sys
from pathlib import Path

import pytest
import torch

from bench.conftest import DEVICE, describe, paired_ratio, peak_extra_bytes, timed
from eclip.data.device import DeviceData
from eclip.loop import ModelSpec, apply_overrides, load_recipe

sys.path.insert(0, str(Path(__file__).parent))
from train_check import random_cache  # noqa: E402

CUDA = DEVICE.type == "cuda"
PRESET, SIZE, CONTEXT, BATCH = ("vit-s16", 224, 77, 64) if CUDA else ("tiny", 64, 32, 64)
TEMPLATE = Path(__file__).resolve().parents[1] / "eclip" / "recipe.py"


@pytest.fixture(scope="module")
def cache():
    return random_cache(4 * BATCH, SIZE, CONTEXT, 1024)


def make_step(cache, impl):
    """A closure doing one training step of ``impl`` on its own model and optimizer."""
    recipe = load_recipe(TEMPLATE)
    extra = {"precision": "fp32", "compile": "false"} if impl == "fp32-eager" else {}
    apply_overrides(recipe.HPARAMS, {"preset": PRESET, "batch_size": str(BATCH), "expert": "false", **extra})
    data = DeviceData(cache, cache.split_images("train"), DEVICE, seed=0)
    spec = ModelSpec(vocab_size=1024, context_length=CONTEXT, phrase_length=8, image_size=SIZE, device=DEVICE)
    model = recipe.build_model(spec)
    opt = recipe.build_optimizer(model)

    def step():
        return recipe.train_step(model, opt, data.sample(BATCH), 0.5)["loss"]

    for _ in range(2):  # compilation and allocator warm-up stay out of the timing
        step()
    return step


@pytest.mark.parametrize("impl", ["fp32-eager", "template"])
def bench_train_step(benchmark, cache, impl):
    if CUDA:  # PyTorch's defaults for the eager baseline (TF32 off for matmuls)
        torch.backends.cuda.matmul.allow_tf32 = False
    # memory from before the model exists through its warm-up steps: with CUDA graphs
    # (reduce-overhead) the activations live in the graph's pool, allocated while recording,
    # so a window around a later step (a replay) would see almost nothing of them
    built = []
    peak = peak_extra_bytes(lambda: built.append(make_step(cache, impl)))  # None, uncalled, on a CPU
    step = built[0] if built else make_step(cache, impl)
    describe(benchmark, "step", impl, impl == "fp32-eager", preset=PRESET, batch=BATCH,
             samples_per_step=BATCH, peak_extra_bytes=peak)  # weights, optimizer state and activations
    loss = benchmark(timed(step))
    assert torch.isfinite(loss)
    if impl != "fp32-eager" and not benchmark.disabled:  # a smoke run times nothing: no second model built
        paired_ratio(benchmark, step, make_step(cache, "fp32-eager"), pairs=11)
