"""The eCLIP expert path: heatmaps against a NumPy float64 loop, the heatmap processor's
pixel layout, Beta mixup, the schedule and seeded draw, and the expert contrastive term.

Tolerances: heatmaps are float32 exponentials of values computed in float32 versus a
float64 reference, (fp32, atol 1e-6, rtol 0) — values lie in [0, 1], a few ulps apart.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_support import micro

from eclip.batch import Batch
from eclip.expert import (
    HeatmapProcessor,
    draw_expert,
    expert_loss,
    expert_schedule,
    expert_weight,
    first_of_each,
    make_heatmaps,
    mixup,
)
from eclip.model import ExpertConfig, build_model


def ref_heatmaps(boxes, box_mask, size, min_sigma, sigma_scale=0.5):
    """Per-pixel, per-box float64 loop written from the definition."""
    boxes = np.asarray(boxes, dtype=np.float64)
    out = np.zeros((boxes.shape[0], 1, size, size))
    for b in range(boxes.shape[0]):
        for k in range(boxes.shape[1]):
            if not box_mask[b][k]:
                continue
            x1, y1, x2, y2 = boxes[b, k]
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            sx = max(sigma_scale * abs(x2 - x1) / 2, min_sigma / size)
            sy = max(sigma_scale * abs(y2 - y1) / 2, min_sigma / size)
            for i in range(size):
                for j in range(size):
                    x, y = (j + 0.5) / size, (i + 0.5) / size
                    v = math.exp(-((x - cx) ** 2) / (2 * sx**2) - (y - cy) ** 2 / (2 * sy**2))
                    out[b, 0, i, j] = max(out[b, 0, i, j], v)
    return out


@pytest.mark.parametrize("batch,k,size", [(3, 2, 17), (1, 4, 8), (4, 1, 24)])
def test_heatmaps_match_float64_loop(batch, k, size):
    g = torch.Generator().manual_seed(batch * 10 + k)
    corners = torch.rand(batch, k, 2, 2, generator=g)
    boxes = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values], dim=-1)
    boxes[0, 0] = torch.tensor([0.3, 0.3, 0.3, 0.3])  # degenerate box: min_sigma only
    box_mask = torch.rand(batch, k, generator=g) > 0.3
    box_mask[0, 0] = True
    heat = make_heatmaps(boxes, box_mask, size, min_sigma=1.5)
    assert heat.shape == (batch, 1, size, size) and heat.dtype == torch.float32
    want = ref_heatmaps(boxes.numpy(), box_mask.numpy(), size, 1.5)
    np.testing.assert_allclose(heat.numpy(), want, atol=1e-6, rtol=0)


def test_heatmap_peak_far_field_merge_and_empty():
    size = 32
    # centre (0.515625, 0.265625) is the centre of pixel (row 8, col 16)
    a = torch.tensor([0.415625, 0.165625, 0.615625, 0.365625])
    b = torch.tensor([0.05, 0.6, 0.45, 0.95])
    boxes = torch.stack([torch.stack([a, b]), torch.stack([a, b])])  # [2, 2, 4]
    mask = torch.tensor([[True, True], [False, False]])
    both = make_heatmaps(boxes, mask, size, min_sigma=1.0)
    only_a = make_heatmaps(boxes[:1, :1], mask[:1, :1], size, min_sigma=1.0)
    only_b = make_heatmaps(boxes[:1, 1:], mask[:1, 1:], size, min_sigma=1.0)
    assert only_a[0, 0, 8, 16].item() == pytest.approx(1.0, abs=1e-6)
    assert only_a[0, 0].max().item() == pytest.approx(1.0, abs=1e-6)
    assert only_a[0, 0, 31, 0].item() < 1e-6  # far corner: σ = 0.05, > 10σ away
    torch.testing.assert_close(both[:1], torch.maximum(only_a, only_b), atol=0, rtol=0)
    assert both[1].abs().max().item() == 0.0  # no boxes (garbage coordinates masked out)


def test_heatmap_bad_inputs():
    boxes = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="box_mask"):
        make_heatmaps(boxes, torch.ones(2, 2, dtype=torch.bool), 8, 1.0)
    with pytest.raises(ValueError, match="min_sigma"):
        make_heatmaps(boxes, torch.ones(2, 3, dtype=torch.bool), 8, 0.0)
    with pytest.raises(ValueError, match="boxes"):
        make_heatmaps(torch.zeros(2, 4), torch.ones(2, dtype=torch.bool), 8, 1.0)


def test_heatmap_processor_pixel_layout():
    """With the pixel map's weights zeroed, its bias alone lands in every patch at the
    (channel, row, column) it names: checks the unpatchify order."""
    proc = HeatmapProcessor(image_size=12, patch_size=4, width=8, heads=2, eps=1e-6)
    with torch.no_grad():
        proc.to_pixels.weight.zero_()
        proc.to_pixels.bias.copy_(torch.arange(48, dtype=torch.float32))
    x = torch.randn(2, 3, 12, 12)
    delta = proc(x, torch.rand(2, 1, 12, 12)) - x
    want = torch.arange(48, dtype=torch.float32).view(3, 4, 4).repeat(1, 3, 3)
    torch.testing.assert_close(delta, want.expand(2, -1, -1, -1), atol=1e-5, rtol=0)


def test_expert_embedding_depends_on_heatmap():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    images = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    h1 = torch.zeros(2, 1, 24, 24)
    h2 = h1.clone()
    h2[:, :, :8, :8] = 1.0
    e1, e2 = model.encode_expert(images, h1), model.encode_expert(images, h2)
    assert e1.shape == (2, 12)
    torch.testing.assert_close(e1.norm(dim=-1), torch.ones(2), atol=1e-6, rtol=0)
    assert (e1 - e2).abs().max() > 1e-5


# -- mixup, schedule, draw --------------------------------------------------------------------


def beta_cdf(x, alpha):
    """Closed-form CDFs of Beta(α, α) for the α we test."""
    return {0.5: 2 / np.pi * np.arcsin(np.sqrt(x)), 1.0: x, 2.0: 3 * x**2 - 2 * x**3}[alpha]


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_mixup_lambda_is_beta_and_output_normalised(alpha):
    n = 4000
    a = F.normalize(torch.randn(n, 6, generator=torch.Generator().manual_seed(1)), dim=-1)
    b = F.normalize(torch.randn(n, 6, generator=torch.Generator().manual_seed(2)), dim=-1)
    mixed, lam = mixup(a, b, alpha, torch.Generator().manual_seed(3))
    assert lam.shape == (n,) and mixed.shape == (n, 6)
    lam_np = np.sort(lam.double().numpy())
    assert ((lam_np >= 0) & (lam_np <= 1)).all()
    # Kolmogorov–Smirnov distance to the exact CDF, below the 1% critical value 1.63/√n
    ecdf_hi = np.arange(1, n + 1) / n
    ks = max(np.abs(ecdf_hi - beta_cdf(lam_np, alpha)).max(),
             np.abs(ecdf_hi - 1 / n - beta_cdf(lam_np, alpha)).max())
    assert ks < 1.63 / math.sqrt(n)
    want = lam.double()[:, None] * a.double() + (1 - lam.double()[:, None]) * b.double()
    want = want / want.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(mixed.double(), want, atol=1e-6, rtol=0)
    # the same seed gives the same λ, another seed another
    _, again = mixup(a, b, alpha, torch.Generator().manual_seed(3))
    _, other = mixup(a, b, alpha, torch.Generator().manual_seed(4))
    assert torch.equal(lam, again) and not torch.equal(lam, other)


def test_mixup_bad_inputs():
    a = torch.randn(3, 4)
    with pytest.raises(ValueError, match="alpha"):
        mixup(a, a, 0.0, torch.Generator())
    with pytest.raises(ValueError, match="generator"):
        mixup(a, a, 1.0, None)


def test_schedule_cold_start_ramp_cool_down():
    cfg = ExpertConfig(weight=0.8, probability=0.3, cold_start=0.2, ramp=0.2, cool_down=0.25)
    at = lambda t: expert_schedule(t, cfg)
    assert at(0.0) == (0.0, 0.0) and at(0.19) == (0.0, 0.0)
    assert at(0.3)[0] == pytest.approx(0.4) and at(0.3)[1] == 0.3  # half-way up the ramp
    assert at(0.5) == (pytest.approx(0.8), 0.3) and at(0.75) == (pytest.approx(0.8), 0.3)
    assert at(0.875)[0] == pytest.approx(0.4)  # half-way down the cool-down
    assert at(1.0) == (0.0, 0.0)
    assert expert_schedule(0.5, ExpertConfig(weight=0.5, probability=0.7)) == (0.5, 0.7)
    assert expert_schedule(0.5, ExpertConfig(enabled=False)) == (0.0, 0.0)
    # phases that fill training exactly, though their binary sum is 1 + 1.1e-16, are valid
    assert ExpertConfig(cold_start=0.33, ramp=0.56, cool_down=0.11).cool_down == 0.11
    with pytest.raises(ValueError, match="expert.cool_down: .* must not exceed 1"):
        ExpertConfig(cold_start=0.5, ramp=0.4, cool_down=0.11)


def test_seeded_draw_frequency_and_stream_alignment():
    g = torch.Generator().manual_seed(7)
    hits = sum(draw_expert(0.3, g) for _ in range(4000))
    assert abs(hits / 4000 - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 4000)  # 5σ binomial band
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert draw_expert(0.0, g1) is False and draw_expert(1.0, g2) is True
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # one draw each
    g3, g4 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    cfg = ExpertConfig(weight=0.5, probability=0.5)
    weights = [expert_weight(0.5, cfg, g3) for _ in range(20)]
    assert set(weights) == {0.0, 0.5}
    assert weights == [0.5 if draw_expert(0.5, g4) else 0.0 for _ in range(20)]


# -- the expert term --------------------------------------------------------------------------


def tiny_cfg(**overrides):
    """model_support's micro config with one layer a tower and a 16-wide text tower."""
    return micro(**{"vision.depth": 1, "text.width": 16, "text.depth": 1, **overrides})


def clip_loss64(img, txt, scale):
    """Symmetric InfoNCE in float64 (the test's plain reference for loss_fn)."""
    logits = scale.double() * img.double() @ txt.double().T
    y = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2


def make_batch(has_region: list[bool], seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    b, k, length = len(has_region), 3, 7
    corners = torch.rand(b, k, 2, 2, generator=g)
    boxes = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values], dim=-1)
    has = torch.tensor(has_region)
    box_mask = (torch.rand(b, k, generator=g) > 0.3) & has[:, None]
    box_mask[:, 0] &= has  # every region sample has at least its first box
    box_mask[:, 0] |= has
    tokens = torch.randint(1, 37, (b, length), generator=g)
    mask = torch.arange(length)[None] < torch.randint(1, length + 1, (b, 1), generator=g)
    phrase = torch.randint(1, 37, (b, length), generator=g)
    pmask = (torch.arange(length)[None] < torch.randint(1, 4, (b, 1), generator=g)) & has[:, None]
    return Batch(
        images=torch.randint(0, 256, (b, 3, 24, 24), dtype=torch.uint8, generator=g),
        tokens=tokens * mask, mask=mask, boxes=boxes * box_mask[..., None], box_mask=box_mask,
        phrase_tokens=phrase * pmask, phrase_mask=pmask, has_region=has,
    )


@pytest.mark.parametrize("has_region", [[False, False, False], [False, True, False]], ids=["none", "one"])
def test_expert_loss_zero_without_two_regions(has_region, monkeypatch):
    # one region sample: a contrastive loss over one pair is 0 whatever its embeddings, so
    # the expert encoder, the heatmaps and the phrase pass are skipped, not run for nothing
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    batch = make_batch(has_region)
    img = model.encode_image(batch.images)
    txt = model.encode_text(batch.tokens, batch.mask)
    monkeypatch.setattr(model, "encode_expert", lambda *a: pytest.fail("encoded for a term that is 0"))
    term = expert_loss(model, batch, img, txt, clip_loss64, model.cfg.expert, torch.Generator())
    assert term.dim() == 0 and term.item() == 0.0 and torch.isfinite(term)
    total = clip_loss64(img, txt, model.logit_scale.exp()) + 0.5 * term
    total.backward()  # the zero is graph-friendly
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_expert_loss_value_uses_only_region_samples_and_trains_expert():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    cfg = model.cfg.expert
    batch = make_batch([True, False, True, True, False])
    img = model.encode_image(batch.images)
    txt = model.encode_text(batch.tokens, batch.mask)
    term = expert_loss(model, batch, img, txt, clip_loss64, cfg, torch.Generator().manual_seed(1))
    # reference assembled by hand on the region samples 0, 2, 3
    idx = torch.tensor([0, 2, 3])
    heat = torch.from_numpy(ref_heatmaps(batch.boxes[idx].numpy(), batch.box_mask[idx].numpy(),
                                         24, cfg.min_sigma, cfg.sigma_scale)).float()
    expert = model.encode_expert(batch.images[idx], heat)
    phrase = model.encode_text(batch.phrase_tokens[idx], batch.phrase_mask[idx])
    mixed, _ = mixup(img[idx], expert, cfg.mixup_alpha, torch.Generator().manual_seed(1))
    scale = model.logit_scale.exp()
    want = 0.5 * (clip_loss64(mixed, phrase, scale) + clip_loss64(expert, txt[idx], scale))
    # float32 model outputs into a float64 loss; heatmaps differ by ulps: (fp32, atol 1e-5)
    assert term.item() == pytest.approx(want.item(), abs=1e-5)
    assert term.item() > 0
    # samples without a region do not matter: scramble them and get the same term
    scrambled = make_batch([True, False, True, True, False], seed=0)
    other = make_batch([True, True, True, True, True], seed=1)
    for f in ("images", "phrase_tokens", "boxes"):
        getattr(scrambled, f)[[1, 4]] = getattr(other, f)[[1, 4]]
    img2 = model.encode_image(scrambled.images)
    again = expert_loss(model, scrambled, img2, txt, clip_loss64, cfg,
                        torch.Generator().manual_seed(1))
    assert again.item() == pytest.approx(term.item(), abs=1e-6)
    # gradients reach every expert parameter
    term.backward()
    for name, p in model.expert.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.logit_scale.grad.abs() > 0


def test_a_twin_phrase_is_no_negative_in_the_phrase_term():
    # samples 1 and 3 share sample 0's phrase ("a small red circle" in three images): in the
    # phrase term they were each other's negatives. Now the term runs over the first of each
    # distinct phrase (0, 2, 4); the caption term keeps all five
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    cfg = model.cfg.expert
    batch = make_batch([True] * 5)
    for i in (1, 3):
        batch.phrase_tokens[i], batch.phrase_mask[i] = batch.phrase_tokens[0], batch.phrase_mask[0]
    assert first_of_each(batch.phrase_tokens, batch.has_region).tolist() == [True, False, True, False, True]
    # against a brute force, with samples that have no region (their twin is no first)
    g = torch.Generator().manual_seed(3)
    rows, valid = torch.randint(0, 3, (200, 2), generator=g), torch.rand(200, generator=g) > 0.3
    want = [bool(valid[i]) and not any(bool(valid[j]) and torch.equal(rows[j], rows[i]) for j in range(i))
            for i in range(200)]
    assert first_of_each(rows, valid).tolist() == want
    img = model.encode_image(batch.images)
    txt = model.encode_text(batch.tokens, batch.mask)
    term = expert_loss(model, batch, img, txt, clip_loss64, cfg, torch.Generator().manual_seed(1))
    heat = torch.from_numpy(ref_heatmaps(batch.boxes.numpy(), batch.box_mask.numpy(), 24, cfg.min_sigma,
                                         cfg.sigma_scale)).float()
    expert = model.encode_expert(batch.images, heat)
    mixed, _ = mixup(img, expert, cfg.mixup_alpha, torch.Generator().manual_seed(1))
    keep = torch.tensor([0, 2, 4])
    phrase = model.encode_text(batch.phrase_tokens[keep], batch.phrase_mask[keep])
    scale = model.logit_scale.exp()
    want = 0.5 * (clip_loss64(mixed[keep], phrase, scale) + clip_loss64(expert, txt, scale))
    # float32 model outputs into a float64 loss; heatmaps differ by ulps: (fp32, atol 1e-5)
    assert term.item() == pytest.approx(want.item(), abs=1e-5)
    # one distinct phrase among the region samples: its term is an attached 0, the other stays
    for i in range(5):
        batch.phrase_tokens[i], batch.phrase_mask[i] = batch.phrase_tokens[0], batch.phrase_mask[0]
    alone = expert_loss(model, batch, img, txt, clip_loss64, cfg, torch.Generator().manual_seed(1))
    assert alone.item() == pytest.approx(0.5 * clip_loss64(expert, txt, scale).item(), abs=1e-5)
    alone.backward()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_expert_path_cuda_compile_bf16():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).cuda()
    batch = make_batch([True, False, True, True]).to("cuda")
    heat_cpu = make_heatmaps(batch.boxes.cpu(), batch.box_mask.cpu(), 24, 1.0)
    heat = make_heatmaps(batch.boxes, batch.box_mask, 24, 1.0)
    assert heat.device.type == "cuda"
    torch.testing.assert_close(heat.cpu(), heat_cpu, atol=1e-6, rtol=0)
    eager = model.encode_expert(batch.images, heat)
    compiled = torch.compile(model.encode_expert)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = compiled(batch.images, heat)
    # bf16 matmuls (8-bit mantissa) through a few layers: (bf16, atol 3e-2) on unit vectors
    torch.testing.assert_close(fast.float(), eager, atol=3e-2, rtol=0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        img = model.encode_image(batch.images)
        txt = model.encode_text(batch.tokens, batch.mask)
        term = expert_loss(model, batch, img, txt, clip_loss64, model.cfg.expert,
                           torch.Generator().manual_seed(0))
    term.backward()
    assert torch.isfinite(term) and model.expert.q.weight.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixup_on_cuda_does_not_synchronise():
    # λ is drawn on the host; its copy to the device must not wait for the queued work
    # (the sync debug mode turns any synchronising call into an error).
    g = torch.Generator().manual_seed(3)
    a = F.normalize(torch.randn(64, 32, device="cuda"), dim=-1)
    b = F.normalize(torch.randn(64, 32, device="cuda"), dim=-1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mixed, lam = mixup(a, b, 0.4, g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want, want_lam = mixup(a.cpu(), b.cpu(), 0.4, torch.Generator().manual_seed(3))
    torch.testing.assert_close(lam.cpu(), want_lam)
    torch.testing.assert_close(mixed.cpu(), want, atol=1e-6, rtol=1e-5)


# -- the processor against its definition; input checks; schedule edges -------------------


def ref_processor(proc, x, heat):
    """The processor written out from its definition, in float64: patch convs plus shared
    positions, LayerNormed heat queries attending to LayerNormed image keys/values (per
    head, softmax(q·kᵀ/√d_h)·v), a residual on the queries, LayerNorm, a map to pixels
    unpatchified channel-major, added to the image."""
    p, g, d, nh = proc.patch_size, proc.grid, proc.width, proc.heads
    dh = d // nh
    sd = {k: v.double() for k, v in proc.state_dict().items()}
    b = x.shape[0]

    def tokens(inp, name):
        t = F.conv2d(inp, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=p)  # [B, d, g, g]
        return t.flatten(2).transpose(1, 2) + sd["pos_embed"]

    def ln(t, name):
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + proc.ln_q.eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]

    img, hm = tokens(x, "image_patch"), tokens(heat, "heat_patch")
    q = ln(hm, "ln_q") @ sd["q.weight"].T + sd["q.bias"]
    kv = ln(img, "ln_kv") @ sd["kv.weight"].T + sd["kv.bias"]
    k, v = kv[..., :d], kv[..., d:]
    out = torch.zeros_like(q)
    for h in range(nh):
        s = slice(h * dh, (h + 1) * dh)
        att = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(dh), dim=-1)
        out[..., s] = att @ v[..., s]
    t = hm + out @ sd["proj.weight"].T + sd["proj.bias"]
    pix = ln(t, "ln_out") @ sd["to_pixels.weight"].T + sd["to_pixels.bias"]  # [B, N, 3·p·p]
    img_out = x.clone()
    for n in range(g * g):
        r, c = divmod(n, g)
        img_out[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] += pix[:, n].view(b, 3, p, p)
    return img_out


def test_heatmap_processor_matches_its_definition():
    torch.manual_seed(0)
    proc = HeatmapProcessor(image_size=12, patch_size=4, width=8, heads=2, eps=1e-6).double()
    with torch.no_grad():  # every parameter random, the LayerNorms' too, so none can stand in for another
        for prm in proc.parameters():
            prm.copy_(torch.randn_like(prm) * 0.5)
    x, heat = torch.randn(2, 3, 12, 12, dtype=torch.float64), torch.rand(2, 1, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(proc(x, heat), ref_processor(proc, x, heat), atol=1e-9, rtol=1e-9)
    with pytest.raises(ValueError, match=r"heatmaps: expected \[2, 1, 12, 12\], got \[2, 1, 8, 8\]"):
        proc(x, heat[..., :8, :8])


def test_heatmap_size_must_be_positive_and_corner_order_does_not_matter():
    boxes = torch.tensor([[[0.2, 0.3, 0.6, 0.5]]])
    swapped = boxes[..., [2, 3, 0, 1]]  # (x2, y2, x1, y1): the same box
    mask = torch.ones(1, 1, dtype=torch.bool)
    a, b = make_heatmaps(boxes, mask, 16, 1.0), make_heatmaps(swapped, mask, 16, 1.0)
    assert a.max() == pytest.approx(1.0, abs=0.01) and a[0, 0, 0, 15] < 1e-3  # a real spread, not the floor's dot
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for size in (0, -4):
        with pytest.raises(ValueError, match=f"size: must be positive, got {size}"):
            make_heatmaps(boxes, mask, size, 1.0)


def test_mixup_shape_errors():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"mixup: expected two \[B, E\] tensors, got \[4\], \[4\]"):
        mixup(torch.ones(4), torch.ones(4), 1.0, g)
    with pytest.raises(ValueError, match=r"got \[2, 3\], \[2, 4\]"):
        mixup(torch.ones(2, 3), torch.ones(2, 4), 1.0, g)


def test_schedule_without_ramp_and_outside_training():
    # ramp 0: full weight from the first step after the cold start; progress past either
    # end (a time budget overrun, a clock before the origin) reads as that end
    cfg = ExpertConfig(weight=0.8, probability=0.3, cold_start=0.2, ramp=0.0, cool_down=0.25)
    assert expert_schedule(0.2, cfg) == (pytest.approx(0.8), 0.3)
    assert expert_schedule(0.1999, cfg) == (0.0, 0.0)
    assert expert_schedule(1.3, cfg) == (0.0, 0.0)
    ramp = ExpertConfig(weight=0.8, probability=0.3, ramp=0.5)
    assert expert_schedule(-0.5, ramp) == (0.0, 0.0) and expert_schedule(0.25, ramp)[0] == pytest.approx(0.4)
