"""contrastive_loss (both modes) against a float64 brute force: loss and all three gradients.

In the normal run CPU tensors take the chunked PyTorch reference; tests/interpret/ reruns
this module with TRITON_INTERPRET=1, where CPU tensors go through the Triton kernels; on a
CUDA machine the "cuda" cases run the kernels on the GPU.

Errors are measured as ‖got − want‖ ≤ atol + rtol·‖want‖ (norm-wise, as the targets are
stated). Tolerances, as (dtype, mode) → (loss rtol, gradient rtol), with their reason:
  * (float32, lean): loss 1e-5, grads 2e-3 — fp32 accumulation; on the GPU the fused
    backward's gradient products run in TF32 (10-bit mantissa for Ĝ and the embeddings);
  * (float32, fast): loss 1e-5, grads 1e-2 — Ĝ is stored in bf16 (8-bit mantissa);
  * (float16, lean): loss 1e-4, grads 2e-3 — Ĝ and the gradients are rounded to fp16;
  * (float16, fast): loss 1e-4, grads 1e-2 — Ĝ in fp16 from a bf16-stored S;
  * (bfloat16, any): loss 1e-4, grads 1e-2 — Ĝ and the gradients are rounded to bf16.
atol only matters for B = 1, where the loss and the gradients are exactly 0 and the kernels
leave rounding residue: Ĝ = P + Q − 2 ≈ 2δ, δ the difference between the backward's recomputed
logit s·cos and the forward's log-sum-exp (accumulation order: about s·ε_fp32), and the
gradient carries another factor s. Hence atol = 1e-4 + s²·2⁻²³ for B = 1 (an H100 left
1.9e-4 at s = 100, D = 384 in fp32, above the 1e-4 this test had; the tolerance is 1.3e-3),
and 1e-4 otherwise.
The reference is computed from the same (rounded) inputs, upcast to float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from contrastive_support import (
    DEVICES,
    MODES,
    assert_close,
    check_against_reference,
    make_inputs,
    reference,
    run,
    tolerances,
)

from kernels import contrastive_loss, contrastive_loss_ref

# Pairwise cover of B ∈ {1, 3, 100, 257, 1000} × D ∈ {16, 100, 384} × scale ∈ {1, 14.3, 100}:
# scale index (i + j) % 3 makes every (B, scale) and (D, scale) pair appear; B = 1000 (the
# slow one under the interpreter) appears in one configuration only.
_BS, _DS, _SCALES = [1, 3, 100, 257], [16, 100, 384], [1.0, 14.3, 100.0]
PAIRWISE = [(b, d, _SCALES[(i + j) % 3]) for i, b in enumerate(_BS) for j, d in enumerate(_DS)]
PAIRWISE.append((1000, 100, 14.3))

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b,d,scale", PAIRWISE)
def test_fp32_pairwise_against_float64(b, d, scale, mode, device):
    img, txt = make_inputs(b, d, torch.float32, device, seed=b + d)
    check_against_reference(img, txt, scale, mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "dtype,b,d,scale",
    [(torch.float16, 257, 100, 100.0), (torch.float16, 3, 384, 1.0), (torch.bfloat16, 100, 384, 14.3),
     (torch.bfloat16, 257, 16, 100.0)],
)
def test_half_precision_inputs(dtype, b, d, scale, mode, device):
    img, txt = make_inputs(b, d, dtype, device, seed=7)
    check_against_reference(img, txt, scale, mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_upstream_gradient_and_unnormalised_inputs(mode, device):
    img, txt = make_inputs(70, 24, torch.float32, device, seed=3, normalise=False)
    check_against_reference(img * 0.3, txt * 0.3, 5.0, mode, upstream=-0.7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_duplicate_rows_at_scale_100_stay_finite(mode, device):
    img, txt = make_inputs(65, 32, torch.float32, device, seed=4)
    img[1] = img[0]  # exact duplicate image
    txt[5] = txt[4]  # exact duplicate text
    img[9] = img[8] + 1e-4 * img[7]  # near duplicate
    img[20:30] = img[20]  # a block of identical rows
    txt[20:30] = img[20]  # ... matching identical texts: ten equal logits of value s
    check_against_reference(img, txt, 100.0, mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_gradients_that_cancel_keep_the_error_of_their_terms(mode, device):
    # every row the same up to 1e-4: each gradient is a small difference of terms of size
    # s/(2B), so its relative error is no measure. (float32, fast: max error ≤ 1e-2·s/(2B)):
    # Ĝ in bf16, 3.3e-3·s/(2B) measured under the interpreter; lean keeps the usual rtol
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(1, 16, generator=g, dtype=torch.float64), dim=1)
    img = (v + 1e-4 * torch.randn(8, 16, generator=g, dtype=torch.float64)).float().to(device)
    txt = v.expand(8, 16).float().to(device)  # eight equal captions
    got, want = run(img, txt, 100.0, mode=mode), reference(img, txt, 100.0)
    if mode == "fast":
        bound = 1e-2 * 100.0 / (2 * 8)
        for name, a, b in zip(("dI", "dT"), got[1:3], want[1:3], strict=True):
            err = (a.double().cpu() - b).abs().max().item()
            assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"
        assert_close(got[0], want[0], 1e-5, "loss")
    else:
        check_against_reference(img, txt, 100.0, mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_zero_scale(mode, device):
    # s = 0: every logit is 0 and P = Q = 1/B, but ds = Σ G∘(I·Tᵀ) is not 0 (the fast mode
    # once divided its Σ Ĝ∘z by c = s·log2 e and returned NaN). Ragged B, 2 tiles.
    img, txt = make_inputs(71, 24, torch.float32, device, seed=12)
    check_against_reference(img, txt, 0.0, mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_inputs(mode, device):
    base_i, base_t = make_inputs(90, 64, torch.float32, device, seed=5)
    img = base_i[::2, ::2]  # [45, 32], strides (128, 2)
    txt = base_t.T.contiguous().T[:45, :32]  # column-major view
    assert not img.is_contiguous() and not txt.is_contiguous()
    check_against_reference(img, txt, 14.3, mode)


def test_reference_chunking_does_not_change_the_result():
    # (float32, atol 1e-6, rtol 1e-5): only the summation order changes with the chunk.
    img, txt = make_inputs(101, 20, torch.float32, "cpu", seed=8)
    s = torch.tensor(14.3)
    full = contrastive_loss_ref(img, txt, s)
    for chunk in (1, 7, 100):
        torch.testing.assert_close(contrastive_loss_ref(img, txt, s, chunk=chunk), full, rtol=1e-5, atol=1e-6)
    want = reference(img, txt, 14.3)[0].float()
    torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_tuned_sizes_against_float64(mode, dtype):
    # B above the fixed small-B config, ragged against every tile size: the autotuned path.
    img, txt = make_inputs(4099, 512, dtype, "cuda", seed=9)
    check_against_reference(img, txt, 14.3, mode)
    img, txt = make_inputs(3000, 768, dtype, "cuda", seed=10)
    check_against_reference(img, txt, 100.0, mode)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_panel_over_many_panels_against_float64(dtype, monkeypatch):
    # A tuned size in 256-row panels (17 a direction, the last one ragged): the autotuned
    # first panel, then direct launches at growing offsets into the shared partials buffer.
    from kernels import _contrastive_panel as panel

    monkeypatch.setattr(panel, "PANEL_BYTES", 1 << 20)
    img, txt = make_inputs(4099, 512, dtype, "cuda", seed=12)
    check_against_reference(img, txt, 30.0, "lean:panel")


def test_reference_backward_over_several_chunks_matches_float64():
    # The reference recomputes the logits chunk by chunk in the backward too (CPU training
    # with B > 2048 takes several chunks by default): the −2·Id term of each chunk sits on
    # the diagonal at offset st of that chunk. Loss and all gradients against float64.
    img, txt = make_inputs(101, 20, torch.float32, "cpu", seed=8)
    want = reference(img, txt, 14.3, upstream=0.5)
    for chunk in (1, 7, 100):
        a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
        s = torch.tensor(14.3, requires_grad=True)
        (contrastive_loss_ref(a, b, s, chunk=chunk) * 0.5).backward()
        for name, g, w in zip(("d_img", "d_txt", "d_scale"), (a.grad, b.grad, s.grad), want[1:], strict=True):
            assert_close(g, w, 2e-3, f"{name} (chunk {chunk})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_only_the_scale_requires_grad(mode, device):
    # Frozen towers, a learnable temperature: the forward must still prepare the backward
    # (the fast mode raised "ran without need_grad" when only the scale needed a gradient).
    img, txt = make_inputs(40, 16, torch.float32, device, seed=13)
    s = torch.tensor(14.3, device=device, requires_grad=True)
    contrastive_loss(img, txt, s, mode=mode).backward()
    want = reference(img, txt, 14.3)[3]
    assert_close(s.grad, want, tolerances(torch.float32, mode)[1], "d_scale")


def test_the_widest_supported_dim_is_accepted():
    # D ≤ 1024 is the contract: D = 1024 (a ViT-L embedding) must pass the checks.
    img, txt = make_inputs(4, 1024, torch.float32, "cpu", seed=1)
    check_against_reference(img, txt, 14.3, "lean:fused")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_ragged_dim_over_several_d_chunks(mode, device):
    # D = 200: more than one D-block of the score tiles (128 under the interpreter, 64 on a
    # GPU) with a ragged last one, and two dq chunks (BLOCK_V = 128 under the interpreter),
    # the second ragged. The pairwise cover has D = 100 (one ragged block under the
    # interpreter) and 384 (whole blocks) only, so a mask or grid that ignored the block's
    # offset in D passed it.
    img, txt = make_inputs(70, 200, torch.float32, device, seed=200)
    check_against_reference(img, txt, 14.3, mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_rows_whose_logits_are_all_far_below_zero(mode, device):
    # Every logit -100 (s = 100, img = -txt): -144 in log2 units, so 2^z is subnormal in fp32
    # (flushed to 0 on a GPU, whose exp2 flushes subnormals). An online max started at 0
    # instead of -inf would sum those 2^z unshifted: LSE -inf on a GPU, a few % off here.
    e = torch.zeros(5, 16, device=device)
    e[:, 0] = 1.0
    check_against_reference(e, -e, 100.0, mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_fp16_gradients_when_the_factor_s_g_over_2b_is_tiny(mode, device):
    # fp16 Ĝ must not be scaled by s·g/(2B) before its product (kernels/_contrastive_panel.py):
    # at a large B (s = 100, B = 32k: 1.5e-3) the scaled entries, about 1/B each, fall under
    # fp16's subnormals and are lost, though the gradient itself is representable. Reached
    # here with B = 100 through a tiny upstream gradient, with txt large and img small (the
    # same logits) so that d_img stays in fp16's normal range. d_txt (about 1e-10) is not.
    b, d, upstream, sigma = 100, 16, 2.0**-16, 2048.0
    img, txt = make_inputs(b, d, torch.float32, "cpu", seed=5)
    img, txt = (img / sigma).to(device, torch.float16), (txt * sigma).to(device, torch.float16)
    got = run(img, txt, 14.3, upstream, mode=mode)
    want = reference(img, txt, 14.3, upstream)
    loss_tol, grad_tol = tolerances(torch.float16, mode)
    assert_close(got[0], want[0], loss_tol, "loss", atol=0.0)
    assert_close(got[1], want[1], grad_tol, "d_img", atol=0.0)
    assert_close(got[3], want[3], grad_tol, "d_scale", atol=0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_fp16_inputs_under_a_loss_scale_past_fp16s_range(mode, device):
    # A GradScaler's scale is an fp32 value that grows past fp16's largest (65504): the
    # upstream gradient must reach the gradients' factor s·g/(2B) in fp32, never in the
    # inputs' dtype (it would be inf); the gradients themselves (about 9e3 here) fit.
    img, txt = make_inputs(100, 16, torch.float16, device, seed=9)
    check_against_reference(img, txt, 14.3, mode, upstream=2.0**17)
