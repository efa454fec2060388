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
separate dot product whose rounding could differ.

Contract:
  * every image must have at least one caption: ``ValueError`` otherwise (an image without
    a caption has no rank; silently returning -1 would skew a mean rank);
  * ``topk`` > 0 also returns the indices of the top-k scores of every query
    (i2t_topk int64 [Ni, k] into the texts, t2i_topk int64 [Nt, k] into the images; order
    among equal scores is unspecified), else None;
  * memory O(N·D) plus O(chunk·N) for the reference; the Triton kernel never stores the
    N×N score matrix.

Dispatch: CUDA tensors → Triton, CPU → reference, ``TRITON_INTERPRET=1`` → CPU tensors
through Triton; ``backend=`` overrides (see ``kernels._common``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._common import check_matrix, resolve_backend

_OP = "retrieval_ranks"


class Ranks(NamedTuple):
    """Result of :func:`retrieval_ranks` (all int64, on the inputs' device)."""

    i2t: torch.Tensor  # [Ni] rank of each image's best caption among all texts
    t2i: torch.Tensor  # [Nt] rank of each text's image among all images
    i2t_topk: torch.Tensor | None  # [Ni, k] text indices of the k best scores, or None
    t2i_topk: torch.Tensor | None  # [Nt, k] image indices of the k best scores, or None


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
            raise ValueError(f"{_OP}: txt_image must be an int64 tensor of shape [Nt]")
        if txt_image.shape != (n_txt,):
            raise ValueError(
                f"{_OP}: txt_image must have shape [Nt] = [{n_txt}], got {tuple(txt_image.shape)}"
            )
        txt_image = txt_image.to(device=img.device, dtype=torch.int64)
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
    resolve_backend(backend, img, _OP)
    # The Triton path follows in the next step; every backend uses the reference for now.
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
    kf = k.float()
    ranks, tops = [], []
    for start in range(0, q.shape[0], chunk):
        s = q[start : start + chunk].float() @ kf.T  # [c, Nk] fp32 scores
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
    if chunk is None:  # about 32 MiB of fp32 scores per chunk
        chunk = max(1, (1 << 23) // max(n_img, n_txt))
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
    return _ranks_ref_checked(img, txt, txt_image, topk, chunk)
