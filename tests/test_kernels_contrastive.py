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

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels import contrastive_loss, contrastive_loss_ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The two lean backwards (see kernels.contrastive) and the fast mode; "lean" picks a lean
# backward by D (tested in tests/interpret/, where the choice reaches the kernels).
MODES = ["lean:fused", "lean:panel", "fast"]
ATOL = 1e-4


def tolerances(dtype: torch.dtype, mode: str) -> tuple[float, float]:
    if dtype == torch.float32:
        return (1e-5, 2e-3) if mode.startswith("lean") else (1e-5, 1e-2)
    if dtype == torch.float16 and mode.startswith("lean"):
        return 1e-4, 2e-3
    return 1e-4, 1e-2


# Pairwise cover of B ∈ {1, 3, 100, 257, 1000} × D ∈ {16, 100, 384} × scale ∈ {1, 14.3, 100}:
# scale index (i + j) % 3 makes every (B, scale) and (D, scale) pair appear; B = 1000 (the
# slow one under the interpreter) appears in one configuration only.
_BS, _DS, _SCALES = [1, 3, 100, 257], [16, 100, 384], [1.0, 14.3, 100.0]
PAIRWISE = [(b, d, _SCALES[(i + j) % 3]) for i, b in enumerate(_BS) for j, d in enumerate(_DS)]
PAIRWISE.append((1000, 100, 14.3))


def make_inputs(b, d, dtype, device, seed=0, normalise=True):
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    if normalise:
        img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    return img.to(device=device, dtype=dtype), txt.to(device=device, dtype=dtype)


def reference(img, txt, scale, upstream=1.0):
    """Float64 textbook loss and its autograd gradients."""
    a = img.detach().double().cpu().requires_grad_()
    b = txt.detach().double().cpu().requires_grad_()
    s = torch.tensor(float(scale), dtype=torch.float64, requires_grad=True)
    logits = s * a @ b.T
    y = torch.arange(a.shape[0])
    loss = (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2
    (loss * upstream).backward()
    return loss.detach(), a.grad, b.grad, s.grad


def run(img, txt, scale, upstream=1.0, **kwargs):
    a = img.detach().clone().requires_grad_()
    b = txt.detach().clone().requires_grad_()
    s = torch.tensor(float(scale), device=img.device, requires_grad=True)
    loss = contrastive_loss(a, b, s, **kwargs)
    (loss * upstream).backward()
    return loss.detach(), a.grad, b.grad, s.grad


def assert_close(got, want, rtol, what, atol=ATOL):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err, ref = (got - want).norm().item(), want.norm().item()
    assert err <= atol + rtol * ref, f"{what}: error {err:.3g} vs norm {ref:.3g} (rtol {rtol}, atol {atol:.2g})"


def residue_atol(b: int, scale: float) -> float:
    """The absolute tolerance (see the module docstring): B = 1's exact zeros get the
    rounding residue of the recomputed logits, s²·2⁻²³, on top of ATOL."""
    return ATOL + (float(scale) ** 2 * 2.0**-23 if b == 1 else 0.0)


def check_against_reference(img, txt, scale, mode, upstream=1.0):
    loss_tol, grad_tol = tolerances(img.dtype, mode)
    atol = residue_atol(img.shape[0], scale)
    got = run(img, txt, scale, upstream, mode=mode)
    want = reference(img, txt, scale, upstream)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert got[1].dtype == img.dtype and got[2].dtype == txt.dtype
    assert_close(got[0], want[0], loss_tol, "loss", atol)
    for name, g, w in zip(("d_img", "d_txt", "d_scale"), got[1:], want[1:], strict=True):
        assert_close(g, w, grad_tol, name, atol)


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
def test_zero_scale(mode, device):
    # s = 0: every logit is 0 and P = Q = 1/B, but ds = Σ G∘(I·Tᵀ) is not 0 (the fast mode
    # once divided its Σ Ĝ∘z by c = s·log2 e and returned NaN). Ragged B, 2 tiles.
    img, txt = make_inputs(71, 24, torch.float32, device, seed=12)
    check_against_reference(img, txt, 0.0, mode)


def test_a_column_stride_past_int32_gets_a_contiguous_copy():
    # The kernels' D offsets are int32 × the column stride: a column-major view of a buffer
    # of 2^30 rows would overflow them. Meta tensors: the layout without the memory.
    from kernels._common import int32_columns

    huge = torch.empty_strided((64, 3), (1, 2**30), device="meta")
    fixed = int32_columns(huge)
    assert fixed.is_contiguous() and fixed.shape == huge.shape
    edge = torch.empty_strided((64, 3), (1, 2**30 - 1), device="meta")  # last column at 2^31 − 2
    assert int32_columns(edge) is edge
    strided = torch.empty((90, 64))[::2, ::2]  # an ordinary non-contiguous view passes as it is
    assert int32_columns(strided) is strided


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_inputs(mode, device):
    base_i, base_t = make_inputs(90, 64, torch.float32, device, seed=5)
    img = base_i[::2, ::2]  # [45, 32], strides (128, 2)
    txt = base_t.T.contiguous().T[:45, :32]  # column-major view
    assert not img.is_contiguous() and not txt.is_contiguous()
    check_against_reference(img, txt, 14.3, mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_bitwise_deterministic(mode, device):
    img, txt = make_inputs(133, 48, torch.float32, device, seed=6)
    first = run(img, txt, 14.3, mode=mode)
    second = run(img, txt, 14.3, mode=mode)
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_custom_op_under_torch_compile(mode, device):
    # A small training step: projection → normalise → fused loss with a learnable scale.
    torch.manual_seed(0)
    proj = torch.nn.Linear(24, 16).to(device)
    log_scale = torch.nn.Parameter(torch.tensor(2.0, device=device))
    x = torch.randn(37, 24, device=device)
    t = F.normalize(torch.randn(37, 16, device=device), dim=1)

    def step(x, t):
        img = F.normalize(proj(x), dim=1)
        return contrastive_loss(img, t, log_scale.exp(), mode=mode)

    def grads(fn):
        proj.zero_grad()
        log_scale.grad = None
        loss = fn(x, t)
        loss.backward()
        return loss.detach(), proj.weight.grad.clone(), log_scale.grad.clone()

    eager = grads(step)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # the second call reuses the compiled graph
        got = grads(compiled)
        for e, g in zip(eager, got, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_a_callers_autocast_does_not_reach_inside(mode, device):
    # A custom op's body runs under the caller's autocast. Without the op turning it off, the
    # reference's fp32 matmuls ran in bf16: its forward took the LSEs from bf16 logits, and
    # its backward was biased against them (relative gradient error 5e-2 instead of 2e-3).
    # Forward and backward both run inside the autocast region here (``run``), eager and
    # compiled, and must give the fp32 results bit for bit.
    img, txt = make_inputs(100, 64, torch.float32, device, seed=11)
    want = run(img, txt, 100.0, mode=mode)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        eager = run(img, txt, 100.0, mode=mode)
        compiled = torch.compile(contrastive_loss, fullgraph=True, backend="aot_eager")(
            img, txt, torch.tensor(100.0, device=device), mode=mode)
    for name, w, g in zip(("loss", "d_img", "d_txt", "d_scale"), want, eager, strict=True):
        assert torch.equal(g, w), name
    assert torch.equal(compiled, want[0])


def test_a_second_derivative_raises_instead_of_returning_a_wrong_one():
    # First-order only (module docstring): the backward op has no derivative of its own.
    img, txt = make_inputs(5, 8, torch.float32, "cpu")
    img.requires_grad_()
    (d_img,) = torch.autograd.grad(contrastive_loss(img, txt, torch.tensor(3.0)), img, create_graph=True)
    with pytest.raises(RuntimeError, match="contrastive_loss_bwd"):
        d_img.sum().backward()


def test_importing_kernels_leaves_dynamo_unloaded_and_marks_the_bound_as_the_public_decorator_does():
    # Dynamo costs about 1 s of every start-up; the evaluation's processes never compile. The
    # mode bound must still be marked as torch.compiler.assume_constant_result marks it, or
    # mode="auto" under torch.compile would trace into it (tests/interpret/ compiles it).
    code = (
        "import sys, kernels\n"
        "print('torch._dynamo' in sys.modules)\n"
        "import torch\n"
        "def probe(): return 0\n"
        "torch.compiler.assume_constant_result(probe)\n"
        "print(vars(kernels.contrastive._fast_max_b) == vars(probe) != {})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "True"]


def test_reference_chunking_does_not_change_the_result():
    # (float32, atol 1e-6, rtol 1e-5): only the summation order changes with the chunk.
    img, txt = make_inputs(101, 20, torch.float32, "cpu", seed=8)
    s = torch.tensor(14.3)
    full = contrastive_loss_ref(img, txt, s)
    for chunk in (1, 7, 100):
        torch.testing.assert_close(contrastive_loss_ref(img, txt, s, chunk=chunk), full, rtol=1e-5, atol=1e-6)
    want = reference(img, txt, 14.3)[0].float()
    torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "img,txt,scale,kwargs,match",
    [
        (torch.zeros(4, 3), torch.zeros(5, 3), torch.tensor(1.0), {}, "same shape"),
        (torch.zeros(4, 1025), torch.zeros(4, 1025), torch.tensor(1.0), {}, "D = 1025"),
        (torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64), torch.tensor(1.0), {}, "img must be float32"),
        (torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.int64), torch.tensor(1.0), {}, "txt must be float32"),
        (torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.float16), torch.tensor(1.0), {}, "same dtype"),
        (torch.zeros(4), torch.zeros(4), torch.tensor(1.0), {}, "img must be 2-d"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.tensor([1.0]), {}, "scale must be a 0-d"),
        (torch.zeros(4, 3), torch.zeros(4, 3), 1.0, {}, "scale must be a 0-d.*got float$"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.tensor(3), {}, r"scale must be a 0-d.*got shape \(\), torch.int64"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.tensor(1.0), {"mode": "quick"}, "mode must be"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.tensor(1.0), {"backend": "cuda"}, "backend must be"),
    ],
)
def test_bad_input_raises_a_clear_error(img, txt, scale, kwargs, match):
    with pytest.raises(ValueError, match=match):
        contrastive_loss(img, txt, scale, **kwargs)


def _noop_kernel(x_ptr):
    pass


@pytest.mark.parametrize("value,interpret", [("1", True), ("true", True), ("On", True), ("0", False), ("", False)])
def test_interpret_mode_agrees_with_triton(value, interpret, monkeypatch):
    # kernels sends CPU tensors to the Triton kernels when Triton builds them for its
    # interpreter; the two must read TRITON_INTERPRET alike ("true" once built interpreted
    # kernels while kernels took the reference path and refused backend="triton" on CPU).
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from kernels import _common

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _common._interpret_mode() is interpret
    assert isinstance(triton.jit(_noop_kernel), InterpretedFunction) is interpret


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


@pytest.mark.parametrize("user", [False, True])
def test_full_precision_reduction_restores_the_flags(user):
    from kernels._common import _REDUCTION_FLAGS, _reduction_setting, full_precision_reduction

    m = torch.backends.cuda.matmul
    original = {name: _reduction_setting(name) for name in _REDUCTION_FLAGS}
    paired = isinstance(original[_REDUCTION_FLAGS[0]], tuple)  # PyTorch >= 2.10
    try:
        if user:  # a user's own choice, split-K off where PyTorch has that part: must survive
            for name in _REDUCTION_FLAGS:
                setattr(m, name, (False, False) if paired else False)
        before = {name: _reduction_setting(name) for name in _REDUCTION_FLAGS}
        with pytest.raises(RuntimeError, match="inside"), full_precision_reduction():
            for name in _REDUCTION_FLAGS:
                inside = _reduction_setting(name)
                # reduced precision off; the split-K part untouched
                assert inside == ((False, before[name][1]) if paired else False), name
            raise RuntimeError("inside")
        assert {name: _reduction_setting(name) for name in _REDUCTION_FLAGS} == before
    finally:
        for name, value in original.items():
            setattr(m, name, value)


@pytest.mark.parametrize("mode", MODES)
def test_custom_ops_pass_opcheck_with_non_contiguous_inputs(mode):
    # torch.library.opcheck runs each op against its fake implementation (shapes, dtypes,
    # strides), its schema (no undeclared mutation or aliasing) and its autograd
    # registration. Transposed inputs: the outputs must be contiguous however the inputs
    # are laid out, as the fakes promise (a reference backward once returned column-major
    # gradients, which Inductor's stride asserts reject).
    from kernels._common import resolve_backend

    base_i, base_t = make_inputs(40, 19, torch.float32, "cpu", seed=12)
    img, txt = base_i.T.contiguous().T, base_t.T.contiguous().T  # [19, 40]ᵀ views: strides (1, 40)
    assert not img.is_contiguous()
    img.requires_grad_()
    impl = resolve_backend(None, img, "contrastive_loss")
    scale = torch.tensor(14.3, requires_grad=True)
    fwd = torch.ops.eclip.contrastive_loss_fwd.default
    torch.library.opcheck(fwd, (img, txt, scale, mode, impl, 0, True))
    out = fwd(img, txt, scale, mode, impl, 0, True)
    args = (torch.tensor(1.0), img.detach(), txt, scale.detach(), out[1], out[2], out[3], out[4], mode, impl, 0)
    torch.library.opcheck(torch.ops.eclip.contrastive_loss_bwd.default, args)


def test_deterministic_algorithms_pin_the_fixed_configs():
    # Autotuning picks configs by timing, so it could differ between processes; with
    # deterministic algorithms requested, mid-sized B takes the fixed configs instead.
    from kernels import _common

    if _common.INTERPRET:
        pytest.skip("the interpreter never autotunes")
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert _common.tuned(16384) and not _common.tuned(1000) and not _common.tuned(1 << 20)
        torch.use_deterministic_algorithms(True)
        assert not _common.tuned(16384)
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scaled_products_round_to_nearest_even(dtype, device):
    # The in-place scaling rounds each fp32 value once, to nearest even, as torch's own
    # conversion does. 1 + k·ulp times 1.5 is an exact tie for every odd k (while it stays
    # under 2), with the even neighbour below or above by turns; also huge values that
    # overflow to inf, infinities, NaN, zeros of both signs. The product is [1]·[values]
    # (K = 1), so it is exact before the scaling.
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    grid = 1.0 + ulp * torch.arange(256, dtype=torch.float64)
    values = torch.cat([grid, -grid, torch.tensor(
        [3.0e38, -3.0e38, float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-30, 6.0e4],
        dtype=torch.float64)]).float()
    coef = torch.tensor(1.5, device=device)
    from kernels._common import scaled_mm

    b = values.to(dtype).to(device)[None, :]  # [1, N]
    one = torch.ones((1, 1), dtype=dtype, device=device)
    got = scaled_mm(one, b, coef, dtype).float().cpu()
    want = (b.float() * coef).to(dtype).float().cpu()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
    # A NaN coef (a NaN upstream gradient) in the bit patterns a GPU writes: 0x7FFFFFFF, and
    # with the sign bit. Every entry must come out NaN: the bias added for the rounding once
    # carried that pattern into the sign bit, giving -0.0 (x86 keeps a NaN operand's bits
    # through the multiplication, so the interpreter rerun sees these patterns as a GPU would).
    for bits in (0x7FFFFFFF, -1):
        nan = torch.tensor(bits, dtype=torch.int32).view(torch.float32).to(device)
        assert scaled_mm(one, b, nan, dtype).isnan().all(), hex(bits & 0xFFFFFFFF)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,coef", [
    (torch.bfloat16, 2.0**-9 * (1 + 2.0**-8)),  # halfway between two bf16 neighbours
    (torch.float16, 2.0**-9 * (1 + 2.0**-11)),  # halfway between two fp16 neighbours
    (torch.float32, 2.0**-9 * (1 + 2.0**-8)),
])
def test_fast_mode_scales_its_products_in_fp32(dtype, coef, device):
    # The fast backward scales Ĝ·T by s·g/(2B), a 0-d fp32 tensor on the inputs' device. On
    # CUDA a 0-d device tensor multiplied into a half-precision tensor is read in that dtype:
    # this coef would lose 2⁻⁹ (bf16) or 2⁻¹² (fp16) of its value, the same on every entry.
    # Exact equality with one fp32 scaling of the same product (the Python-float path).
    from kernels._common import scaled_mm

    g = torch.Generator().manual_seed(14)
    a = torch.randn(96, 80, generator=g).to(device=device, dtype=torch.float16 if dtype == torch.float16 else torch.bfloat16)
    b = torch.randn(80, 24, generator=g).to(device=device, dtype=dtype)
    got = scaled_mm(a, b, torch.tensor(coef, device=device), dtype)
    # The reference in float64: a bf16 / fp16 product times an fp32 coef is exact there, so
    # .float() is the one fp32 rounding of the scaled product, then the one rounding to dtype.
    want = ((a @ b.to(a.dtype)).double() * coef).float().to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)


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


@pytest.mark.parametrize("img,txt,match", [
    (torch.zeros(0, 3), torch.zeros(0, 3), "B >= 1"),
    (torch.zeros(4, 0), torch.zeros(4, 0), "D >= 1"),
])
def test_empty_inputs_raise_a_clear_error(img, txt, match):
    with pytest.raises(ValueError, match=match):
        contrastive_loss(img, txt, torch.tensor(1.0))


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


def test_autotune_pruning_by_dim_never_leaves_a_kernel_without_configs():
    # prune_by_dim drops the configs whose D-blocks (BLOCK_D, BLOCK_V) exceed D rounded up to
    # a power of two (16 at least) and falls back to the last config when none is left: an
    # autotuner handed no config fails at its first launch (on a GPU, every tuned B with
    # D <= 16, and the fused backward's with D <= 64, whose chunks are 128 wide or more).
    pytest.importorskip("triton")
    from kernels import _contrastive_fast, _contrastive_lean, _contrastive_panel
    from kernels._common import next_pow2, prune_by_dim

    tables = {"lean fwd": _contrastive_lean._FWD_CONFIGS, "lean bwd": _contrastive_lean._BWD_CONFIGS,
              "fast fwd": _contrastive_fast._FWD_CONFIGS, "panel": _contrastive_panel._CONFIGS}
    for name, configs in tables.items():
        for dim in (*range(1, 130), 255, 256, 257, 384, 1000, 1024):
            kept = prune_by_dim(configs, {"dim": dim})
            assert kept and all(c in configs for c in kept), (name, dim)
            d_max = max(16, next_pow2(dim))
            fit = all(max(c.kwargs["BLOCK_D"], c.kwargs.get("BLOCK_V", 0)) <= d_max for c in kept)
            assert fit or kept == configs[-1:], (name, dim)
    # D = 100 runs in D-blocks of up to 128: the fused backward keeps its 128-wide chunks.
    assert [c.kwargs["BLOCK_V"] for c in prune_by_dim(_contrastive_lean._BWD_CONFIGS, {"dim": 100})] == [128, 128]
