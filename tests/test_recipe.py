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


def test_the_template_fits_phrases_longer_than_captions():
    # A cache with --phrase-length above --context-length: the expert path encodes phrases
    # with the text tower, which once had room for captions only ("tokens: length 16
    # exceeds text.context_length 6", a traceback mid-run).
    from eclip.loop import ModelSpec

    spec = ModelSpec(vocab_size=50, context_length=6, phrase_length=16, image_size=32, device=torch.device("cpu"))
    model = recipe.build_model(spec)
    assert model.cfg.text.context_length == 16
    tokens = torch.randint(1, 50, (3, 16))
    emb = model.encode_text(tokens, torch.ones(3, 16, dtype=torch.bool))
    assert emb.shape[0] == 3 and torch.isfinite(emb).all()
    spec = ModelSpec(vocab_size=50, context_length=6, phrase_length=4, image_size=32, device=torch.device("cpu"))
    assert recipe.build_model(spec).cfg.text.context_length == 6  # captions the longer: as before
