"""How the harness scores a run: the embeddings its encoding processes wrote, put back in
place and ranked against the cache's own pairs (never anything the run reported), after a
check that each embedding is a function of its own input.

The check: a fresh ``eclip.encode`` process, which has seen nothing of the split, encodes
a few of its images and as many captions (``eclip.harness_eval.BATCH_PROBES``), drawn in secret
by the harness, in pairs (``--batch 2``); each must get the embedding it got in the
processes that encoded the whole split in batches of up to 512. A model that uses the other items it is given (their
mean or spread, per batch or remembered across calls: a transductive use of the scored
split) fails it, and so does one left random at evaluation (dropout); an honest model
differs by rounding only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from eclip.errors import EclipError

# The batch check: each copy's embedding must match its first within BATCH_TOL (1 - cosine).
# Honest models differ by rounding only: on the CPU at most 2e-7 (tiny and vit-s16 towers,
# fp32, which is how the CPU evaluates); on an H100, in bf16, 2.2e-16 (the tiny template
# through the harness), although a pair and a batch of 512 may pick other kernels; two bf16
# runs of these towers on the CPU, against fp32, differ by 1.5e-5 to 6e-5, the scale of
# that rounding. Centring on the batch's mean, then normalising, with the tiny template
# trained 60 s on the built-in data (1,000 val items): 0.77 (the whole mean), 0.025 (0.3
# of it), 0.0023 (0.1 of it); about 0.06 of it would pass. Another checkpoint (40 s):
# 0.15 and 0.0014. What passes gains nothing measurable (README, bench/RESULTS.md).
BATCH_TOL = 1e-3


def score(result: dict, img_path: Path, txt_path: Path, order_i, order_t, txt_image, device: str,
          split: str, copies: tuple[Path, dict] | None = None) -> dict:
    """``result`` with the metrics of the embeddings in ``img_path`` and ``txt_path``: rows
    encoded in the secret orders ``order_i`` (images) and ``order_t`` (captions), ranked
    against ``txt_image`` (int64 [C], each caption's image), never against anything a run
    reported. ``copies``: (the fresh process's embeddings, {"images": int64 [K], "texts":
    int64 [K]}: the positions in the secret orders it encoded again), checked first."""
    from eclip.evaluate import retrieval_metrics
    from eclip.loop import pick_device, unshuffle

    img = read_embeddings(img_path, "img", order_i.numel())
    txt = read_embeddings(txt_path, "txt", order_t.numel())
    if img.shape[1] != txt.shape[1]:
        raise EclipError(f"{txt_path}: img and txt widths differ ({img.shape[1]} vs {txt.shape[1]})")
    gaps = {}
    if copies is not None:
        path, picks = copies
        for name, part, first in (("img", "images", img), ("txt", "texts", txt)):
            again = read_embeddings(path, name, picks[part].numel(), width=img.shape[1])
            gaps[part] = batch_check(first[picks[part]], again, part)
    dev = pick_device(device)
    img, txt = unshuffle(img.float(), order_i).to(dev), unshuffle(txt.float(), order_t).to(dev)
    metrics = retrieval_metrics(img, txt, txt_image.to(dev))
    out = dict(result, metrics=metrics, val_mean_rank=metrics["mean_rank"], ranked_by="harness", eval_split=split)
    if gaps:
        out["batch_gap"] = gaps  # per part, the largest 1 - cosine between a copy and its first
    if split == "test":
        out["test_mean_rank"] = metrics["mean_rank"]
    return out


def read_embeddings(path: Path, name: str, rows: int, width: int | None = None) -> torch.Tensor:
    """Tensor ``name`` of an encoding process's output: float [rows, E], E ≥ 1 (E = ``width``
    when given), or EclipError."""
    from eclip.fileio import read_tensors

    t = read_tensors(path, "the evaluation left no readable embeddings").get(name)
    if (t is None or t.dim() != 2 or t.shape[0] != rows or not t.is_floating_point() or t.shape[1] < 1
            or (width is not None and t.shape[1] != width)):
        shown = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
        raise EclipError(f"{path}: {name}: expected float [{rows}, {width or 'E'}], got {shown}")
    return t


def batch_check(first: torch.Tensor, again: torch.Tensor, part: str) -> float:
    """The largest 1 - cosine between ``first`` [K, E] (items as encoded among the split)
    and ``again`` [K, E] (the same items encoded fresh, in pairs); EclipError past
    ``BATCH_TOL``. An item degenerate both times (a zero or non-finite embedding) matches:
    a broken model is scored as such, not called batch-dependent."""
    first, again = first.double(), again.double()
    broken = lambda e: ~torch.isfinite(e).all(1) | (e.norm(dim=1) == 0)  # noqa: E731
    # normalised with a float64-sized eps: an embedding of norm 1e-9 still has a direction
    # (the ranking sees it: eclip.evaluate.directions), where cosine_similarity's eps 1e-8
    # would not
    unit = lambda e: torch.nn.functional.normalize(e, dim=1, eps=1e-300)  # noqa: E731
    gap = (1 - (unit(first) * unit(again)).sum(1)).nan_to_num(nan=2.0).clamp(min=0.0)  # no -1e-16
    gap = torch.where(broken(first) & broken(again), 0.0, gap)
    worst = float(gap.max()) if gap.numel() else 0.0
    if worst > BATCH_TOL:
        raise EclipError(f"evaluation ({part}): an item encoded again, fresh and in a pair, got another embedding "
                         f"than among the rest (1 - cosine {worst:.3g}, at most {BATCH_TOL:g}): an embedding must "
                         "depend on its own input only, not on the other items encoded with it, nor on chance "
                         "(dropout at evaluation)")
    return worst
