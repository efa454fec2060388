"""Lean mode of the fused contrastive loss: S = s·I·Tᵀ is never stored (memory O(B·D)).

Notation: q, k are the two [B, D] embedding matrices (img, txt or txt, img), x = q·kᵀ the raw
dot products (fp32 accumulation), c = s·log2(e), z = c·x = S·log2(e) (log2 units, so every
exponential is one exp2).

Forward (one pass over the S tiles, ``_lean_fwd_kernel``): a grid of P persistent programs;
program p owns row blocks p, p+P, ... and streams over all column tiles of each, keeping
  * the row statistics of its current row block (online max / sum) → row LSE, and the
    diagonal S_ii taken from the tile that holds it;
  * the log2-sum-exp2 of each column over the rows it has seen, in its own row of a [P, B]
    scratch (read-modify-write per tile; no other program touches that row).
The P partial column LSEs are merged afterwards in a fixed order. No atomics, so the result
is bitwise reproducible; extra memory is 4·P·B bytes. P is PROGS_PER_SM programs per SM
(a config parameter: configs small enough for several blocks an SM run that many on each),
at most one per row block.

Backward (``_lean_bwd_kernel``, launched once per direction): with
Ĝ = P + Q − 2·Id (P row softmax, Q column softmax), G = Ĝ·g/(2B),
    dq = s·G·k        (one program per block of q rows and per D-chunk of dq; recomputes S)
and, for the ds term, Σ_ij Ĝ_ij x_ij = Σ_i <(Ĝ·k)_i, q_i>, accumulated per row from the
fp32 accumulator. Launched with (q, k) = (img, txt) it yields dI and ds, with
(q, k) = (txt, img) it yields dT (Ĝ is symmetric in the roles of rows and columns).
"""

from __future__ import annotations

import torch

from ._common import (
    HAVE_TRITON,
    INTERPRET,
    TINY_B,
    dot_precisions,
    launch_tuned,
    n_bucket,
    next_pow2,
    prune_by_dim,
    tune_key,
    tuned,
)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._contrastive_reduce import merge_lse

if HAVE_TRITON:

    @triton.jit
    def _score_tile(
        q_ptr, k_ptr, offs_m, offs_n, mask_m, mask_n, dim,
        stride_qm, stride_qd, stride_kn, stride_kd,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """x = q[offs_m] · k[offs_n]ᵀ, fp32 [BLOCK_M, BLOCK_N] (padding rows/cols are 0)."""
        x = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < dim
            a = tl.load(
                q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0,
            )  # [BLOCK_M, BLOCK_D]
            b = tl.load(
                k_ptr + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                mask=mask_d[:, None] & mask_n[None, :], other=0.0,
            )  # [BLOCK_D, BLOCK_N]
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            x = tl.dot(a, b, x, input_precision=PRECISION)
        return x

    @triton.jit
    def _lean_fwd_kernel(
        q_ptr, k_ptr, scale_ptr,
        row_lse_ptr,  # fp32 [B] out: natural-log LSE of each row of S
        diag_ptr,  # fp32 [B] out: S_ii
        col_ptr,  # fp32 [P, B] out: per-program column log2-sum-exp2
        n, dim,
        stride_qm, stride_qd, stride_kn, stride_kd,
        n_bucket,  # autotune key only
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        PROGS_PER_SM: tl.constexpr,  # read by the launcher's grid only
    ):
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        c = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
        n_row_blocks = tl.cdiv(n, BLOCK_M)
        n_col_tiles = tl.cdiv(n, BLOCK_N)
        stat_base = pid.to(tl.int64) * n
        for rb in range(pid, n_row_blocks, n_prog):
            offs_m = (rb * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            mask_m = offs_m < n
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max
            l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(z - m_i)
            d_i = tl.zeros([BLOCK_M], tl.float32)  # z_ii
            seen = rb != pid  # this program's scratch holds earlier partials
            for ct in range(0, n_col_tiles):
                offs_n = (ct * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
                mask_n = offs_n < n
                x = _score_tile(
                    q_ptr, k_ptr, offs_m, offs_n, mask_m, mask_n, dim,
                    stride_qm, stride_qd, stride_kn, stride_kd,
                    BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION,
                )
                z = tl.where(mask_m[:, None] & mask_n[None, :], x * c, float("-inf"))
                # Row statistics, online over column tiles.
                m_new = tl.maximum(m_i, tl.max(z, axis=1))
                l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), axis=1)
                m_i = m_new
                # Column LSE of this program: the tile's, merged into its scratch row.
                tb = tl.max(z, axis=0)  # [BLOCK_N] (-inf only for padding columns)
                t = tb + tl.log2(tl.sum(tl.exp2(z - tb[None, :]), axis=0))
                old = tl.load(col_ptr + stat_base + offs_n, mask=mask_n & seen, other=float("-inf"))
                top = tl.maximum(old, t)
                new = top + tl.log2(tl.exp2(old - top) + tl.exp2(t - top))
                tl.store(col_ptr + stat_base + offs_n, new, mask=mask_n)
                if (ct * BLOCK_N < (rb + 1) * BLOCK_M) & ((ct + 1) * BLOCK_N > rb * BLOCK_M):
                    on_diag = offs_m[:, None] == offs_n[None, :]
                    d_i += tl.sum(tl.where(on_diag, z, 0.0), axis=1)
            tl.store(row_lse_ptr + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask_m)
            tl.store(diag_ptr + offs_m, d_i * 0.6931471805599453, mask=mask_m)

    @triton.jit
    def _lean_bwd_kernel(
        q_ptr, k_ptr, scale_ptr, grad_ptr,
        lse_q_ptr,  # fp32 [B]: LSE of each q row over the k's (natural log)
        lse_k_ptr,  # fp32 [B]: LSE of each k row over the q's
        dq_ptr,  # [B, D] out, dtype of q
        qdot_ptr,  # fp32 [n_chunks, B] out: <(Ĝ·k)_i, q_i> over this program's D-chunk
        n, dim,
        stride_qm, stride_qd, stride_kn, stride_kd, stride_gm, stride_gd,
        n_bucket,  # autotune key only
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_V: tl.constexpr,  # width of the dq chunk of one program
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
        WRITE_QDOT: tl.constexpr,
    ):
        pid_m = tl.program_id(0).to(tl.int64)
        pid_v = tl.program_id(1)
        scale = tl.load(scale_ptr).to(tl.float32)
        c = scale * 1.4426950408889634
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n
        lse_q = tl.load(lse_q_ptr + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < dim
        acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)  # Ĝ·k for this D-chunk
        for kt in range(0, tl.cdiv(n, BLOCK_N)):
            offs_n = (kt * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
            mask_n = offs_n < n
            x = _score_tile(
                q_ptr, k_ptr, offs_m, offs_n, mask_m, mask_n, dim,
                stride_qm, stride_qd, stride_kn, stride_kd,
                BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION,
            )
            z = x * c
            lse_k = tl.load(lse_k_ptr + offs_n, mask=mask_n, other=0.0) * 1.4426950408889634
            g = tl.exp2(z - lse_q[:, None]) + tl.exp2(z - lse_k[None, :])
            g = tl.where(offs_m[:, None] == offs_n[None, :], g - 2.0, g)
            g = tl.where(mask_m[:, None] & mask_n[None, :], g, 0.0)
            kv = tl.load(
                k_ptr + offs_n[:, None] * stride_kn + offs_v[None, :] * stride_kd,
                mask=mask_n[:, None] & mask_v[None, :], other=0.0,
            )  # [BLOCK_N, BLOCK_V]
            if UPCAST:
                kv = kv.to(tl.float32)
            acc = tl.dot(g.to(kv.dtype), kv, acc, input_precision=GRAD_PRECISION)
        coef = scale * tl.load(grad_ptr).to(tl.float32) / (2.0 * n)
        tl.store(
            dq_ptr + offs_m[:, None] * stride_gm + offs_v[None, :] * stride_gd,
            (acc * coef).to(dq_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_v[None, :],
        )
        if WRITE_QDOT:
            qv = tl.load(
                q_ptr + offs_m[:, None] * stride_qm + offs_v[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_v[None, :], other=0.0,
            ).to(tl.float32)
            tl.store(qdot_ptr + pid_v * n + offs_m, tl.sum(acc * qv, axis=1), mask=mask_m)

    # PROGS_PER_SM: programs an SM runs at once, as registers and shared memory allow (sm_90
    # builds, B a multiple of 16 / ragged): 209 / 247 registers a thread for 128×128 tiles at
    # 8 warps, 183 / 195 for 128×64, one block an SM; 64×64 at 4 warps 139–146 / 146–195,
    # three blocks of 128 threads (32–48 KiB of shared memory each), so one block's epilogue
    # overlaps another's matrix work. (128×128 at 4 warps now spills: dropped.)
    _FWD_CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64, "PROGS_PER_SM": 1}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64, "PROGS_PER_SM": 1}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "PROGS_PER_SM": 1}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "PROGS_PER_SM": 3}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32, "PROGS_PER_SM": 3}, num_warps=4, num_stages=4),
    ]
    # Register budget (sm_90 builds, 255 registers a thread): the [BLOCK_M, BLOCK_V] fp32
    # accumulator lives in registers next to an S tile, so wide D-chunks spill; narrow
    # ones recompute S once per chunk. Tuning picks the balance per (D, B bucket).
    _BWD_CONFIGS = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 64, "BLOCK_V": 256}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_V": 256}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_V": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_V": 512}, num_warps=8, num_stages=1),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32, "BLOCK_V": 128}, num_warps=4, num_stages=2),
    ]
    if not INTERPRET:
        _lean_fwd_tuned = triton.autotune(
            configs=_FWD_CONFIGS, key=["dim", "n_bucket"], prune_configs_by={"early_config_prune": prune_by_dim}
        )(_lean_fwd_kernel)
        # The kernel overwrites its outputs, so rerunning it while tuning is harmless.
        _lean_bwd_tuned = triton.autotune(
            configs=_BWD_CONFIGS, key=["dim", "n_bucket"], prune_configs_by={"early_config_prune": prune_by_dim}
        )(_lean_bwd_kernel)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

def _fixed_fwd(n: int, dim: int) -> dict:
    if INTERPRET:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=min(128, max(16, next_pow2(dim))), num_warps=4)
    if n <= TINY_B:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=min(64, max(16, next_pow2(dim))), num_warps=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=min(64, max(16, next_pow2(dim))), num_warps=8, num_stages=3)


def _fixed_bwd(n: int, dim: int) -> dict:
    cfg = _fixed_fwd(n, dim)
    if INTERPRET:
        cfg.update(BLOCK_V=min(128, max(16, next_pow2(dim))))
    elif n <= TINY_B:  # 8 warps and 32-wide D steps: the sm_90 builds then spill nothing
        # (4 warps spilled 280 B for bf16 and about 2 KB for fp32)
        cfg.update(BLOCK_D=min(32, max(16, next_pow2(dim))), BLOCK_V=min(256, max(16, next_pow2(dim))),
                   num_warps=8)
    else:  # B past TINY_B untuned (B >= HUGE_B, or deterministic algorithms: _common.tuned):
        # a config that builds for sm_90 without register spills
        cfg.update(BLOCK_M=64, BLOCK_N=32, BLOCK_V=min(256, max(16, next_pow2(dim))), num_warps=8, num_stages=2)
    return cfg


def _num_sms(device: torch.device) -> int:
    """SMs of the device (the persistent grid's unit); 4 off CUDA (interpreter: a few
    programs, so that the scratch merge is exercised)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _fwd_programs(n: int, sms: int, block_m: int, progs_per_sm: int) -> int:
    """Persistent programs of the forward: PROGS_PER_SM per SM, but no more than there are
    row blocks (every program must own one: its scratch row is then written)."""
    return max(1, min(sms * progs_per_sm, triton.cdiv(n, block_m)))


# (D, B bucket, dtypes, device) → the config the autotuner chose for the forward, as in
# ``_contrastive_fast._TUNED``: later calls of a tuned size launch it without the autotuner.
_TUNED: dict[tuple, dict] = {}


def lean_forward(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor):
    """Returns (loss 0-d fp32, row_lse fp32 [B], col_lse fp32 [B]).

    Scratch: the [P, B] column LSEs, 4·P·B bytes (17 MiB at B = 32k on 132 SMs, one
    program each; sized for the config with the most programs on the first call of a tuned
    size, while the autotuner times them all)."""
    n, dim = img.shape
    upcast = INTERPRET and img.dtype == torch.bfloat16
    precision, _ = dot_precisions(img.dtype, img.is_cuda)
    dev = img.device
    sms = _num_sms(dev)
    key = tune_key(img, txt, scale)
    chosen = _TUNED if tuned(n) else {key: {**_fixed_fwd(n, dim), "PROGS_PER_SM": 1}}
    configs = [c.kwargs for c in _FWD_CONFIGS] if key not in chosen else [chosen[key]]
    grid = lambda meta: (_fwd_programs(n, sms, meta["BLOCK_M"], meta["PROGS_PER_SM"]),)
    row_lse = torch.empty(n, dtype=torch.float32, device=dev)
    diag = torch.empty(n, dtype=torch.float32, device=dev)
    col = torch.empty((max(grid(c)[0] for c in configs), n), dtype=torch.float32, device=dev)
    args = (img, txt, scale, row_lse, diag, col, n, dim,
            img.stride(0), img.stride(1), txt.stride(0), txt.stride(1), n_bucket(n))
    cfg = launch_tuned(_lean_fwd_tuned if key not in chosen else None, _lean_fwd_kernel, chosen, key, grid, args,
                       dict(UPCAST=upcast, PRECISION=precision))
    # Merge the column LSEs of the programs that ran (the chosen config's) in a fixed order;
    # the row LSEs are final (0 parts).
    col_lse = torch.empty(n, dtype=torch.float32, device=dev)
    loss = merge_lse(row_lse, 0, col, grid(cfg)[0], row_lse, col_lse, diag)
    return loss, row_lse, col_lse


def _lean_grad(q, k, scale, grad, lse_q, lse_k, write_qdot: bool):
    n, dim = q.shape
    upcast = INTERPRET and q.dtype == torch.bfloat16
    precision, grad_precision = dot_precisions(q.dtype, q.is_cuda)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    # qdot has one row per D-chunk; sized for the smallest chunk any config may use.
    max_chunks = triton.cdiv(dim, 16)
    qdot = torch.zeros((max_chunks if write_qdot else 1, n), dtype=torch.float32, device=q.device)
    args = (q, k, scale, grad, lse_q, lse_k, dq, qdot, n, dim,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), dq.stride(0), dq.stride(1), n_bucket(n))
    consts = dict(UPCAST=upcast, PRECISION=precision, GRAD_PRECISION=grad_precision, WRITE_QDOT=write_qdot)
    if tuned(n):
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(dim, meta["BLOCK_V"]))
        _lean_bwd_tuned[grid](*args, **consts)
        block_v = _lean_bwd_tuned.best_config.kwargs["BLOCK_V"]
    else:
        cfg = _fixed_bwd(n, dim)
        grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(dim, cfg["BLOCK_V"]))
        _lean_bwd_kernel[grid](*args, **consts, **cfg)
        block_v = cfg["BLOCK_V"]
    # Only the rows of the config that ran last are valid (tuning runs wrote others).
    return dq, qdot[: triton.cdiv(dim, block_v)]


def lean_backward(img, txt, scale, grad, row_lse, col_lse):
    """Returns (dI, dT, ds) for the upstream gradient ``grad`` (0-d)."""
    n = img.shape[0]
    d_img, qdot = _lean_grad(img, txt, scale, grad, row_lse, col_lse, write_qdot=True)
    d_txt, _ = _lean_grad(txt, img, scale, grad, col_lse, row_lse, write_qdot=False)
    d_scale = qdot.sum() * grad.float() / (2.0 * n)
    return d_img, d_txt, d_scale.to(scale.dtype)
