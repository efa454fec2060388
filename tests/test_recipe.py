"""The template recipe (``eclip/recipe.py``) on its own: the learning-rate schedule and the
model it builds for what the data dictates."""

import math

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
