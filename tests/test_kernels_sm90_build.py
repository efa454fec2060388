"""Every Triton kernel builds for an H100 (sm_90) — checked on a machine without a GPU.

Triton compiles ahead of time for an explicit target with the ptxas it ships, so this
catches what the interpreter cannot: code-generation errors, configs that exceed the
227 KiB of shared memory a block may use, a dot that does not reach the Hopper tensor
cores (wgmma), and (``ptxas -v``) register spills in the GEMM-shaped kernels. The builds
are specialised as Triton specialises a launch (unit inner strides, 16-divisible pointers
and sizes), without which loads are not vectorised and the pipeliner does not run. Each fixed launch config must fit (bf16 and fp32 inputs); of the autotuned
ones (built for bf16) at least one per kernel must fit (the autotuner skips the others).
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

triton = pytest.importorskip("triton")

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - a Triton without the ahead-of-time API
    pytest.skip("this Triton has no ahead-of-time compile API", allow_module_level=True)

from kernels import _contrastive_fast as fast  # noqa: E402
from kernels import _contrastive_lean as lean  # noqa: E402
from kernels import _contrastive_panel as panel  # noqa: E402
from kernels import retrieval  # noqa: E402

pytestmark = pytest.mark.slow

H100 = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90


# Ints that equal B (or a panel's height or offset) and strides of [.., B] buffers: not
# multiples of 16 when B is ragged.
RAGGED = frozenset({"n", "n_q", "n_k", "rows", "p0", "stride_ym", "stride_gm"})


def build(fn, pointers: dict, constexprs: dict, num_warps: int, num_stages: int, ragged: bool = False):
    """Compile ``fn`` for sm_90, specialised as a launch with contiguous inputs is: the inner
    strides (``stride_*d``) fixed to 1, every pointer and int marked divisible by 16 (what
    lets loads vectorise and the pipeliner run) — except, with ``ragged``, those that follow
    B (``RAGGED``), and always ``n_bucket`` (a bit length) and the ints the kernel declares
    ``do_not_specialize``. Pointers typed by ``pointers``."""
    sig, consts, attrs = {}, dict(constexprs), {}
    params = fn.params
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.startswith("stride_") and name.endswith("d"):
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "*" + pointers.get(name, "fp32") if name.endswith("_ptr") else "i32"
            if name != "n_bucket" and not params[i].do_not_specialize and not (ragged and name in RAGGED):
                attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        return triton.compile(
            ASTSource(fn, sig, consts, attrs), target=H100,
            options={"num_warps": num_warps, "num_stages": num_stages},
        )
    except FileNotFoundError as e:  # pragma: no cover - no ptxas in this Triton install
        pytest.skip(f"no CUDA toolchain in this Triton install: {e}")


def ptxas_report(kernel) -> str:
    """``ptxas -v``'s report on the sm_90a build of ``kernel``."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):  # pragma: no cover - a Triton install without its ptxas
        pytest.skip("no ptxas in this Triton install")
    proc = subprocess.run([ptxas, "-arch=sm_90a", "-v", "-", "-o", os.devnull],
                          input=kernel.asm["ptx"], capture_output=True, text=True, check=True)
    return proc.stderr


def spill_bytes(kernel) -> int:
    """Bytes of register spill stores in the sm_90a build of ``kernel``."""
    return sum(int(b) for b in re.findall(r"(\d+) bytes spill stores", ptxas_report(kernel)))


def registers(kernel) -> int:
    """Registers a thread of the sm_90a build of ``kernel``."""
    return int(re.search(r"Used (\d+) registers", ptxas_report(kernel)).group(1))


def check(kernel, dtype: str, fixed: dict, configs, extra: dict, g_dtype: str = "bf16",
          no_spills: bool = False) -> None:
    """The fixed config builds within shared memory on wgmma; so does at least one tuned
    config (bf16). With no_spills (bf16 only): for B a multiple of 16 — the sizes benchmarked
    and trained — no config spills registers; for a ragged B at least one tuned config is
    free of spills (the mask arithmetic costs registers)."""
    pointers = {"q_ptr": dtype, "k_ptr": dtype, "dq_ptr": dtype, "y_ptr": "bf16", "g_ptr": g_dtype}
    pointers.update({n: "i64" for n in ("own_lo_ptr", "own_hi_ptr", "rank_ptr")})
    fixed = dict(fixed)
    warps, stages = fixed.pop("num_warps"), fixed.pop("num_stages", 3)  # 3: Triton's default
    k = build(kernel, pointers, {**fixed, **extra}, warps, stages)
    assert k.metadata.shared <= SMEM_LIMIT, f"fixed config needs {k.metadata.shared} B of shared memory"
    assert "wgmma.mma_async" in k.asm["ptx"], "the score dot does not use the Hopper tensor cores"
    if dtype != "bf16":  # the tuned configs are built once, for the training dtype
        return
    if no_spills:
        assert spill_bytes(k) == 0, f"the fixed config {fixed} spills registers"
    fits, clean_ragged = 0, 0
    for cf in configs:
        k = build(kernel, pointers, {**cf.kwargs, **extra}, cf.num_warps, cf.num_stages)
        fits += k.metadata.shared <= SMEM_LIMIT
        if no_spills:
            assert spill_bytes(k) == 0, f"{cf} spills registers"
            ragged = build(kernel, pointers, {**cf.kwargs, **extra}, cf.num_warps, cf.num_stages, ragged=True)
            clean_ragged += spill_bytes(ragged) == 0
    assert fits, "no autotune config fits in shared memory"
    assert clean_ragged or not no_spills, "every autotune config spills registers for a ragged B"


@pytest.mark.parametrize("dtype,precision", [("bf16", "tf32"), ("fp32", "tf32x3")])
def test_rank_kernel_builds(dtype, precision):
    fixed = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, num_warps=4)
    check(retrieval._rank_rows_kernel, dtype, fixed, retrieval._RANK_CONFIGS,
          dict(UPCAST=False, PRECISION=precision))


@pytest.mark.parametrize("dtype,precision", [("bf16", "tf32"), ("fp32", "tf32x3")])
def test_lean_kernels_build(dtype, precision):
    n, dim = 1 << 20, 512  # the fixed configs of the largest sizes
    check(lean._lean_fwd_kernel, dtype, {**lean._fixed_fwd(n, dim), "PROGS_PER_SM": 1}, lean._FWD_CONFIGS,
          dict(UPCAST=False, PRECISION=precision), no_spills=True)
    check(lean._lean_bwd_kernel, dtype, lean._fixed_bwd(n, dim), lean._BWD_CONFIGS,
          dict(UPCAST=False, PRECISION=precision, GRAD_PRECISION="tf32", WRITE_QDOT=True))


@pytest.mark.parametrize("dtype,precision", [("bf16", "tf32"), ("fp32", "tf32x3")])
@pytest.mark.parametrize("ragged", [False, True])
def test_lean_small_batch_configs_do_not_spill(dtype, precision, ragged):
    # B <= TINY_B runs one fixed config per kernel, untuned, in every dtype: it must not spill.
    n, dim = 1000, 512
    pointers = {"q_ptr": dtype, "k_ptr": dtype, "dq_ptr": dtype}
    for kernel, cfg, extra in [
        (lean._lean_fwd_kernel, lean._fixed_fwd(n, dim), dict(PROGS_PER_SM=1)),
        (lean._lean_bwd_kernel, lean._fixed_bwd(n, dim), dict(GRAD_PRECISION="tf32", WRITE_QDOT=True)),
    ]:
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages", 3)
        k = build(kernel, pointers, {**cfg, **extra, "UPCAST": False, "PRECISION": precision}, warps, stages,
                  ragged=ragged)
        assert k.metadata.shared <= SMEM_LIMIT
        assert spill_bytes(k) == 0, f"{kernel.__name__} {cfg} spills registers"


@pytest.mark.parametrize("dtype,precision", [("bf16", "tf32"), ("fp32", "tf32x3")])
def test_panel_kernel_builds(dtype, precision):
    consts = dict(UPCAST=False, PRECISION=precision, SCALE_G=True, WRITE_PART=True)
    check(panel._grad_panel_kernel, dtype, lean._fixed_fwd(1 << 20, 512), panel._CONFIGS, consts,
          g_dtype=dtype, no_spills=True)


@pytest.mark.parametrize("dtype,precision", [("bf16", "tf32"), ("fp32", "tf32x3")])
def test_fast_kernels_build(dtype, precision):
    fixed = fast.fixed_fwd_config(1 << 14, 512)
    check(fast._fast_fwd_kernel, dtype, fixed, fast._FWD_CONFIGS, dict(UPCAST=False, PRECISION=precision),
          no_spills=True)
    for bm, bn in {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in fast._FWD_CONFIGS}:
        k = build(fast._fast_grad_kernel, {"y_ptr": "bf16", "g_ptr": "bf16"},
                  dict(BLOCK_M=bm, BLOCK_N=bn, SUB_M=32), 4, 1)
        assert k.metadata.shared <= SMEM_LIMIT


def _registers_by_tile(kernel, configs, consts: dict, pointers: dict) -> dict:
    """{(BLOCK_M, BLOCK_N): [registers a thread of each 8-warp config]}, bf16, B a multiple
    of 16; asserts that the 128×64 builds leave room for a second block (shared memory)."""
    regs = {}
    for cf in configs:
        if cf.num_warps != 8:
            continue
        k = build(kernel, pointers, {**cf.kwargs, **consts}, cf.num_warps, cf.num_stages)
        tile = (cf.kwargs["BLOCK_M"], cf.kwargs["BLOCK_N"])
        regs.setdefault(tile, []).append(registers(k))
        if tile == (128, 64):
            assert k.metadata.shared <= SMEM_LIMIT // 2, cf
    return regs


def test_rectangular_tiles_fit_two_blocks_an_sm():
    # Why the 128×64 configs of the fast forward and the Ĝ panel exist: at 8 warps their sm_90
    # builds need at most 128 registers a thread and half of an SM's shared memory, so two
    # blocks share an SM and one's epilogue overlaps the other's loads; the 128×128 tiles
    # need more than 128 (one block an SM).
    bf16 = {"q_ptr": "bf16", "k_ptr": "bf16", "y_ptr": "bf16", "g_ptr": "bf16"}
    fast_regs = _registers_by_tile(fast._fast_fwd_kernel, fast._FWD_CONFIGS,
                                   dict(UPCAST=False, PRECISION="tf32"), bf16)
    panel_regs = _registers_by_tile(panel._grad_panel_kernel, panel._CONFIGS,
                                    dict(UPCAST=False, PRECISION="tf32", SCALE_G=True, WRITE_PART=True), bf16)
    for regs in (fast_regs, panel_regs):
        assert max(regs[(128, 64)]) <= 128, regs
        assert min(regs[(128, 128)]) > 128, regs


def test_reduce_kernels_build():
    # The merge and scalar kernels (kernels/_contrastive_reduce.py): no spills, and the
    # scalars' divisions are correctly rounded (div.rn, not the approximate div.full that `/`
    # compiles to), as tests/test_kernels_reduce.py expects of coef.
    from kernels import _contrastive_reduce as reduce

    k = build(reduce._merge_lse_kernel, {}, dict(PARTS=reduce.MERGE_PARTS, BLOCK=reduce.MERGE_BLOCK), 4, 3,
              ragged=True)
    assert k.metadata.shared <= SMEM_LIMIT and spill_bytes(k) == 0
    for dtype in ("bf16", "fp16", "fp32"):
        pointers = {"img_ptr": dtype, "txt_ptr": dtype, "scale_ptr": dtype, "grad_ptr": "fp32"}
        k = build(reduce._fast_scalars_kernel, pointers, dict(BLOCK_B=32, BLOCK_D=128), 4, 3, ragged=True)
        assert spill_bytes(k) == 0
        assert "div.rn.f32" in k.asm["ptx"] and "div.full.f32" not in k.asm["ptx"]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_scale_kernel_builds(dtype):
    # The in-place scaling of the fast backward's products (kernels/_common.py), at its GPU
    # block size; the bf16 build rounds on the bits and must test for NaN first (a GPU's
    # NaN, 0x7FFFFFFF, would otherwise carry into the sign bit): a NaN compare is in the PTX.
    from kernels import _common

    k = build(_common._scale_kernel, {"x_ptr": dtype, "coef_ptr": "fp32"},
              dict(BLOCK=4096, BF16=dtype == "bf16"), 4, 3, ragged=True)
    assert spill_bytes(k) == 0
    if dtype == "bf16":
        assert re.search(r"setp\.(nan|neu)\.f32", k.asm["ptx"]), "no NaN test in the bf16 rounding"
