"""contrastive_loss beyond its accuracy: determinism, the custom ops under torch.compile,
autocast and opcheck, first-order-only autograd, the input checks' errors, and the helpers of
kernels._common (column strides, the interpreter switch, reduction flags, fixed and pruned
configs, scaled_mm's rounding). Run as tests/test_kernels_contrastive.py is: the reference
path on CPU, the Triton kernels under tests/interpret/ and on CUDA.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from contrastive_support import DEVICES, MODES, make_inputs, run

from kernels import contrastive_loss


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


@pytest.mark.parametrize("img,txt,match", [
    (torch.zeros(0, 3), torch.zeros(0, 3), "B >= 1"),
    (torch.zeros(4, 0), torch.zeros(4, 0), "D >= 1"),
])
def test_empty_inputs_raise_a_clear_error(img, txt, match):
    with pytest.raises(ValueError, match=match):
        contrastive_loss(img, txt, torch.tensor(1.0))


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
