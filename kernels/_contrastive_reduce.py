"""Small kernels that finish the contrastive loss: one launch where torch needs a dozen ops.

Both are tiny in work (O(B) or O(B·D) bytes) but sat on the critical path as chains of
small torch ops, each a launch of a few microseconds of host time and an idle gap on the
GPU: the fast mode ran about 40 of them per forward + backward, around its four big
kernels. Each is deterministic (fixed summation order, no atomics).

``merge_lse`` (``_merge_lse_kernel``, grid [⌈B/BLOCK⌉, 2], side 0 the rows, side 1 the
columns). The forward kernels leave log2-sum-exp2 partials of the row and column LSEs,
[n_parts, B] fp32 (one row per tile of the fast forward, per persistent program of the
lean one). Each program merges a block of BLOCK columns of one side, streaming PARTS rows
at a time with a running max m and sum l (l ← l·2^(m − m') + Σ 2^(part − m')):
    LSE = ln 2 · (m + log2 l)          (natural log, stored)
and writes the block's share of the loss,
    side 0: Σ_i (LSE_i^row − 2·S_ii) / (2B),    side 1: Σ_j LSE_j^col / (2B),
so that L is one fixed-order sum of the [2, n_blocks] shares. n_parts = 0 on a side means
its LSE is already final (the lean forward's rows): it is read, not written.

``fast_scalars`` (``_fast_scalars_kernel``, one program). The fast backward's scalars:
    coef = s·g/(2B)                              (the factor of both gradient products)
    ds   = g/(2B) · Σ Ĝ∘x,  Σ Ĝ∘x = Σ Ĝ∘z / (s·log2 e),
with g the upstream gradient and Σ Ĝ∘z the forward's sum. At s = 0 every z is 0 and carries
nothing of x (and near it z loses its digits among fp32's subnormals, so |s·log2 e| < 2⁻⁶⁴
counts as 0, an error of that order); there P = Q = 1/B and Σ Ĝ∘x = (2/B)·<Σ_i I_i, Σ_j T_j> − 2·Σ_i <I_i, T_i>,
which the same program computes with fp32 sums (O(B·D) reads on one SM: slow, but s =
exp(logit scale) is never 0 in training; the branch costs nothing otherwise). Divisions are
correctly rounded (``div_rn``, not the approximate ``div.full`` that ``/`` compiles to);
torch's CUDA division by a Python scalar multiplies by its rounded reciprocal and may differ
from it by an ulp.
"""

from __future__ import annotations

import torch

from ._common import HAVE_TRITON, INTERPRET, next_pow2

if HAVE_TRITON:
    import triton
    import triton.language as tl

    # |s·log2 e| below this takes the s = 0 branch of fast_scalars: 2⁻⁶⁴, where c·x is still a
    # normal fp32 for any |x| ≥ 2⁻⁶² and the s = 0 value is exact to c·|x| relative
    TINY_C = tl.constexpr(2.0 ** -64)

if HAVE_TRITON:

    @triton.jit
    def _merge_side(part_ptr, n_parts, lse_ptr, offs_n, mask_n, n, PARTS: tl.constexpr, BLOCK: tl.constexpr):
        """Natural-log LSE of columns offs_n ([BLOCK] fp32) from part [n_parts, n]; stored
        to lse_ptr, or read from it when n_parts is 0."""
        if n_parts == 0:
            lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        else:
            m = tl.full([BLOCK], float("-inf"), tl.float32)
            acc = tl.zeros([BLOCK], tl.float32)
            for p0 in range(0, n_parts, PARTS):
                offs_p = p0 + tl.arange(0, PARTS)
                mask = (offs_p < n_parts)[:, None] & mask_n[None, :]
                # absent parts are -inf (weight 0); absent columns 0 (kept finite, never stored)
                t = tl.load(part_ptr + offs_p.to(tl.int64)[:, None] * n + offs_n[None, :], mask=mask,
                            other=float("-inf"))
                t = tl.where(mask_n[None, :], t, 0.0)  # [PARTS, BLOCK]
                m_new = tl.maximum(m, tl.max(t, axis=0))
                # -inf only while every part so far is -inf (none is, for finite inputs: each
                # tile or program covers a valid row and column); 0 then keeps exp2 off -inf - -inf
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                acc = acc * tl.exp2(m - m_ref) + tl.sum(tl.exp2(t - m_ref[None, :]), axis=0)
                m = m_new
            lse = (m + tl.log2(acc)) * 0.6931471805599453
            tl.store(lse_ptr + offs_n, lse, mask=mask_n)
        return lse

    # Sizes not specialised (on equality to 1 or divisibility by 16): they only bound masked
    # loads, and a dynamic B would otherwise compile several variants of each kernel.
    @triton.jit(do_not_specialize=["n", "n_rparts", "n_cparts"])
    def _merge_lse_kernel(
        rpart_ptr, cpart_ptr,  # fp32 [n_rparts, B], [n_cparts, B]: log2-sum-exp2 partials
        row_lse_ptr, col_lse_ptr,  # fp32 [B] out (in, for a side whose n_parts is 0)
        diag_ptr,  # fp32 [B]: S_ii
        share_ptr,  # fp32 [2, n_blocks] out: each block's share of the loss
        n, n_rparts, n_cparts,
        PARTS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        side = tl.program_id(1)
        offs_n = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask_n = offs_n < n
        if side == 0:
            lse = _merge_side(rpart_ptr, n_rparts, row_lse_ptr, offs_n, mask_n, n, PARTS, BLOCK)
            lse -= 2.0 * tl.load(diag_ptr + offs_n, mask=mask_n, other=0.0)
        else:
            lse = _merge_side(cpart_ptr, n_cparts, col_lse_ptr, offs_n, mask_n, n, PARTS, BLOCK)
        share = tl.sum(tl.where(mask_n, lse, 0.0), axis=0)
        tl.store(share_ptr + side * tl.num_programs(0) + pid, tl.math.div_rn(share, 2.0 * n))

    @triton.jit(do_not_specialize=["n", "dim"])
    def _fast_scalars_kernel(
        gz_ptr,  # fp32 0-d: Σ Ĝ∘z from the forward
        scale_ptr, grad_ptr,  # 0-d: s and the upstream gradient g
        img_ptr, txt_ptr,  # [B, D]: read only when s = 0
        coef_ptr, ds_ptr,  # fp32 0-d out: s·g/(2B) and ∂L/∂s
        n, dim,
        stride_im, stride_id, stride_tm, stride_td,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        s = tl.load(scale_ptr).to(tl.float32)
        g = tl.load(grad_ptr).to(tl.float32)
        two_n = 2.0 * n
        tl.store(coef_ptr, tl.math.div_rn(s * g, two_n))
        c = s * 1.4426950408889634
        # Below TINY_C, z = c·x has sunk towards fp32's subnormals (all precision gone at
        # c ≈ 1e-38, and gz / c then grows without bound: the sign flipped at s = 1e-40); the
        # s = 0 sums below differ from the exact Σ Ĝ∘x by O(c·|x|), nothing at that size
        if tl.abs(c) < TINY_C:
            cross = tl.zeros([BLOCK_D], tl.float32)  # Σ_d (Σ_i I_id)(Σ_j T_jd), by D-block
            trace = tl.zeros([BLOCK_D], tl.float32)  # Σ_d Σ_i I_id T_id, by D-block
            for d0 in range(0, dim, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < dim
                sum_i = tl.zeros([BLOCK_D], tl.float32)
                sum_t = tl.zeros([BLOCK_D], tl.float32)
                for b0 in range(0, n, BLOCK_B):
                    offs_b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
                    mask = (offs_b < n)[:, None] & mask_d[None, :]
                    a = tl.load(img_ptr + offs_b[:, None] * stride_im + offs_d[None, :] * stride_id, mask=mask,
                                other=0.0).to(tl.float32)
                    b = tl.load(txt_ptr + offs_b[:, None] * stride_tm + offs_d[None, :] * stride_td, mask=mask,
                                other=0.0).to(tl.float32)
                    sum_i += tl.sum(a, axis=0)
                    sum_t += tl.sum(b, axis=0)
                    trace += tl.sum(a * b, axis=0)
                cross += sum_i * sum_t
            gx = tl.math.div_rn(2.0 * tl.sum(cross, axis=0), 1.0 * n) - 2.0 * tl.sum(trace, axis=0)
        else:
            gx = tl.math.div_rn(tl.load(gz_ptr), c)
        tl.store(ds_ptr, tl.math.div_rn(gx * g, two_n))


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

MERGE_BLOCK = 64 if INTERPRET else 128  # columns a merge program: 2·⌈B/128⌉ programs, 256 at B = 16k
MERGE_PARTS = 32  # partial rows a merge step loads: [32, 128] fp32, 32 values a thread at 4 warps


def merge_lse(rpart, n_rparts: int, cpart, n_cparts: int, row_lse, col_lse, diag) -> torch.Tensor:
    """Merge the first n_rparts rows of rpart into row_lse and the first n_cparts rows of
    cpart into col_lse (a side with 0 parts keeps its LSE as given), and return the loss,
    0-d fp32. rpart / cpart: fp32 [≥ n_parts, B], contiguous rows; row_lse, col_lse, diag:
    fp32 [B]."""
    n = diag.shape[0]
    n_blocks = triton.cdiv(n, MERGE_BLOCK)
    share = torch.empty((2, n_blocks), dtype=torch.float32, device=diag.device)
    _merge_lse_kernel[(n_blocks, 2)](
        rpart, cpart, row_lse, col_lse, diag, share, n, n_rparts, n_cparts,
        PARTS=MERGE_PARTS, BLOCK=MERGE_BLOCK, num_warps=4,
    )
    return share.sum()  # a fixed-order sum: deterministic


def fast_scalars(gz, scale, grad, img, txt) -> tuple[torch.Tensor, torch.Tensor]:
    """(coef, ds), fp32 0-d each, for the fast backward (module docstring)."""
    n, dim = img.shape
    coef = torch.empty((), dtype=torch.float32, device=img.device)
    ds = torch.empty((), dtype=torch.float32, device=img.device)
    _fast_scalars_kernel[(1,)](
        gz, scale, grad, img, txt, coef, ds, n, dim,
        img.stride(0), img.stride(1), txt.stride(0), txt.stride(1),
        BLOCK_B=32, BLOCK_D=min(128, max(16, next_pow2(dim))), num_warps=4,
    )
    return coef, ds
