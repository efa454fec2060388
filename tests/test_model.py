"""The CLIP model: configs and presets, both towers against a float64 brute-force reference,
padding invariance, the logit-scale contract, parameter groups and the FLOP count.

Tolerances: the model runs in float32 and is compared with a float64 re-implementation
that shares its weights; unit-norm outputs after a few layers agree to (fp32, atol 2e-5,
rtol 0) — a few ulps of accumulated rounding in sums of ~100 terms per layer.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from eclip.model import PRESETS, ModelConfig, build_model, model_config

ATOL = 2e-5  # fp32 model vs float64 reference on unit vectors (see module docstring)


def micro(**overrides) -> ModelConfig:
    """A very small config (fast on CPU) with a ragged shape: 24 px, patch 8 (9 patches),
    odd-sized text, widths not powers of two."""
    base = {"vision.patch_size": 8, "vision.pool": "mean", "text.pool": "mean",
            "vision.width": 24, "vision.depth": 2, "vision.heads": 3, "text.width": 20,
            "text.depth": 2, "text.heads": 2, "embed_dim": 12, "expert.width": 16,
            "expert.heads": 2}
    base.update(overrides)
    return model_config("tiny", image_size=24, vocab_size=37, context_length=7, **base)


def make_tokens(lengths: list[int], context: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (len(lengths), context), generator=g)
    mask = torch.arange(context)[None, :] < torch.tensor(lengths)[:, None]
    return tokens * mask, mask


# -- float64 reference of the towers (written from the math, sharing only the weights) ------


def ref_block(x, blk, mask=None):
    """Pre-norm block in float64: x + MHA(LN(x)) then x + MLP(LN(x)); mask [B, T] on keys."""
    d = lambda t: t.detach().to(torch.float64)

    def ln(t, m):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + m.eps) * d(m.weight) + d(m.bias)

    b, t, w = x.shape
    h = blk.attn.heads
    qkv = ln(x, blk.ln1) @ d(blk.attn.qkv.weight).T + d(blk.attn.qkv.bias)
    q, k, v = qkv.split(w, dim=-1)
    heads = lambda z: z.view(b, t, h, w // h).transpose(1, 2)
    s = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(w // h)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    y = (torch.softmax(s, -1) @ heads(v)).transpose(1, 2).reshape(b, t, w)
    x = x + y @ d(blk.attn.proj.weight).T + d(blk.attn.proj.bias)
    hid = ln(x, blk.ln2) @ d(blk.fc1.weight).T + d(blk.fc1.bias)
    hid = 0.5 * hid * (1 + torch.erf(hid / math.sqrt(2)))  # exact GELU
    return x + hid @ d(blk.fc2.weight).T + d(blk.fc2.bias)


def ref_layernorm(x, m):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + m.eps) * m.weight.double() + m.bias.double()


def ref_encode_image(model, images_u8):
    cfg = model.cfg.vision
    x = images_u8.double() / 255.0
    x = (x - torch.tensor(cfg.mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        cfg.std, dtype=torch.float64).view(1, 3, 1, 1)
    p = cfg.patch_size
    b, _, hgt, wid = x.shape
    # patches in row-major order, each flattened channel-major (c, dy, dx) like a conv kernel
    patches = x.unfold(2, p, p).unfold(3, p, p)  # [B, 3, gh, gw, p, p]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * p * p)
    wt = model.vision.patch_embed.weight.detach().double().reshape(cfg.width, -1)
    tok = patches @ wt.T + model.vision.patch_embed.bias.detach().double()
    if cfg.pool == "cls":
        tok = torch.cat([model.vision.cls_token.detach().double().expand(b, -1, -1), tok], 1)
    tok = tok + model.vision.pos_embed.detach().double()
    for blk in model.vision.blocks:
        tok = ref_block(tok, blk)
    tok = ref_layernorm(tok, model.vision.ln_post)
    feat = tok[:, 0] if cfg.pool == "cls" else tok.mean(1)
    emb = feat @ model.image_proj.weight.detach().double().T
    return emb / emb.norm(dim=-1, keepdim=True)


def ref_encode_text(model, tokens, mask):
    cfg = model.cfg.text
    b, length = tokens.shape
    x = model.text.token_embed.weight.detach().double()[tokens]
    keys = mask.clone()
    if cfg.pool == "cls":
        x = torch.cat([model.text.cls_token.detach().double().expand(b, -1, -1), x], 1)
        keys = torch.cat([torch.ones(b, 1, dtype=torch.bool), keys], 1)
    x = x + model.text.pos_embed.detach().double()[:, : x.shape[1]]
    for blk in model.text.blocks:
        x = ref_block(x, blk, keys)
    x = ref_layernorm(x, model.text.ln_post)
    if cfg.pool == "cls":
        feat = x[:, 0]
    else:
        feat = torch.stack([x[i, keys[i]].mean(0) for i in range(b)])
    emb = feat @ model.text_proj.weight.detach().double().T
    return emb / emb.norm(dim=-1, keepdim=True)


# -- towers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pool,pos", [("cls", "learned"), ("mean", "sincos")])
@pytest.mark.parametrize("batch", [1, 5])
def test_image_tower_matches_float64_reference(pool, pos, batch):
    torch.manual_seed(0)
    model = build_model(micro(**{"vision.pool": pool, "vision.pos": pos})).eval()
    images = torch.randint(0, 256, (batch, 3, 24, 24), dtype=torch.uint8)
    emb = model.encode_image(images)
    assert emb.shape == (batch, 12) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(batch), atol=1e-6, rtol=0)
    torch.testing.assert_close(emb.double(), ref_encode_image(model, images), atol=ATOL, rtol=0)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_text_tower_matches_float64_reference(pool):
    torch.manual_seed(0)
    model = build_model(micro(**{"text.pool": pool})).eval()
    tokens, mask = make_tokens([7, 1, 4, 6, 2], context=7, vocab=37)
    emb = model.encode_text(tokens, mask)
    assert emb.shape == (5, 12)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(emb.double(), ref_encode_text(model, tokens, mask), atol=ATOL, rtol=0)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_sincos_positions_match_formula(pool):
    model = build_model(micro(**{"vision.pos": "sincos", "vision.pool": pool}))
    pos = model.vision.pos_embed[0].double()  # [9 (+1), 24]: 3×3 grid, quarters of 6 channels
    if pool == "cls":  # the CLS token comes first and has no position: the patches follow it
        assert pos.shape[0] == 10 and not pos[0].any()
        pos = pos[1:]
    i = np.arange(6)
    omega = 1.0 / 10000 ** (i / 6)
    for n, (row, col) in enumerate((r, c) for r in range(3) for c in range(3)):
        want = np.concatenate([np.sin(row * omega), np.cos(row * omega),
                               np.sin(col * omega), np.cos(col * omega)])
        np.testing.assert_allclose(pos[n].numpy(), want, atol=1e-7, rtol=0)


def test_sincos_positions_are_not_saved():
    # fixed positions are recomputed from the config: a checkpoint holds only what training
    # learns (and one written before stays loadable, strictly)
    fixed = build_model(micro(**{"vision.pos": "sincos"}))
    learned = build_model(micro(**{"vision.pos": "learned"}))
    assert "vision.pos_embed" not in fixed.state_dict()
    assert "vision.pos_embed" in learned.state_dict()


def test_uint8_and_float_images_agree():
    torch.manual_seed(0)
    model = build_model(micro()).eval()
    images = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8)
    from_u8 = model.encode_image(images)
    from_float = model.encode_image(images.float() / 255.0)
    # identical arithmetic after the conversion: (fp32, atol 1e-6) is ulp-level slack only
    torch.testing.assert_close(from_u8, from_float, atol=1e-6, rtol=0)
    # and the uint8 path really rescales: feeding 0..255 floats is a different image
    assert not torch.allclose(from_u8, model.encode_image(images.float()), atol=1e-3)
    norm = model.normalize_images(images).double()
    mean = torch.tensor(model.cfg.vision.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(model.cfg.vision.std, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(norm, (images.double() / 255 - mean) / std, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_text_padding_invariance(pool):
    torch.manual_seed(0)
    model = build_model(micro(**{"text.pool": pool})).eval()
    tokens, mask = make_tokens([3, 6, 1, 5], context=6, vocab=37)
    base = model.encode_text(tokens, mask)
    # garbage ids at padded positions change nothing
    garbage = torch.where(mask, tokens, torch.randint(1, 37, tokens.shape))
    torch.testing.assert_close(model.encode_text(garbage, mask), base, atol=1e-6, rtol=0)
    # extra padding columns change nothing (SDPA reduces over more, masked, keys: ulp slack)
    padded = F.pad(tokens, (0, 1))
    padded_mask = F.pad(mask, (0, 1))
    torch.testing.assert_close(model.encode_text(padded, padded_mask), base, atol=1e-6, rtol=0)
    # while a real token does change the output (so the check above can fail)
    changed = tokens.clone()
    changed[0, 0] = (changed[0, 0] % 36) + 1
    assert (model.encode_text(changed, mask)[0] - base[0]).abs().max() > 1e-4


def test_text_mean_pool_is_the_mean_over_real_tokens():
    # encode_text normalises, which hides a per-row scale: check the tower's own features
    torch.manual_seed(0)
    model = build_model(micro(**{"text.pool": "mean"})).eval()
    tokens, mask = make_tokens([7, 1, 4], context=7, vocab=37)
    x = model.text.token_embed.weight.detach().double()[tokens] + model.text.pos_embed.detach().double()
    for blk in model.text.blocks:
        x = ref_block(x, blk, mask)
    x = ref_layernorm(x, model.text.ln_post)
    want = torch.stack([x[i, mask[i]].mean(0) for i in range(3)])
    torch.testing.assert_close(model.text(tokens, mask).double(), want, atol=1e-5, rtol=0)


def test_text_row_without_tokens_is_finite():
    model = build_model(micro(**{"text.pool": "mean"}))
    tokens, mask = make_tokens([0, 3], context=7, vocab=37)
    emb = model.encode_text(tokens, mask)
    assert torch.isfinite(emb).all()


def test_every_clip_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = build_model(micro())
    images = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8)
    tokens, mask = make_tokens([7, 2, 5, 3], context=7, vocab=37)
    img, txt, scale = model(images, tokens, mask)
    logits = scale * img @ txt.T
    y = torch.arange(4)
    ((F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2).backward()
    for name, p in model.named_parameters():
        if name.startswith("expert."):
            assert p.grad is None, name  # the plain CLIP loss never touches the expert path
        elif name == "text.token_embed.weight":
            assert p.grad[tokens[mask]].abs().sum() > 0
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_inputs_raise():
    model = build_model(micro())
    with pytest.raises(ValueError, match="images"):
        model.encode_image(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    tokens, mask = make_tokens([8], context=8, vocab=37)
    with pytest.raises(ValueError, match="context_length"):
        model.encode_text(tokens, mask)


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


# -- optimizer groups, presets, config errors -------------------------------------------------


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
