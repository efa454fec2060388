"""Streamed retrieval ranks: the rank of each query's true match, both directions.

Math (scores are plain dot products accumulated in fp32; the caller normalises):
    s[i, j] = <img[i], txt[j]>,  img: [Ni, D], txt: [Nt, D]
    txt_image: int64 [Nt], the image each text belongs to (default arange: 1:1 pairs)

    t2i[c] = #{k != txt_image[c] : s[k, c] >= s[txt_image[c], c]}
    i2t[i] = #{j : txt_image[j] != i and s[i, j] >= max_{c : txt_image[c] == i} s[i, c]}

Ranks are 0-indexed and ties count against the model, so a collapsed model (all scores
equal) ranks every query N-1 (Nt - #captions(i) for i2t with several captions), never 0.
An image's rank is that of its best-ranked caption. A NaN score counts against the model
too: a NaN positive gives the worst rank, a NaN competitor counts as beating the positive.

The positive score of a query always comes from the very same arithmetic as the other
scores of its row (it is read from the score tile in which it is computed), never from a
separate dot product whose rounding could differ. The reference accumulates in fp64 and
rounds each score once to fp32: a CPU fp32 matmul rounds one dot product differently by its
place in the output, so identical embeddings scored apart (5 copies of one random vector:
ranks 4, 4, 4, 4, 0). The Triton kernel relies on ``tl.dot`` rounding every element of a
tile alike, which the GPU's matrix instructions do and the interpreter's numpy matmul does
not (its tie tests use values whose products and sums are exact).

Contract:
  * every image must have at least one caption: ``ValueError`` otherwise (an image without
    a caption has no rank; silently returning -1 would skew a mean rank);
  * ``topk`` > 0 also returns the indices of the top-k scores of every query
    (i2t_topk int64 [Ni, k] into the texts, t2i_topk int64 [Nt, k] into the images; order
    among equal scores is unspecified), else None;
  * memory O(N·D) plus O(chunk·N) for the reference; the Triton kernel never stores the
    N×N score matrix.

Dispatch: CUDA tensors → Triton, CPU → reference, ``TRITON_INTERPRET=1`` → CPU tensors
through Triton; ``backend=`` overrides (see ``kernels._common``). Either runs with autocast
off (scores stay fp32 under a caller's bf16 autocast) and the inputs' CUDA device current.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._common import (
    HAVE_TRITON,
    INTERPRET,
    check_matrix,
    dot_precisions,
    int32_columns,
    next_pow2,
    on_device_of,
    prune_by_dim,
    resolve_backend,
)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._contrastive_lean import _score_tile

_OP = "retrieval_ranks"


class Ranks(NamedTuple):
    """Result of :func:`retrieval_ranks` (all int64, on the inputs' device)."""

    i2t: torch.Tensor  # [Ni] rank of each image's best caption among all texts
    t2i: torch.Tensor  # [Nt] rank of each text's image among all images
    i2t_topk: torch.Tensor | None  # [Ni, k] text indices of the k best scores, or None
    t2i_topk: torch.Tensor | None  # [Nt, k] image indices of the k best scores, or None


# ---------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _rank_rows_kernel(
        q_ptr,  # [n_q, dim] queries
        k_ptr,  # [n_k, dim] keys, sorted so that each query's own keys are contiguous
        own_lo_ptr,  # int64 [n_q]: first own key of each query
        own_hi_ptr,  # int64 [n_q]: one past the last own key of each query
        rank_ptr,  # int64 [n_q] output
        n_q,
        n_k,
        dim,
        stride_qm,
        stride_qd,
        stride_kn,
        stride_kd,
        n_bucket,  # autotune key only (power-of-two bucket of n_q * n_k)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,  # load bf16 as fp32 (the interpreter's bf16 dot is wrong)
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 inputs
    ):
        """One program ranks BLOCK_M queries by streaming over all key tiles.

        Phase 1 visits only the key tiles that hold the block's own keys and takes the best
        own score (the positive); phase 2 visits every key tile and counts the non-own keys
        scoring >= the positive. Both phases compute score tiles with the one _score_tile,
        so a positive is bitwise the value its competitors are compared in.
        """
        pid = tl.program_id(0).to(tl.int64)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n_q
        own_lo = tl.load(own_lo_ptr + offs_m, mask=mask_m, other=n_k)  # [BLOCK_M]
        own_hi = tl.load(own_hi_ptr + offs_m, mask=mask_m, other=0)  # [BLOCK_M]
        tile_lo = tl.min(own_lo, axis=0) // BLOCK_N
        tile_hi = (tl.max(own_hi, axis=0) + BLOCK_N - 1) // BLOCK_N
        n_own_tiles = (tile_hi - tile_lo).to(tl.int32)
        n_tiles = tl.cdiv(n_k, BLOCK_N)

        pos = tl.full([BLOCK_M], float("-inf"), tl.float32)  # best own score
        pos_nan = tl.zeros([BLOCK_M], tl.int32)  # 1 where an own score is NaN
        count = tl.zeros([BLOCK_M], tl.int32)
        for t in range(0, n_own_tiles + n_tiles):
            own_phase = t < n_own_tiles
            tile = tl.where(own_phase, tile_lo + t, t - n_own_tiles)
            offs_n = tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n_k
            s = _score_tile(  # fp32 scores of this tile [BLOCK_M, BLOCK_N] (the loss's own loop over D)
                q_ptr, k_ptr, offs_m, offs_n, mask_m, mask_n, dim, stride_qm, stride_qd, stride_kn, stride_kd,
                BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION,
            )
            own = (offs_n[None, :] >= own_lo[:, None]) & (offs_n[None, :] < own_hi[:, None])
            if own_phase:
                pos = tl.maximum(pos, tl.max(tl.where(own, s, float("-inf")), axis=1))
                is_nan = tl.where(own & (s != s), 1, 0)
                pos_nan = tl.maximum(pos_nan, tl.max(is_nan, axis=1))
            else:
                beat = (s >= pos[:, None]) | (s != s) | (pos_nan[:, None] > 0)
                beat = beat & (~own) & mask_n[None, :]
                count += tl.sum(beat.to(tl.int32), axis=1)
        tl.store(rank_ptr + offs_m, count.to(tl.int64), mask=mask_m)

    _RANK_CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    ]
    # Tuned per (dtype, D, size bucket); under the interpreter autotuning cannot run.
    _rank_rows_tuned = (
        None
        if INTERPRET
        else triton.autotune(
            configs=_RANK_CONFIGS,
            key=["dim", "n_bucket"],
            prune_configs_by={"early_config_prune": prune_by_dim},  # no D-step wider than D
        )(_rank_rows_kernel)
    )


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

# Below this many scores per direction a fixed small config beats autotuning (launch-bound).
_TINY_SCORES = 1 << 22


def _rank_rows_triton(
    q: torch.Tensor, k: torch.Tensor, own_lo: torch.Tensor, own_hi: torch.Tensor
) -> torch.Tensor:
    """Launch the rank kernel: ranks int64 [n_q] of q [n_q, D] against keys k [n_k, D]."""
    n_q, dim = q.shape
    n_k = k.shape[0]
    rank = torch.empty(n_q, dtype=torch.int64, device=q.device)
    upcast = INTERPRET and (q.dtype == torch.bfloat16 or k.dtype == torch.bfloat16)
    if q.dtype != k.dtype:  # mixed inputs: compute both in fp32
        q, k = q.float(), k.float()
    q, k = int32_columns(q), int32_columns(k)  # the D offsets are int32
    precision = dot_precisions(q.dtype, q.is_cuda)[0]  # the loss's score precision (3xTF32 for fp32)
    args = (q, k, own_lo, own_hi, rank, n_q, n_k, dim, q.stride(0), q.stride(1))
    args += (k.stride(0), k.stride(1), next_pow2(n_q * n_k).bit_length())
    if INTERPRET or n_q * n_k <= _TINY_SCORES:
        block = 32 if INTERPRET else 64
        block_d = min(64, max(16, next_pow2(dim)))
        grid = (triton.cdiv(n_q, block),)
        _rank_rows_kernel[grid](
            *args, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, UPCAST=upcast,
            PRECISION=precision, num_warps=4,
        )
    else:
        grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]),)
        _rank_rows_tuned[grid](*args, UPCAST=upcast, PRECISION=precision)
    return rank


def _topk_chunked(q: torch.Tensor, k: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices int64 [n_q, topk] of the top-k fp32 scores, chunk rows at a time."""
    chunk = max(1, (1 << 24) // k.shape[0])
    kf = k.float()
    return torch.cat(
        [(q[i : i + chunk].float() @ kf.T).topk(topk, dim=1).indices for i in range(0, q.shape[0], chunk)]
    )


def _ranks_triton(
    img: torch.Tensor, txt: torch.Tensor, txt_image: torch.Tensor, topk: int
) -> Ranks:
    """Both directions through the kernel. Texts are sorted by image first (if they are
    not already) so that every query's own keys are one contiguous range of key rows."""
    n_img = img.shape[0]
    perm = None
    if txt_image.shape[0] > 1 and not bool((txt_image[1:] >= txt_image[:-1]).all()):
        perm = torch.argsort(txt_image, stable=True)
        txt, txt_image = txt[perm], txt_image[perm]
    counts = torch.bincount(txt_image, minlength=n_img)  # captions per image
    first = torch.cumsum(counts, 0) - counts  # first caption row of each image
    i2t = _rank_rows_triton(img, txt, first, first + counts)
    t2i = _rank_rows_triton(txt, img, txt_image, txt_image + 1)
    i2t_top = t2i_top = None
    if topk:
        i2t_top = _topk_chunked(img, txt, topk)
        t2i_top = _topk_chunked(txt, img, topk)
    if perm is not None:  # back to the caller's text order
        t2i = torch.empty_like(t2i).index_copy_(0, perm, t2i)
        if topk:
            i2t_top = perm[i2t_top]
            t2i_top = torch.empty_like(t2i_top).index_copy_(0, perm, t2i_top)
    return Ranks(i2t, t2i, i2t_top, t2i_top)


# ---------------------------------------------------------------------------------------
# Input checks shared by both backends
# ---------------------------------------------------------------------------------------


def _check_inputs(
    img: torch.Tensor, txt: torch.Tensor, txt_image: torch.Tensor | None, topk: int
) -> torch.Tensor:
    """Validate the inputs; return txt_image as int64 [Nt] on the inputs' device."""
    check_matrix(_OP, "img", img)
    check_matrix(_OP, "txt", txt)
    n_img, n_txt = img.shape[0], txt.shape[0]
    if img.shape[1] != txt.shape[1]:
        raise ValueError(
            f"{_OP}: img and txt must have the same D, got {tuple(img.shape)} and {tuple(txt.shape)}"
        )
    if img.device != txt.device:
        raise ValueError(f"{_OP}: img is on {img.device} but txt is on {txt.device}")
    if n_img < 1 or n_txt < 1:
        raise ValueError(f"{_OP}: img and txt need at least one row, got {n_img} and {n_txt}")
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 0:
        raise ValueError(f"{_OP}: topk must be an int >= 0, got {topk!r}")
    if txt_image is None:
        if n_img != n_txt:
            raise ValueError(
                f"{_OP}: without txt_image img and txt must have the same N (1:1 pairs), "
                f"got {n_img} and {n_txt}"
            )
        txt_image = torch.arange(n_txt, device=img.device)
    else:
        if not isinstance(txt_image, torch.Tensor) or txt_image.dtype not in (
            torch.int64,
            torch.int32,
        ):
            got = txt_image.dtype if isinstance(txt_image, torch.Tensor) else type(txt_image).__name__
            raise ValueError(f"{_OP}: txt_image must be an int64 or int32 tensor of shape [Nt], got {got}")
        if txt_image.shape != (n_txt,):
            raise ValueError(
                f"{_OP}: txt_image must have shape [Nt] = [{n_txt}], got {tuple(txt_image.shape)}"
            )
        # contiguous: the kernels index it (and the own-range tables built from it) by row
        txt_image = txt_image.to(device=img.device, dtype=torch.int64).contiguous()
        lo, hi = int(txt_image.min()), int(txt_image.max())
        if lo < 0 or hi >= n_img:
            raise ValueError(
                f"{_OP}: txt_image values must lie in [0, Ni) = [0, {n_img}), got [{lo}, {hi}]"
            )
        counts = torch.bincount(txt_image, minlength=n_img)
        missing = int((counts == 0).sum())
        if missing:
            first = int((counts == 0).nonzero()[0, 0])
            raise ValueError(
                f"{_OP}: txt_image leaves {missing} image(s) without a caption (first: image "
                f"{first}); every image needs at least one caption to have a rank"
            )
    if topk > min(n_img, n_txt):
        raise ValueError(f"{_OP}: topk = {topk} exceeds min(Ni, Nt) = {min(n_img, n_txt)}")
    return txt_image


# ---------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------


def retrieval_ranks(
    img: torch.Tensor,
    txt: torch.Tensor,
    txt_image: torch.Tensor | None = None,
    *,
    topk: int = 0,
    backend: str | None = None,
) -> Ranks:
    """Ranks of the true matches, both directions (math and contract: module docstring).

    img: [Ni, D], txt: [Nt, D] float32/float16/bfloat16; txt_image: int64 [Nt] or None.
    Returns ``Ranks(i2t [Ni], t2i [Nt], i2t_topk, t2i_topk)``, int64.
    """
    txt_image = _check_inputs(img, txt, txt_image, topk)
    with on_device_of(img):
        if resolve_backend(backend, img, _OP) == "triton":
            return _ranks_triton(img, txt, txt_image, topk)
        return _ranks_ref_checked(img, txt, txt_image, topk, chunk=None)


# ---------------------------------------------------------------------------------------
# Plain PyTorch reference (chunked: memory O(chunk·N))
# ---------------------------------------------------------------------------------------


def _rank_rows_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    q_group: torch.Tensor,
    k_group: torch.Tensor,
    topk: int,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rank of each query row of q [Nq, D] among the keys k [Nk, D].

    A key is the query's own when k_group[key] == q_group[query]; the positive is the best
    own score, the rank counts the other keys scoring >= it (ties and NaN against the model).
    """
    kd = k.double()
    ranks, tops = [], []
    for start in range(0, q.shape[0], chunk):
        # [c, Nk] fp32 scores, accumulated in fp64 and rounded once: an fp32 matmul rounds a
        # dot product by its place in the output (a CPU BLAS's edge rows and columns take
        # another path), so identical embeddings scored one ulp apart and a collapsed model
        # could rank first; fp64's differences vanish in the rounding to fp32
        s = (q[start : start + chunk].double() @ kd.T).float()
        own = q_group[start : start + chunk, None] == k_group[None, :]  # [c, Nk]
        # amax propagates NaN, so a NaN own score gives a NaN positive.
        pos = s.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)  # [c, 1]
        beat = (s >= pos) | torch.isnan(s) | torch.isnan(pos)
        ranks.append((beat & ~own).sum(dim=1))
        if topk:
            tops.append(s.topk(topk, dim=1).indices)
        del s, own, beat
    return torch.cat(ranks), (torch.cat(tops) if topk else None)


def _ranks_ref_checked(
    img: torch.Tensor,
    txt: torch.Tensor,
    txt_image: torch.Tensor,
    topk: int,
    chunk: int | None,
) -> Ranks:
    n_img, n_txt = img.shape[0], txt.shape[0]
    img_ids = torch.arange(n_img, device=img.device)
    if chunk is None:  # about 32 MiB of fp64 scores (and 16 of fp32) per chunk
        chunk = max(1, (1 << 22) // max(n_img, n_txt))
    i2t, i2t_top = _rank_rows_ref(img, txt, img_ids, txt_image, topk, chunk)
    t2i, t2i_top = _rank_rows_ref(txt, img, txt_image, img_ids, topk, chunk)
    return Ranks(i2t, t2i, i2t_top, t2i_top)


def retrieval_ranks_ref(
    img: torch.Tensor,
    txt: torch.Tensor,
    txt_image: torch.Tensor | None = None,
    *,
    topk: int = 0,
    chunk: int | None = None,
) -> Ranks:
    """Plain PyTorch :func:`retrieval_ranks`, ``chunk`` query rows at a time.

    Each direction scores its own query rows (img @ txt.T for i2t, txt @ img.T for t2i), so
    a query's positive and its competitors come out of one matmul row.
    """
    txt_image = _check_inputs(img, txt, txt_image, topk)
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"retrieval_ranks_ref: chunk must be an int >= 1, got {chunk!r}")
    with on_device_of(img):
        return _ranks_ref_checked(img, txt, txt_image, topk, chunk)
