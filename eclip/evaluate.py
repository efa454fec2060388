"""The fixed retrieval evaluation: ranks of true pairs, mean/median rank and R@k, both ways.

For image i and text j the score is the cosine similarity s_ij of their embeddings. Ranks
are 0-indexed and ties count against the model:

    image→text  rank(i) = #{j not a caption of i : s_ij ≥ max over i's own captions of s_ic}
    text→image  rank(c) = #{k ≠ image(c) : s_kc ≥ s_image(c),c}

so a collapsed model (every embedding the same) ranks every query last, never first: N−1
with one caption an image (Nt − #captions(i) for image→text with several), and random
embeddings score about (N−1)/2. With several captions per image (COCO, Flickr) image→text
counts the best-ranked of the image's own captions and text→image ranks every caption's
image: the standard protocol. The headline ``mean_rank`` is the average of the two
directions' mean ranks (the convention of the eCLIP autoresearch story).

The ranks come from ``kernels.retrieval_ranks``: a streamed Triton kernel on CUDA, a chunked
PyTorch reference elsewhere; memory is O(chunk·N) in both, never the N×N matrix.

Also here: the k-fold assignment used by cross-validated evaluation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kernels import retrieval_ranks

RECALL_AT = (1, 5, 10)


def metrics_from_ranks(i2t: torch.Tensor, t2i: torch.Tensor) -> dict[str, float]:
    """Summary figures from rank vectors (int [Ni] and [Nt], 0-indexed).

    ``*_r{k}`` is the fraction of queries whose true match ranks below k (R@k in [0, 1]);
    medians follow NumPy (mean of the two middle values for an even count).
    """
    out: dict[str, float] = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        r = r.detach().to("cpu", torch.float64).numpy()
        if r.size == 0:
            raise ValueError(f"{name}: no ranks to summarise")
        out[f"{name}_mean_rank"] = float(r.mean())
        out[f"{name}_median_rank"] = float(np.median(r))
        for k in RECALL_AT:
            out[f"{name}_r{k}"] = float((r < k).mean())
    out["mean_rank"] = (out["i2t_mean_rank"] + out["t2i_mean_rank"]) / 2
    out["n_images"] = int(i2t.numel())
    out["n_texts"] = int(t2i.numel())
    return out


def directions(x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` [N, D] as fp32 unit vectors, whatever their magnitude: each row is
    divided by its largest |entry| (in float64) before the L2 normalisation. Plain
    ``F.normalize`` in fp32 lets the norm through at both ends: a row of norm below its
    eps (1e-12) keeps its norm as a factor on its scores, and one with entries past about
    1.8e19 overflows the norm and becomes zero. The harness's batch check compares
    directions only, so a score must depend on nothing else. A zero row stays zero; a row
    with a NaN or an infinity comes out with NaNs (ranked last, as before)."""
    x = x.double()
    peak = x.abs().amax(dim=-1, keepdim=True)
    x = torch.where(peak > 0, x / peak, x)
    return F.normalize(x, dim=-1).float()


@torch.no_grad()
def retrieval_metrics(img_emb: torch.Tensor, txt_emb: torch.Tensor,
                      txt_image: torch.Tensor | None = None) -> dict[str, float]:
    """Evaluate paired embeddings: img_emb [Ni, D], txt_emb [Nt, D], txt_image int64 [Nt]
    giving each text's image (None: 1:1 pairs, Ni == Nt). Embeddings are reduced to their
    directions here (``directions``), so callers may pass raw outputs, of any scale."""
    ranks = retrieval_ranks(directions(img_emb), directions(txt_emb), txt_image)
    return metrics_from_ranks(ranks.i2t, ranks.t2i)


def scored_split_problem(n: int, split: str) -> str | None:
    """Why a split of ``n`` images cannot be scored, or None: an empty one, and one of a
    single image, which has nothing to rank against, so every model ranks it first (R@1 =
    100%, a collapsed or NaN one too)."""
    if n == 0:
        return f"the {split} split is empty"
    if n == 1:
        return (f"the {split} split has a single image: a retrieval rank needs two or more (alone, any model "
                "ranks it first)")
    return None


def format_metrics(m: dict[str, float], prefix: str = "") -> list[str]:
    """``key: value`` lines for a run's summary block (R@k printed as percentages)."""
    lines = [f"{prefix}mean_rank: {m['mean_rank']:.2f}"]
    for d in ("i2t", "t2i"):
        lines.append(f"{prefix}{d}_mean_rank: {m[f'{d}_mean_rank']:.2f}")
        lines.append(f"{prefix}{d}_median_rank: {m[f'{d}_median_rank']:.1f}")
        for k in RECALL_AT:
            lines.append(f"{prefix}{d}_R@{k}: {100 * m[f'{d}_r{k}']:.1f}%")
    return lines


def kfold_assign(n: int, k: int, seed: int) -> np.ndarray:
    """Deterministic fold id in [0, k) for each of n items: a seeded shuffle dealt round-robin,
    so fold sizes differ by at most one. int64 [n]."""
    if k < 1:
        raise ValueError(f"folds must be >= 1, got {k}")
    if n < k:
        raise ValueError(f"cannot split {n} items into {k} folds")
    perm = np.random.default_rng(seed).permutation(n)
    folds = np.empty(n, dtype=np.int64)
    folds[perm] = np.arange(n) % k
    return folds


def fold_split(fold: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows for fold ``k`` of a cross-validation: (train rows, val rows), int64 indices.
    Rows with fold −1 (the held-out test split) are in neither."""
    if not 0 <= k < int(fold.max()) + 1:
        raise ValueError(f"fold {k} out of range: the cache has folds 0..{int(fold.max())}")
    val = torch.nonzero(fold == k).flatten()
    train = torch.nonzero((fold >= 0) & (fold != k)).flatten()
    return train, val
