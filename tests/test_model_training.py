"""The CLIP model as training meets it: the initial scale of each weight, the logit-scale
contract (unclamped in forward, clamped in place, bounds checked), parameter groups and the
FLOP count."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from model_support import make_tokens, micro
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from eclip.model import build_model, model_config

# -- initialisation ---------------------------------------------------------------------------

# std of a standard normal truncated to [-2, 2] (trunc_normal_(std=s, a=-2s, b=2s) draws s
# times it): its variance is 1 - 2·2·φ(2) / (Φ(2) - Φ(-2)) ≈ 0.7737
TRUNC2_STD = math.sqrt(1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(2 / math.sqrt(2)))


def assert_drawn(t: torch.Tensor, std: float, rel: float, bound: float | None = None):
    """``t`` looks drawn at ``std`` (within ``rel``) and, truncated, lies within ``bound``."""
    t = t.detach().double()
    if bound is not None:
        assert t.abs().max() <= bound * (1 + 1e-6)
    assert t.std().item() == pytest.approx(std, rel=rel)


def test_initialisation_of_the_towers():
    # the scales training starts from: truncated normal 0.02 for every Linear/Conv2d with zero
    # biases, the residual outputs (attn.proj, fc2) shrunk by 1/sqrt(2·depth) so the stream's
    # variance does not grow with depth, small positions, CLS tokens and token embeddings.
    # Seeded, and the tolerances are several standard errors for each tensor's size.
    torch.manual_seed(0)
    cfg = model_config("tiny", image_size=64, vocab_size=1500, context_length=32)
    assert cfg.vision.pos == "learned" and cfg.vision.pool == cfg.text.pool == "cls"
    model = build_model(cfg)
    for tower, depth in ((model.vision, cfg.vision.depth), (model.text, cfg.text.depth)):
        residual = {id(m) for blk in tower.blocks for m in (blk.attn.proj, blk.fc2)}
        layers = [m for m in tower.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        assert len(residual) == 2 * depth and len(layers) == 4 * depth + (tower is model.vision)
        for m in layers:
            s = 0.02 / math.sqrt(2 * depth) if id(m) in residual else 0.02
            assert_drawn(m.weight, TRUNC2_STD * s, rel=0.05, bound=2 * s)
            assert not m.bias.any()
        assert_drawn(tower.cls_token, TRUNC2_STD * 0.02, rel=0.25, bound=0.04)
    assert_drawn(model.vision.pos_embed, TRUNC2_STD * 0.02, rel=0.1, bound=0.04)
    assert_drawn(model.text.pos_embed, TRUNC2_STD * 0.01, rel=0.1, bound=0.02)
    assert_drawn(model.text.token_embed.weight, 0.02, rel=0.05)  # plain normal, not nn.Embedding's N(0, 1)


def test_projection_initialisation_scales_with_each_towers_width():
    # both projections start at std width^-1/2 of their own tower (64 and 48 wide here,
    # 15% apart), so unit-variance features project to unit-variance embeddings; 256 × 64 and
    # 256 × 48 draws estimate the std to about 0.6%, so rel 0.05 is several standard errors
    torch.manual_seed(0)
    cfg = model_config("tiny", image_size=32, vocab_size=37, context_length=4, **{
        "vision.width": 64, "vision.depth": 1, "text.width": 48, "text.depth": 1, "embed_dim": 256,
        "expert.enabled": False})
    model = build_model(cfg)
    assert_drawn(model.image_proj.weight, 64**-0.5, rel=0.05)
    assert_drawn(model.text_proj.weight, 48**-0.5, rel=0.05)


# -- logit scale ------------------------------------------------------------------------------


def test_logit_scale_init_and_gradient_below_bound():
    model = build_model(micro())
    assert model.logit_scale.dim() == 0
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), abs=1e-6)
    torch.manual_seed(1)
    images = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8)
    tokens, mask = make_tokens([7, 2, 5, 3], context=7, vocab=37)
    img, txt, scale = model(images, tokens, mask)
    logits = scale * img @ txt.T
    F.cross_entropy(logits, torch.arange(4)).backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0


def test_no_clamp_in_forward_and_clamp_in_place():
    model = build_model(micro())
    with torch.no_grad():
        model.logit_scale.fill_(5.0)  # above ln 100 ≈ 4.605
    images = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    tokens, mask = make_tokens([3, 4], context=7, vocab=37)
    _, _, scale = model(images, tokens, mask)
    assert scale.item() == pytest.approx(math.exp(5.0), rel=1e-6)  # unclamped in forward
    scale.backward()
    assert model.logit_scale.grad.item() == pytest.approx(math.exp(5.0), rel=1e-6)
    param = model.logit_scale
    model.clamp_logit_scale_()
    assert model.logit_scale is param  # in place: the optimizer's reference stays valid
    assert model.logit_scale.item() == pytest.approx(math.log(100.0), abs=1e-6)
    assert model.logit_scale.item() <= math.log(100.0) + 1e-7
    with torch.no_grad():
        model.logit_scale.fill_(-0.5)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 0.0
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 2.0  # inside the bounds: untouched


@pytest.mark.parametrize("field,overrides", [
    ("logit_scale_max", {"logit_scale_max": -1.0}),
    ("logit_scale_max", {"logit_scale_min": 2.0, "logit_scale_max": 2.0, "logit_scale_init": 2.0}),
    ("logit_scale_init", {"logit_scale_init": 5.0}),
    ("logit_scale_init", {"logit_scale_init": float("nan")}),
    ("logit_scale_min", {"logit_scale_min": -1.0}),
])
def test_bad_logit_scale_bounds(field, overrides):
    with pytest.raises(ValueError, match=field):
        micro(**overrides)


# -- optimizer groups -------------------------------------------------------------------------


def test_param_groups_cover_every_parameter_once():
    model = build_model(micro(**{"vision.pool": "cls", "text.pool": "cls"}))
    groups = model.param_groups(0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    no_decay = {id(p) for p in groups[1]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    expected_no_decay = {
        n for n, p in model.named_parameters()
        if n.endswith(".bias") or n.endswith("pos_embed") or n.endswith("cls_token")
        or n == "logit_scale" or ".ln" in n
    }
    assert {names[i] for i in no_decay} == expected_no_decay
    assert {"logit_scale", "vision.pos_embed", "text.pos_embed", "vision.cls_token"} <= expected_no_decay
    torch.optim.AdamW(groups, lr=1e-3)  # accepted as is


# -- FLOPs ------------------------------------------------------------------------------------


def test_flops_per_sample_hand_count():
    cfg = model_config("tiny", image_size=16, vocab_size=11, context_length=5, **{
        "vision.patch_size": 8, "vision.width": 8, "vision.depth": 1, "vision.heads": 2,
        "vision.pool": "cls", "text.width": 4, "text.depth": 2, "text.heads": 1,
        "text.pool": "mean", "embed_dim": 6, "expert.enabled": False})
    model = build_model(cfg)
    # image: 4 patches of 3·8·8 = 192 values → width 8; 5 tokens with CLS
    patch = 2 * 4 * 192 * 8
    t, w = 5, 8
    vblock = 2 * t * w * 3 * w + 2 * t * t * w * 2 + 2 * t * w * w + 2 * t * w * 32 * 2
    # text: 5 tokens, width 4, hidden 16, two blocks
    t, w = 5, 4
    tblock = 2 * t * w * 3 * w + 2 * t * t * w * 2 + 2 * t * w * w + 2 * t * w * 16 * 2
    proj = 2 * 8 * 6 + 2 * 4 * 6
    assert model.flops_per_sample() == patch + vblock + 2 * tblock + proj == 25_552


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_flops_per_sample_matches_torch_flop_counter(pool):
    model = build_model(micro(**{"vision.pool": pool, "text.pool": pool}))
    images = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8)
    tokens, mask = make_tokens([7, 7, 7], context=7, vocab=37)
    heat = torch.rand(3, 1, 24, 24)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.encode_image(images)
        model.encode_text(tokens, mask)
    assert counter.get_total_flops() == 3 * model.flops_per_sample()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.encode_expert(images, heat)
        model.encode_text(tokens, mask)
    assert counter.get_total_flops() == 3 * model.expert_flops_per_sample()


@pytest.mark.parametrize("overrides,length", [
    # 24·2.99 = 71.76 and 20·2.99 = 59.8: the hidden width is rounded, in the block and its count
    ({"vision.mlp_ratio": 2.99, "text.mlp_ratio": 2.99}, 7),
    # captions trimmed below the context (train counts at the split's longest caption)
    ({}, 3),
])
def test_flops_per_sample_matches_torch_flop_counter_off_the_defaults(overrides, length):
    model = build_model(micro(**overrides))
    assert [blk.fc1.out_features for blk in (model.vision.blocks[0], model.text.blocks[0])] == (
        [72, 60] if overrides else [96, 80])
    images = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    tokens, mask = make_tokens([length, 1], context=length, vocab=37)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.encode_image(images)
        model.encode_text(tokens, mask)
    assert counter.get_total_flops() == 2 * model.flops_per_sample(length)
