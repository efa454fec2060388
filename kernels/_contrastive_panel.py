"""Lean mode, panel backward: Ĝ built a row panel at a time, the products on the matrix units.

Notation as in ``_contrastive_lean`` (x = q·kᵀ, c = s·log2(e), z = c·x). The forward is the
lean forward (row and column LSE, nothing of S kept). The backward runs once per direction,
(q, k) = (img, txt) for dI and (txt, img) for dT, over panels of R consecutive q rows:

  1. ``_grad_panel_kernel`` (one matmul with an epilogue) recomputes the panel's scores and
     writes Ĝ_ij = 2^(z_ij − rowlse2_i) + 2^(z_ij − collse2_j) − 2·[i = j] into an [R, B]
     buffer — scaled by s·g/(2B) for bf16 and fp32 (bf16 has fp32's exponent range), plain
     for fp16 (the factor would push small entries under fp16's range);
  2. dq[panel] = G_panel · k through torch.mm (cuBLAS), straight into the rows of dq.

Every output row is written once, so there is nothing to accumulate between panels and no
atomics; Σ Ĝ∘x for the scale gradient comes from per-tile partials of the first direction,
kept across panels in one buffer and summed in a fixed order (deterministic). The products
run with fp32 split-K reductions (``full_precision_reduction``): K = B is long and Ĝ's rows
cancel.

Work: 2·B²·D per direction for the scores and 2·B²·D for the product: with the forward, the
10·B²·D floor of a lean loss. The fused backward (``_contrastive_lean``) keeps a [BLOCK_M,
D] accumulator in registers and must recompute the scores once per D-chunk when D is wide;
here the product leaves the registers, at the price of writing and reading the panel
(4 bytes a logit per direction).

Memory: the panel, PANEL_BYTES (56 MiB) or MIN_PANEL_ROWS rows of B, whichever is larger
(B ≤ 64k in bf16: 56 MiB; B = 1M: 256 rows, 512 MiB), plus B·D for the output gradient,
plus the tile partials of Σ Ĝ∘x (4·B²/(BLOCK_M·BLOCK_N) bytes, 0.5 MiB at 32k, at most
4 MiB: PART_SLOTS), plus a contiguous copy of k when its layout is neither row- nor
column-major.
"""

from __future__ import annotations

import torch

from ._common import (
    HAVE_TRITON,
    INTERPRET,
    dot_precisions,
    full_precision_reduction,
    launch_tuned,
    n_bucket,
    prune_by_dim,
    scaled_mm,
    tuned,
)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._contrastive_lean import _fixed_fwd, _score_tile


if HAVE_TRITON:

    # part_base changes from panel to panel: not specialised (on divisibility by 16), so
    # one compiled kernel serves every panel.
    @triton.jit(do_not_specialize=["part_base"])
    def _grad_panel_kernel(
        q_ptr,  # [B, D]: the panel is rows p0 .. p0 + rows - 1
        k_ptr,  # [B, D]
        scale_ptr, grad_ptr,  # 0-d: the logit scale s and the loss's upstream gradient
        lse_q_ptr,  # fp32 [B]: natural-log LSE of each q row over the k's
        lse_k_ptr,  # fp32 [B]: natural-log LSE of each k row over the q's
        g_ptr,  # [rows, B] out: Ĝ (times s·g/(2B) when SCALE_G)
        part_ptr,  # fp32 [part_base + n_programs] out: Σ Ĝ∘x over each tile (when WRITE_PART)
        rows, n, dim,
        p0,  # index of the panel's first row in q: the diagonal is at column p0 + row
        part_base,  # this panel's first slot in part (panels share the buffer)
        stride_qm, stride_qd, stride_kn, stride_kd, stride_gm,
        n_bucket,  # autotune key only
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        SCALE_G: tl.constexpr, WRITE_PART: tl.constexpr,
    ):
        # Row tiles vary fastest: the programs in flight share a few k tiles in L2.
        pid = tl.program_id(0)
        n_rt = tl.cdiv(rows, BLOCK_M)
        rt = pid % n_rt
        ct = pid // n_rt
        offs_m = rt.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of the panel
        offs_n = ct.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_q = p0 + offs_m  # the same rows in q
        mask_m = offs_m < rows
        mask_n = offs_n < n
        scale = tl.load(scale_ptr).to(tl.float32)
        x = _score_tile(
            q_ptr, k_ptr, offs_q, offs_n, mask_m, mask_n, dim,
            stride_qm, stride_qd, stride_kn, stride_kd,
            BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION,
        )  # [BLOCK_M, BLOCK_N] fp32
        z = x * (scale * 1.4426950408889634)
        lq = tl.load(lse_q_ptr + offs_q, mask=mask_m, other=0.0) * 1.4426950408889634
        lk = tl.load(lse_k_ptr + offs_n, mask=mask_n, other=0.0) * 1.4426950408889634
        g = tl.exp2(z - lq[:, None]) + tl.exp2(z - lk[None, :])
        g = tl.where(offs_q[:, None] == offs_n[None, :], g - 2.0, g)
        mask = mask_m[:, None] & mask_n[None, :]
        g = tl.where(mask, g, 0.0)
        if WRITE_PART:
            tl.store(part_ptr + part_base + pid, tl.sum(tl.sum(g * x, axis=1), axis=0))
        if SCALE_G:
            g = g * (scale * tl.load(grad_ptr).to(tl.float32) / (2.0 * n))
        tl.store(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :], g.to(g_ptr.dtype.element_ty), mask=mask)

    # Row tiles of 128 or 64 (the panel height is a multiple of 128). sm_90 builds (ptxas -v,
    # tests/test_kernels_sm90_build.py), registers a thread for B a multiple of 16 / ragged:
    # 128×128 at 8 warps 174 / 216–222, one block an SM; 128×64 at 8 warps 97–98 / 124, two
    # blocks an SM (shared memory permitting: 48–96 KiB a block), so one block's epilogue
    # (exp2, the store of Ĝ) overlaps another's loads and matrix work; 64×128 at 4 warps 128
    # / 247. No spills in any of them.
    _CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 32}, num_warps=8, num_stages=5),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    ]
    if not INTERPRET:
        # The kernel overwrites its outputs, so rerunning it while tuning is harmless.
        _grad_panel_tuned = triton.autotune(
            configs=_CONFIGS, key=["dim", "n_bucket"], prune_configs_by={"early_config_prune": prune_by_dim}
        )(_grad_panel_kernel)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

# Target size of the Ĝ panel. Taller panels give the [R, B]·[B, D] product more output
# tiles (fewer split-K reductions) and fewer launches; on an H100 (bench/kernel_table.py's
# sweep, B = 32k, D = 512, bf16) fwd+bwd took 94.5 / 49.9 / 28.2 / 17.0 ms with panels of
# 8 / 16 / 32 / 64 MiB. 56 MiB keeps the lean mode's extra memory under its 64 MiB target at
# 32k (the panel plus 0.3 MiB measured); unmeasured itself until the next GPU check.
PANEL_BYTES = 56 << 20
MIN_PANEL_ROWS = 256  # below this the [R, D] output of each product is too small to fill the GPU
ROW_ALIGN = 128  # panel heights are multiples of the largest BLOCK_M (full row tiles)


def panel_rows(n: int, elt: int) -> int:
    """Rows R of one panel for B = n and elt bytes a logit (at most n)."""
    rows = PANEL_BYTES // (n * elt) // ROW_ALIGN * ROW_ALIGN
    return min(n, max(rows, MIN_PANEL_ROWS))


# Tile partials of Σ Ĝ∘x are kept for many panels and summed in one go, at most this many.
PART_SLOTS = 1 << 20


def _panel_grad(q, k, scale, grad, lse_q, lse_k, write_part: bool):
    """dq = s·g/(2B)·Ĝ·k panel by panel; with write_part also Σ Ĝ∘x (0-d fp32).

    The panel loop runs on the host while the GPU works through the queue, so host work per
    panel must stay below the panel's kernels: one Triton launch and one product (two more
    ops for fp16). The kernel indexes q and the LSE by the panel's offset instead of taking
    slices, the autotuner is consulted for the first panel only, and the tile partials of
    Σ Ĝ∘x go to one buffer, summed in a fixed order when it fills (PART_SLOTS slots: one sum
    up to B ≈ 90k, about 64–128 sums at B = 1M). The H100 figures of session 20 fit
    125–180 µs a panel whatever its size, with 16k's wall time 1 ms above its kernel time:
    host-bound (bench/RESULTS.md)."""
    n, dim = q.shape
    upcast = INTERPRET and q.dtype == torch.bfloat16
    precision, _ = dot_precisions(q.dtype, q.is_cuda)
    scale_g = q.dtype != torch.float16
    rows_per = panel_rows(n, q.element_size())
    buf = torch.empty((rows_per, n), dtype=q.dtype, device=q.device)  # Ĝ of one panel
    dq = torch.empty((n, dim), dtype=q.dtype, device=q.device)
    # The panel's scores are tiled as the lean forward's are (its fixed configs, same sizes).
    cfg = None if tuned(n) else _fixed_fwd(n, dim)
    tiles = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in _CONFIGS] if cfg is None else [
        (cfg["BLOCK_M"], cfg["BLOCK_N"])]

    def n_tiles(rows, tile):
        return triton.cdiv(rows, tile[0]) * triton.cdiv(n, tile[1])

    # Room for the largest grid any config launches, at least; for every panel's partials
    # (B²/BLOCK² slots) up to PART_SLOTS.
    most = max(n_tiles(rows_per, t) for t in tiles)
    size = max(most, min(PART_SLOTS, triton.cdiv(n, rows_per) * most))
    part = torch.empty(size if write_part else 1, dtype=torch.float32, device=q.device)
    gx = torch.zeros((), dtype=torch.float32, device=q.device)
    used = 0  # slots of part holding partials not yet summed
    # cuBLAS takes row- or column-major k as it is; any other layout would be copied by
    # every product, so it is copied once here (the kernel itself reads any strides).
    k_mm = k if 1 in k.stride() else k.contiguous()
    coef = None if scale_g else scale.float() * grad.float() / (2.0 * n)
    consts = dict(UPCAST=upcast, PRECISION=precision, SCALE_G=scale_g, WRITE_PART=write_part)
    # The config of every panel: the fixed one, or the tuned one from the second panel on.
    chosen = {} if cfg is None else {None: cfg}
    with full_precision_reduction():
        for p0 in range(0, n, rows_per):
            rows = min(rows_per, n - p0)
            g = buf[:rows]
            if write_part and used + most > part.numel():
                gx += part[:used].sum()
                used = 0
            args = (q, k, scale, grad, lse_q, lse_k, g, part, rows, n, dim, p0, used if write_part else 0,
                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), g.stride(0), n_bucket(n))
            grid = lambda meta, rows=rows: (n_tiles(rows, (meta["BLOCK_M"], meta["BLOCK_N"])),)
            launched = launch_tuned(_grad_panel_tuned if not chosen else None, _grad_panel_kernel, chosen, None,
                                    grid, args, consts)
            used += grid(launched)[0]
            if scale_g:
                torch.mm(g, k_mm, out=dq[p0 : p0 + rows])
            else:  # fp16: the product of the unscaled Ĝ, scaled in fp32
                dq[p0 : p0 + rows] = scaled_mm(g, k_mm, coef, q.dtype)
    if write_part:
        gx += part[:used].sum()
    return dq, gx


def panel_backward(img, txt, scale, grad, row_lse, col_lse):
    """Returns (dI, dT, ds) for the upstream gradient ``grad`` (0-d)."""
    n = img.shape[0]
    d_img, gx = _panel_grad(img, txt, scale, grad, row_lse, col_lse, write_part=True)
    d_txt, _ = _panel_grad(txt, img, scale, grad, col_lse, row_lse, write_part=False)
    d_scale = gx * grad.float() / (2.0 * n)  # ∂L/∂s = Σ Ĝ∘x / (2B), x = I·Tᵀ
    return d_img, d_txt, d_scale.to(scale.dtype)
