"""The template recipe (``eclip/recipe.py``) on its own: the learning-rate schedule and the
model it builds for what the data dictates."""

import math
import re

import pytest
import torch

from eclip import recipe


@pytest.mark.parametrize("warmup", [0.5, 0.05, 0.01, 0.001])
def test_the_warmup_climbs_to_the_peak_rate_and_never_past_it(warmup, monkeypatch):
    # The warm-up once added a fixed 1e-3 to the progress: just before its end the rate was
    # lr·(1 + 1e-3/warmup), twice the peak at warmup 0.001 (inside the search's range), and
    # then dropped back to lr.
    monkeypatch.setitem(recipe.HPARAMS, "lr", 2e-3)
    monkeypatch.setitem(recipe.HPARAMS, "warmup", warmup)
    monkeypatch.setitem(recipe.HPARAMS, "min_lr_ratio", 0.1)
    grid = [i / 10_000 for i in range(10_001)]
    rates = [recipe.lr_at(p) for p in grid]
    assert max(rates) <= 2e-3 * (1 + 1e-12)
    ramp = [r for p, r in zip(grid, rates, strict=True) if p < warmup]
    assert ramp[0] > 0 and all(b > a for a, b in zip(ramp, ramp[1:], strict=False))  # rising from the first step
    assert math.isclose(recipe.lr_at(warmup), 2e-3) and math.isclose(recipe.lr_at(1.0), 2e-4)
    assert abs(ramp[-1] - 2e-3) <= 2e-3 * 1e-4 / warmup * 1.01  # no jump at the end of the warm-up


def test_the_template_fits_phrases_longer_than_captions(monkeypatch):
    # A cache with --phrase-length above --context-length: the expert path encodes phrases
    # with the text tower, which once had room for captions only ("tokens: length 16
    # exceeds text.context_length 6", a traceback mid-run).
    from eclip.loop import ModelSpec

    spec = ModelSpec(vocab_size=50, context_length=6, phrase_length=16, image_size=32, device=torch.device("cpu"))
    # without the expert path no phrase is encoded: the captions' length (an override to it
    # was once refused as "the data needs at least 16")
    assert recipe.build_model(spec).cfg.text.context_length == 6
    monkeypatch.setitem(recipe.HPARAMS, "expert", True)
    model = recipe.build_model(spec)
    assert model.cfg.text.context_length == 16
    tokens = torch.randint(1, 50, (3, 16))
    emb = model.encode_text(tokens, torch.ones(3, 16, dtype=torch.bool))
    assert emb.shape[0] == 3 and torch.isfinite(emb).all()
    spec = ModelSpec(vocab_size=50, context_length=6, phrase_length=4, image_size=32, device=torch.device("cpu"))
    assert recipe.build_model(spec).cfg.text.context_length == 6  # captions the longer: as before


def _region_batch(b: int, size: int, vocab: int, length: int, seed: int):
    """A batch where every sample has a region (boxes, phrase), images of ``size`` px."""
    from eclip.batch import Batch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (b, length), generator=g)
    box = torch.tensor([0.1, 0.1, 0.6, 0.7]).expand(b, 1, 4).clone()
    return Batch(images=torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g),
                 tokens=tokens, mask=torch.ones(b, length, dtype=torch.bool), boxes=box,
                 box_mask=torch.ones(b, 1, dtype=torch.bool), phrase_tokens=tokens[:, :3].clone(),
                 phrase_mask=torch.ones(b, 3, dtype=torch.bool), has_region=torch.ones(b, dtype=torch.bool))


def test_the_expert_draws_of_a_lower_probability_are_a_subset(monkeypatch):
    # mixup once drew from the same generator as the per-step draw, on the steps the term
    # ran: every firing shifted the later draws, and p = 0.3 fired on other steps than a
    # subset of p = 0.5's (a paired comparison of two settings compared other steps)
    from eclip.loop import ModelSpec

    spec = ModelSpec(vocab_size=50, context_length=6, phrase_length=6, image_size=32, device=torch.device("cpu"))
    fired = {}
    for p in (0.5, 0.3):
        monkeypatch.setitem(recipe.HPARAMS, "expert", True)
        monkeypatch.setitem(recipe.HPARAMS, "expert_probability", p)
        monkeypatch.setitem(recipe.HPARAMS, "expert_cold_start", 0.0)
        monkeypatch.setitem(recipe.HPARAMS, "expert_ramp", 0.0)
        torch.manual_seed(0)
        model = recipe.build_model(spec)
        opt = recipe.build_optimizer(model)
        fired[p] = {step for step in range(24)
                    if "expert_samples" in recipe.train_step(model, opt, _region_batch(4, 32, 50, 6, step), step / 24)}
        state = recipe.recipe_state()
        assert set(state) == {"generator", "mix_generator"}  # both streams resume
    assert fired[0.3] and fired[0.3] < fired[0.5], fired


def test_the_decay_is_a_cosine_from_the_peak_down_to_the_floor(monkeypatch):
    monkeypatch.setitem(recipe.HPARAMS, "lr", 1e-3)
    monkeypatch.setitem(recipe.HPARAMS, "warmup", 0.2)
    monkeypatch.setitem(recipe.HPARAMS, "min_lr_ratio", 0.1)
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):  # share of the decay passed
        want = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
        assert math.isclose(recipe.lr_at(0.2 + 0.8 * t), want, rel_tol=1e-9), t


def _one_step(monkeypatch, progress=0.5, **hparams):
    """The template's model and optimizer after one train_step on a region batch."""
    from eclip.loop import ModelSpec

    for key, value in hparams.items():
        monkeypatch.setitem(recipe.HPARAMS, key, value)
    spec = ModelSpec(vocab_size=50, context_length=6, phrase_length=6, image_size=32, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = recipe.build_model(spec)
    opt = recipe.build_optimizer(model)
    return model, opt, recipe.train_step(model, opt, _region_batch(4, 32, 50, 6, 0), progress)


def test_train_step_sets_the_scheduled_rate_on_every_group(monkeypatch):
    _, opt, _ = _one_step(monkeypatch, progress=0.5)
    assert len(opt.param_groups) == 2  # decayed and exempt parameters
    assert [g["lr"] for g in opt.param_groups] == [recipe.lr_at(0.5)] * 2


def test_train_step_clips_the_global_gradient_norm(monkeypatch):
    model, _, out = _one_step(monkeypatch, grad_clip=1e-3)
    assert float(out["grad_norm"]) > 1e-2  # reported before clipping, far above the bound
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert float(total) <= 1e-3 * (1 + 1e-4)  # the optimizer stepped on the clipped gradients


def test_the_expert_term_enters_the_loss_with_its_scheduled_weight(monkeypatch):
    monkeypatch.setattr(recipe.expert_mod, "expert_weight", lambda progress, cfg, gen: 0.25)
    monkeypatch.setattr(recipe.expert_mod, "expert_loss",
                        lambda model, batch, img, txt, fn, cfg, gen: img.sum() * 0 + 3.0)
    _, _, out = _one_step(monkeypatch, expert=True)
    assert float(out["total_loss"]) == pytest.approx(float(out["loss"]) + 0.25 * 3.0, abs=1e-5)


def _spec():
    from eclip.loop import ModelSpec

    return ModelSpec(vocab_size=50, context_length=6, phrase_length=6, image_size=32, device=torch.device("cpu"))


@pytest.mark.parametrize("key,value,span", [
    ("lr", True, "(0, inf)"),  # a bool is an int to Python: lr True trained at 1.0
    ("min_lr_ratio", 2.0, "[0, 1]"),  # a floor above the peak: the "decay" climbed
    # AdamW refuses these itself, but in build_optimizer, outside the loop's one-line report
    ("weight_decay", -0.1, "[0, inf)"),
    ("beta2", 1.0, "[0, 1)"),
    ("grad_clip", -1.0, "[0, inf)"),  # a negative bound turned clipping off without a word
])
def test_bad_entries_are_refused_by_name_before_the_model_is_built(monkeypatch, key, value, span):
    monkeypatch.setitem(recipe.HPARAMS, key, value)
    with pytest.raises(ValueError, match=rf"^{key}: expected a finite number in {re.escape(span)}, got {value!r}$"):
        recipe.build_model(_spec())


@pytest.mark.parametrize("entry,field,value", [
    ("expert", "enabled", True), ("expert_weight", "weight", 0.3), ("expert_probability", "probability", 0.7),
    ("expert_cold_start", "cold_start", 0.2), ("expert_ramp", "ramp", 0.3),
])
def test_the_recipe_entries_of_the_expert_term_reach_the_model_config(monkeypatch, entry, field, value):
    # these model fields are refused under "model" (set by their own entry), so the entry is
    # the only way to set them: one that did not arrive was ignored without a word
    monkeypatch.setitem(recipe.HPARAMS, entry, value)
    assert getattr(recipe.build_model(_spec()).cfg.expert, field) == value


def test_the_optimizer_takes_its_settings_from_hparams(monkeypatch):
    settings = dict(lr=3e-4, beta1=0.8, beta2=0.95, eps=1e-7, weight_decay=0.2)  # none of them AdamW's default
    for key, value in settings.items():
        monkeypatch.setitem(recipe.HPARAMS, key, value)
    opt = recipe.build_optimizer(recipe.build_model(_spec()))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]  # matrices, then the exempt
    for g in opt.param_groups:
        assert (g["lr"], g["betas"], g["eps"]) == (3e-4, (0.8, 0.95), 1e-7)


def test_grad_clip_zero_turns_clipping_off(monkeypatch):
    # 0 means off: clip_grad_norm_ to 0 would zero every gradient and train on weight decay alone
    model, _, out = _one_step(monkeypatch, grad_clip=0.0)
    assert float(out["grad_norm"]) == 0.0  # not measured
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) > 1e-2


@pytest.mark.parametrize("regions,counted", [(1, 0), (2, 2), (4, 4)])
def test_expert_samples_counts_what_the_expert_path_encoded(monkeypatch, regions, counted):
    # with one region sample the term is an exact 0 that encodes nothing: the MFU counts none
    batch = _region_batch(4, 32, 50, 6, 0)
    batch.has_region[regions:] = False
    batch.box_mask[regions:] = False
    batch.phrase_mask[regions:] = False
    for key, value in dict(expert=True, expert_probability=1.0, expert_cold_start=0.0, expert_ramp=0.0).items():
        monkeypatch.setitem(recipe.HPARAMS, key, value)
    torch.manual_seed(0)
    model = recipe.build_model(_spec())
    out = recipe.train_step(model, recipe.build_optimizer(model), batch, 0.5)
    assert int(out["expert_samples"]) == counted


def test_expert_seed_seeds_two_separate_streams(monkeypatch):
    # the draws' stream from expert_seed, mixup's from expert_seed + MIX_SEED_OFFSET: another
    # seed gives other draws, and the two streams are not copies of each other
    states = {}
    for seed in (0, 1):
        monkeypatch.setitem(recipe.HPARAMS, "expert_seed", seed)
        recipe.build_model(_spec())
        states[seed] = recipe.recipe_state()
        assert torch.equal(states[seed]["generator"], torch.Generator().manual_seed(seed).get_state())
        assert not torch.equal(states[seed]["generator"], states[seed]["mix_generator"])
    assert not torch.equal(states[0]["generator"], states[1]["generator"])
    assert not torch.equal(states[0]["mix_generator"], states[1]["mix_generator"])


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32),
                                             ("auto", torch.float32)])
def test_precision_sets_the_dtype_the_loss_sees_on_the_cpu(monkeypatch, precision, dtype):
    # "bf16" autocasts on any device ("auto" only on CUDA): the embeddings reach the loss in it
    seen = []
    loss = recipe.kernels.contrastive_loss

    def spy(img, txt, scale, mode):
        seen.append(img.dtype)
        return loss(img, txt, scale, mode=mode)

    monkeypatch.setattr(recipe.kernels, "contrastive_loss", spy)
    _one_step(monkeypatch, precision=precision)
    assert seen == [dtype]
