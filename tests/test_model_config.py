"""The CLIP model's configs and presets: preset sizes, the expert switch, fields refused by
name (unknown, non-finite, out of range, below what the data needs), command-line spellings
and the JSON round trip."""

import json

import pytest
import torch
from model_support import micro

from eclip.model import PRESETS, ModelConfig, build_model, model_config


def test_expert_off_by_a_single_option():
    on = build_model(micro())
    off = build_model(micro(**{"expert.enabled": False}))
    assert off.expert is None
    assert not [n for n, _ in off.named_parameters() if n.startswith("expert.")]
    assert on.num_params() - off.num_params() == sum(p.numel() for p in on.expert.parameters()) > 0
    with pytest.raises(ValueError, match="expert.enabled"):
        off.encode_expert(torch.zeros(1, 3, 24, 24), torch.zeros(1, 1, 24, 24))


def vit_params(width: int, depth: int, patch: int, tokens: int) -> int:
    """Hand count of a ViT image tower without a classifier head (CLS + learned positions)."""
    block = 2 * 2 * width + (3 * width * width + 3 * width) + (width * width + width) \
        + (width * 4 * width + 4 * width) + (4 * width * width + width)
    return 3 * patch * patch * width + width + width + tokens * width + depth * block + 2 * width


@pytest.mark.parametrize("name,width,depth", [("vit-s16", 384, 12), ("vit-b16", 768, 12)])
def test_large_presets_build_on_meta(name, width, depth):
    cfg = model_config(name, vocab_size=30522)
    with torch.device("meta"):
        model = build_model(cfg)
    vision = sum(p.numel() for p in model.vision.parameters())
    assert vision == vit_params(width, depth, 16, 197)
    # the published sizes of headless ViT-S/16 and ViT-B/16: 21.67M and 85.80M
    assert vision == {"vit-s16": 21_665_664, "vit-b16": 85_798_656}[name]
    assert (cfg.vision.image_size, cfg.text.context_length) == (224, 77)
    if name == "vit-s16":
        assert (cfg.text.width, cfg.text.depth) == (768, 6)


def test_tiny_preset_size_and_data_fields():
    cfg = model_config("tiny", image_size=64, vocab_size=1500, context_length=32)
    assert (cfg.vision.image_size, cfg.text.vocab_size, cfg.text.context_length) == (64, 1500, 32)
    assert cfg.vision.patch_size == 16 and cfg.vision.pool == "cls"
    model = build_model(cfg)
    assert 1_000_000 <= model.num_params() <= 3_000_000
    assert PRESETS["tiny"].text.vocab_size == 2048  # the preset itself is not mutated


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="preset.*'huge'"):
        model_config("huge")
    with pytest.raises(ValueError, match="vision.nope"):
        model_config("tiny", **{"vision.nope": 1})
    with pytest.raises(ValueError, match="audio.width"):
        model_config("tiny", **{"audio.width": 1})
    with pytest.raises(ValueError, match="banana"):
        model_config("tiny", banana=1)
    with pytest.raises(ValueError, match="vision.depth"):
        model_config("tiny", **{"vision.depth": "deep"})
    with pytest.raises(ValueError, match="vision.depth"):
        model_config("tiny", **{"vision.depth": 2.5})
    with pytest.raises(ValueError, match="vision.heads"):
        model_config("tiny", **{"vision.heads": 5})
    with pytest.raises(ValueError, match="vision.image_size"):
        model_config("tiny", image_size=60)
    with pytest.raises(ValueError, match="text.pool"):
        model_config("tiny", **{"text.pool": "max"})
    with pytest.raises(ValueError, match="expert.probability"):
        model_config("tiny", **{"expert.probability": 1.5})
    # command-line strings are parsed by the field's type
    cfg = model_config("tiny", **{"vision.depth": "2", "expert.enabled": "false", "embed_dim": "64"})
    assert (cfg.vision.depth, cfg.expert.enabled, cfg.embed_dim) == (2, False, 64)


@pytest.mark.parametrize("key,value", [
    ("vision.mlp_ratio", "inf"), ("text.ln_eps", float("inf")), ("expert.min_sigma", "inf"),
    ("expert.weight", float("inf")), ("vision.std", "0.2,inf,0.2"), ("logit_scale_max", "inf"),
])
def test_non_finite_fields_are_refused_by_name(key, value):
    # "positive" passes inf: an infinite MLP ratio then failed in the tower's int(), an
    # infinite epsilon trained to nothing
    with pytest.raises(ValueError, match=rf"^{key}: must be finite"):
        model_config("tiny", **{key: value})


@pytest.mark.parametrize("key,value,message", [
    ("vision.image_size", 32, r"set by the data \(64\), got 32; it cannot be overridden"),
    ("vision.image_size", 128, r"set by the data \(64\), got 128"),
    ("text.context_length", "8", "the data needs at least 32, got 8"),
    ("text.vocab_size", 10, "the data needs at least 349, got 10"),
])
def test_the_data_dictated_fields_cannot_be_overridden_below_the_data(key, value, message):
    # a model built for other images, or for fewer token ids or positions than the data has,
    # failed at its first batch, with a traceback
    data = dict(image_size=64, vocab_size=349, context_length=32)
    with pytest.raises(ValueError, match=rf"^{key}: {message}"):
        model_config("tiny", **data, **{key: value})


def test_more_token_ids_or_positions_than_the_data_has_are_allowed():
    data = dict(image_size=64, vocab_size=349, context_length=32)
    cfg = model_config("tiny", **data, **{"text.vocab_size": 512, "text.context_length": "40",
                                          "vision.image_size": "64"})
    assert (cfg.vision.image_size, cfg.text.vocab_size, cfg.text.context_length) == (64, 512, 40)


def test_config_json_round_trip():
    cfg = micro(**{"vision.pos": "sincos"})
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    d = cfg.to_dict()
    d["vision"]["nope"] = 1
    with pytest.raises(ValueError, match="vision.nope"):
        ModelConfig.from_dict(d)


def test_a_mean_read_back_with_an_int_and_an_infinity_is_refused():
    d = micro().to_dict()
    d["vision"]["mean"] = [0, float("inf"), 0]  # as json.loads gives [0, Infinity, 0]
    with pytest.raises(ValueError, match=r"^vision.mean: must be finite"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("overrides,message", [
    # a zero ratio or epsilon passed "finite" and built a tower without an MLP, or one that
    # divides by a zero variance
    ({"vision.mlp_ratio": 0}, r"^vision.mlp_ratio: must be positive, got 0.0"),
    ({"text.ln_eps": 0}, r"^text.ln_eps: must be positive, got 0.0"),
    # checked before image_size % patch_size, which would divide by zero
    ({"vision.patch_size": 0}, r"^vision.patch_size: must be positive, got 0"),
    ({"vision.pool": "max"}, r"^vision.pool: must be 'cls' or 'mean', got 'max'"),
    # 2-D sin-cos positions split the width in four
    ({"vision.pos": "sincos", "vision.width": 6, "vision.heads": 2}, r"^vision.width: must be divisible by 4"),
    ({"vision.std": "0.2,0,0.2"}, r"^vision.std: needs 3 positive values"),
    # 0 is the padding id: a vocabulary of one has no real token
    ({"text.vocab_size": 1}, r"^text.vocab_size: must be at least 2, got 1"),
    ({"expert.width": 64, "expert.heads": 3}, r"^expert.heads: must be positive and divide expert.width=64, got 3"),
])
def test_bad_field_values_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        model_config("tiny", **overrides)


@pytest.mark.parametrize("overrides", [
    {"expert.weight": 0.0},  # the expert term scheduled but weighted off
    {"expert.probability": 0.0},  # never drawn
    {"expert.probability": 1.0},  # every step
])
def test_the_closed_ends_of_the_expert_ranges_are_accepted(overrides):
    cfg = model_config("tiny", **overrides)
    key, value = next(iter(overrides.items()))
    assert getattr(cfg.expert, key.split(".")[1]) == value


@pytest.mark.parametrize("value,want", [("1", True), ("0", False), ("TRUE", True), ("False", False),
                                        (True, True), (False, False)])
def test_boolean_fields_parse_command_line_spellings(value, want):
    assert model_config("tiny", **{"expert.enabled": value}).expert.enabled is want


@pytest.mark.parametrize("key,value", [
    # a bool is an int to Python: depth True built a one-block tower without a word
    ("vision.depth", True), ("vision.mlp_ratio", False), ("embed_dim", True),
    ("expert.enabled", 1),  # and an int is not a bool
])
def test_a_bool_is_not_a_number_and_a_number_is_not_a_bool(key, value):
    with pytest.raises(ValueError, match=rf"^{key}: expected (int|float|bool), got {value!r}"):
        model_config("tiny", **{key: value})


def test_config_read_back_with_an_unknown_top_level_field_is_refused_by_name():
    # as a checkpoint written by another version: one line naming the field, not a TypeError
    d = micro().to_dict()
    d["nope"] = 1
    with pytest.raises(ValueError, match=r"^nope: unknown model config field"):
        ModelConfig.from_dict(d)


def test_a_config_changed_after_construction_is_checked_again_when_built():
    # dataclass fields can be assigned without __post_init__: the model re-validates
    cfg = micro()
    cfg.vision.depth = 0
    with pytest.raises(ValueError, match=r"^vision.depth: must be positive, got 0"):
        build_model(cfg)
