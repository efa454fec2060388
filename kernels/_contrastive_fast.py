"""Fast mode of the fused contrastive loss: S stored once, 2 bytes a logit.

Notation as in ``_contrastive_lean``: x = I·Tᵀ (fp32 accumulation), z = s·log2(e)·x.

Forward, part 1 (``_fast_fwd_kernel``, the one matmul of the forward): every program
computes one BLOCK_M×BLOCK_N tile of z and, in its epilogue,
  * the tile's row max a_i and column max b_j (fp32, [n_col_tiles, B] and [n_row_tiles,
    B]), reference points kept until part 2 (fp32, so that each maximum is stored as
    y = 0 exactly);
  * the tile's partial row and column log2-sum-exp2 (fp32, same shapes), merged into the
    row / column LSE and the loss right after the kernel, in one launch (``merge_lse`` in
    ``_contrastive_reduce``), and freed;
  * y_ij = z_ij − min(a_i, b_j), stored in bf16.
Storing y instead of z keeps the logits that matter accurate: an entry with a
non-negligible row (column) softmax weight lies within a few units of its row (column)
max, hence of a_i (b_j), and |y| is small, so its bf16 rounding error is small too; a raw
bf16 z would carry an absolute error of up to |z|·2⁻⁸, 0.5 at s = 100.

Forward, part 2 (``_fast_grad_kernel``, elementwise, in place; only when a gradient is
needed): z = y + min(a_i, b_j), Ĝ = 2^(z − rowlse2_i) + 2^(z − collse2_j) − 2·Id
overwrites y (bf16; an fp16 view for fp16 inputs), with per-block partials of Σ Ĝ∘z for
the scale gradient. Ĝ does not depend on the upstream gradient, so it is computed here,
inside the forward op's own buffer: the backward only reads what the forward saved, which
lets torch.compile keep the buffer in place (a backward that overwrote a saved tensor would
make Inductor copy it first: 2·B² more bytes and a pass over them) and allows a second
backward (``retain_graph=True``).

Backward (``fast_backward``): dI = c·(Ĝ·T), dT = c·(Ĝᵀ·I) with c = s·g/(2B), two products
on the matrix units through torch.matmul (Ĝᵀ is a transposed view, no copy), each scaled
in place by c in fp32 (``scaled_mm``); c and ds = g/(2B)·Σ Ĝ∘x (from the saved Σ Ĝ∘z)
come from one single-program kernel (``fast_scalars``). Three matmuls in all; for bf16 / fp16
inputs a forward + backward is six Triton launches, two cuBLAS products and two sums (fp32
inputs add a cast of each operand to Ĝ's dtype and an fp32 scaling of each product).

Memory: 2·B² bytes for S / Ĝ, plus 8·B²·(1/BLOCK_M + 1/BLOCK_N) bytes of references and
partial sums during the forward only (``fast_forward``): 2.125·B² at the forward's peak
with 128×128 tiles, 2.19·B² with 128×64. The backward keeps the 2·B² and adds the two
gradients, B·D each in the inputs' dtype (fp32 inputs: an fp32 copy of each product too).
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
    tune_key,
    tuned,
)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._contrastive_lean import _fixed_fwd, _score_tile
    from ._contrastive_reduce import fast_scalars, merge_lse

if HAVE_TRITON:

    @triton.jit
    def _fast_fwd_kernel(
        q_ptr, k_ptr, scale_ptr,
        y_ptr,  # bf16 [B, B] out: z - min(a_i, b_j)
        rref_ptr,  # fp32 [n_col_tiles, B] out: a, each row's max over one column tile
        cref_ptr,  # fp32 [n_row_tiles, B] out: b, each column's max over one row tile
        rpart_ptr,  # fp32 [n_col_tiles, B] out: each row's log2-sum-exp2 over one column tile
        cpart_ptr,  # fp32 [n_row_tiles, B] out: each column's log2-sum-exp2 over one row tile
        diag_ptr,  # fp32 [B] out: S_ii
        n, dim,
        stride_qm, stride_qd, stride_kn, stride_kd, stride_ym,
        n_bucket,  # autotune key only
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # Grouped tile order: GROUP_M row tiles share the column tiles in L2.
        pid = tl.program_id(0)
        n_rt = tl.cdiv(n, BLOCK_M)
        n_ct = tl.cdiv(n, BLOCK_N)
        group = GROUP_M * n_ct
        first_m = (pid // group) * GROUP_M
        group_m = tl.minimum(n_rt - first_m, GROUP_M)
        rt = first_m + (pid % group) % group_m
        ct = (pid % group) // group_m
        offs_m = rt.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = ct.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < n
        mask_n = offs_n < n
        c = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
        x = _score_tile(
            q_ptr, k_ptr, offs_m, offs_n, mask_m, mask_n, dim,
            stride_qm, stride_qd, stride_kn, stride_kd,
            BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION,
        )
        mask = mask_m[:, None] & mask_n[None, :]
        z = tl.where(mask, x * c, float("-inf"))  # [BLOCK_M, BLOCK_N]
        a = tl.max(z, axis=1)  # [BLOCK_M] tile row max
        b = tl.max(z, axis=0)  # [BLOCK_N] tile column max
        rpart = a + tl.log2(tl.sum(tl.exp2(z - a[:, None]), axis=1))
        cpart = b + tl.log2(tl.sum(tl.exp2(z - b[None, :]), axis=0))
        ref = tl.minimum(a[:, None], b[None, :])  # exact for the maxima: their y is 0
        tl.store(
            y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
            (z - ref).to(y_ptr.dtype.element_ty), mask=mask,
        )
        tl.store(rref_ptr + ct.to(tl.int64) * n + offs_m, a, mask=mask_m)
        tl.store(rpart_ptr + ct.to(tl.int64) * n + offs_m, rpart, mask=mask_m)
        tl.store(cref_ptr + rt.to(tl.int64) * n + offs_n, b, mask=mask_n)
        tl.store(cpart_ptr + rt.to(tl.int64) * n + offs_n, cpart, mask=mask_n)
        lo = ct * BLOCK_N  # the tile's columns are [lo, lo + BLOCK_N)
        if (rt * BLOCK_M < lo + BLOCK_N) & ((rt + 1) * BLOCK_M > lo):  # the tile crosses the diagonal
            d = tl.sum(tl.where(offs_m[:, None] == offs_n[None, :], z, 0.0), axis=1)
            own = mask_m & (offs_m >= lo) & (offs_m < lo + BLOCK_N)  # rows whose S_ii lies here
            tl.store(diag_ptr + offs_m, d * 0.6931471805599453, mask=own)

    @triton.jit
    def _fast_grad_kernel(
        y_ptr,  # bf16 [B, B] in: z - min(a_i, b_j)
        g_ptr,  # [B, B] out, the same memory as y (bf16 or fp16 view): Ĝ
        rref_ptr, cref_ptr,  # fp32 [n_col_tiles, B], [n_row_tiles, B]
        row_lse_ptr, col_lse_ptr,  # fp32 [B] natural-log LSE
        part_ptr,  # fp32 [n_programs] out: Σ Ĝ∘z over the program's block
        n, stride_ym,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # the forward's tile (the references' granularity)
        SUB_M: tl.constexpr,  # rows per program (divides BLOCK_M; keeps registers in check)
    ):
        pid = tl.program_id(0)
        n_ct = tl.cdiv(n, BLOCK_N)
        rb = pid // n_ct  # block of SUB_M rows
        ct = pid % n_ct
        rt = (rb * SUB_M) // BLOCK_M
        offs_m = rb.to(tl.int64) * SUB_M + tl.arange(0, SUB_M)
        offs_n = ct.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < n
        mask_n = offs_n < n
        mask = mask_m[:, None] & mask_n[None, :]
        ptrs = offs_m[:, None] * stride_ym + offs_n[None, :]
        y = tl.load(y_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(rref_ptr + ct.to(tl.int64) * n + offs_m, mask=mask_m, other=0.0)
        b = tl.load(cref_ptr + rt.to(tl.int64) * n + offs_n, mask=mask_n, other=0.0)
        z = y + tl.minimum(a[:, None], b[None, :])
        rl = tl.load(row_lse_ptr + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        cl = tl.load(col_lse_ptr + offs_n, mask=mask_n, other=0.0) * 1.4426950408889634
        g = tl.exp2(z - rl[:, None]) + tl.exp2(z - cl[None, :])
        g = tl.where(offs_m[:, None] == offs_n[None, :], g - 2.0, g)
        g = tl.where(mask, g, 0.0)
        tl.store(part_ptr + pid, tl.sum(tl.sum(g * z, axis=1), axis=0))
        tl.store(g_ptr + ptrs, g.to(g_ptr.dtype.element_ty), mask=mask)

    # 8 warps for the 128×128 tiles: at 4 warps their epilogue spills registers in the
    # sm_90 builds (20–24 bytes for B a multiple of 16, about 1 KB for a ragged B), and at 8
    # they need 223–238 registers a thread, so one block fills an SM and nothing overlaps
    # its epilogue (exp2, reductions, the store of y) with loads and matrix work. The
    # 128×64 tiles need 122–124 registers at 8 warps and 168 at 4 (ptxas, B a multiple of
    # 16), so two or three blocks share an SM; they cost more loads per logit and more
    # scratch (see fast_forward). The autotuner picks per (D, B bucket).
    _FWD_CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 32, "GROUP_M": 8}, num_warps=8, num_stages=5),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 32, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64, "GROUP_M": 16}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 32, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    ]
    if not INTERPRET:
        _fast_fwd_tuned = triton.autotune(
            configs=_FWD_CONFIGS, key=["dim", "n_bucket"], prune_configs_by={"early_config_prune": prune_by_dim}
        )(_fast_fwd_kernel)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

# (D, B bucket, dtypes, device) → the config the autotuner chose for the forward (all its
# launch kwargs); filled by the first call of each tuned size and kept for the process:
# clearing the autotuner's own cache does not make the forward tune again, clearing this does.
_TUNED: dict[tuple, dict] = {}


def fixed_fwd_config(n: int, dim: int) -> dict:
    """Launch config of the forward when B = n is not autotuned (``tuned``): the lean
    forward's tiles (``_fixed_fwd``) in grouped order."""
    return {"num_stages": 3, **_fixed_fwd(n, dim), "GROUP_M": 8}


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved Ĝ: fp16 for fp16 inputs (the products' operand type), else bf16."""
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def fast_forward(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, need_grad: bool):
    """Returns (loss, row_lse, col_lse, g, gz): g = Ĝ [B, B] (``grad_dtype``) and gz = Σ Ĝ∘z
    (0-d fp32) when ``need_grad``, else empty tensors (S is then freed on return).

    Scratch during the forward, beyond S: per tile, an fp32 reference and an fp32 partial
    for each of its rows and columns, 8·B²·(1/BLOCK_M + 1/BLOCK_N) bytes: 0.125·B² for
    128×128 tiles, 0.19·B² for 128×64. The first call of a tuned size allocates for the
    smallest tiles any config may run while the autotuner times them; later calls launch the
    chosen config directly (``_TUNED``), with scratch for its tiles and no autotuner in the
    way."""
    n, dim = img.shape
    dev = img.device
    upcast = INTERPRET and img.dtype == torch.bfloat16
    precision, _ = dot_precisions(img.dtype, img.is_cuda)
    key = tune_key(img, txt, scale)
    chosen = _TUNED if tuned(n) else {key: fixed_fwd_config(n, dim)}
    cfg = chosen.get(key)  # None: the first call of a tuned size
    tiles = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in _FWD_CONFIGS] if cfg is None else [
        (cfg["BLOCK_M"], cfg["BLOCK_N"])]
    n_rt = max(triton.cdiv(n, t[0]) for t in tiles)  # rows of the column statistics
    n_ct = max(triton.cdiv(n, t[1]) for t in tiles)  # rows of the row statistics
    y = torch.empty((n, n), dtype=torch.bfloat16, device=dev)
    rref = torch.empty((n_ct, n), dtype=torch.float32, device=dev)
    cref = torch.empty((n_rt, n), dtype=torch.float32, device=dev)
    rpart = torch.empty((n_ct, n), dtype=torch.float32, device=dev)
    cpart = torch.empty((n_rt, n), dtype=torch.float32, device=dev)
    diag = torch.empty(n, dtype=torch.float32, device=dev)
    args = (img, txt, scale, y, rref, cref, rpart, cpart, diag, n, dim,
            img.stride(0), img.stride(1), txt.stride(0), txt.stride(1), y.stride(0),
            n_bucket(n))
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    cfg = launch_tuned(_fast_fwd_tuned if cfg is None else None, _fast_fwd_kernel, chosen, key, grid, args,
                       dict(UPCAST=upcast, PRECISION=precision))
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    row_lse = torch.empty(n, dtype=torch.float32, device=dev)
    col_lse = torch.empty(n, dtype=torch.float32, device=dev)
    # Only the rows written by the config that ran last are valid (tuning runs wrote others).
    loss = merge_lse(rpart, triton.cdiv(n, block_n), cpart, triton.cdiv(n, block_m), row_lse, col_lse, diag)
    del rpart, cpart
    if not need_grad:
        return loss, row_lse, col_lse, y.new_empty((0, 0)), diag.new_zeros(())
    sub_m = 32  # rows a program of the gradient pass; every tile height is a multiple
    assert block_m % sub_m == 0, f"BLOCK_M = {block_m} is not a multiple of {sub_m}"
    g = y if grad_dtype(img.dtype) == torch.bfloat16 else y.view(torch.float16)
    n_prog = triton.cdiv(n, sub_m) * triton.cdiv(n, block_n)
    part = torch.empty(n_prog, dtype=torch.float32, device=dev)
    _fast_grad_kernel[(n_prog,)](
        y, g, rref, cref, row_lse, col_lse, part, n, y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, SUB_M=sub_m, num_warps=4,
    )
    return loss, row_lse, col_lse, g, part.sum()  # fixed-order sum: deterministic


def fast_backward(g, gz, img, txt, scale, grad):
    """dI, dT by two matmuls over the saved Ĝ (read only), ds from Σ Ĝ∘z. Returns (dI, dT, ds).

    One program for the scalars (coef = s·g/(2B) and ds, on the device: no host sync;
    ``_contrastive_reduce``), then each product and its scaling: five launches for bf16 /
    fp16 inputs (``scaled_mm``)."""
    coef, d_scale = fast_scalars(gz, scale, grad, img, txt)
    with full_precision_reduction():  # K = B: no half-precision split-K partial sums
        d_img = scaled_mm(g, txt, coef, img.dtype)
        d_txt = scaled_mm(g.T, img, coef, txt.dtype)
    return d_img, d_txt, d_scale.to(scale.dtype)
