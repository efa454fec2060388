"""The CLIP model's towers: both against a float64 brute-force reference, fixed sin-cos
positions, uint8 and float images, padding invariance, gradients and bad inputs.

Tolerances: the model runs in float32 and is compared with a float64 re-implementation
that shares its weights; unit-norm outputs after a few layers agree to (fp32, atol 2e-5,
rtol 0) — a few ulps of accumulated rounding in sums of ~100 terms per layer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_support import make_tokens, micro

from eclip.model import build_model

ATOL = 2e-5  # fp32 model vs float64 reference on unit vectors (see module docstring)


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
