"""How the harness scores a run: the embeddings its encoding processes wrote, put back in
place and ranked against the cache's own pairs (never anything the run reported), after a
check that each embedding depends on its own input only.

The check: ``BATCH_PROBES`` rows of each part, drawn in secret by the harness, are encoded
again after the rest, in pairs of their own (``eclip.encode --alone``), and each copy's
embedding must match its first, made in a batch of up to 512 of the split. A model that
uses the other items of its batch (their mean, their spread: a transductive use of the
scored split) fails it; an honest model differs by rounding only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from eclip.errors import EclipError

# The batch check: this many rows of each part are encoded a second time, in pairs of their
# own, and each copy's embedding must match its first within BATCH_TOL (1 - cosine). Honest
# models differ by rounding only: at most 2e-7 measured on the CPU (tiny and vit-s16 towers,
# fp32 and bf16). Centring on the batch's mean, then normalising, measured on the built-in
# dataset's 1,000 val items: 0.77 (the whole mean), 0.025 (0.3 of it), 0.0023 (0.1 of it).
BATCH_PROBES = 16
BATCH_TOL = 1e-3


def score(result: dict, img_path: Path, txt_path: Path, order_i, order_t, txt_image, device: str,
          split: str, probes: dict | None = None) -> dict:
    """``result`` with the metrics of the embeddings in ``img_path`` and ``txt_path``: rows
    encoded in the secret orders ``order_i`` (images) and ``order_t`` (captions), ranked
    against ``txt_image`` (int64 [C], each caption's image), never against anything a run
    reported. ``probes`` ({part: int64 [K] positions}): the files end with K more rows, copies
    of those positions encoded in pairs of their own; they must match (``batch_check``)."""
    from eclip.evaluate import retrieval_metrics
    from eclip.fileio import read_tensors
    from eclip.loop import pick_device, unshuffle

    got, gaps = {}, {}
    for name, part, path, order in (("img", "images", img_path, order_i), ("txt", "texts", txt_path, order_t)):
        picks = probes[part] if probes else torch.zeros(0, dtype=torch.int64)
        want = order.numel() + picks.numel()
        t = read_tensors(path, "the evaluation left no readable embeddings").get(name)
        if t is None or t.dim() != 2 or t.shape[0] != want or not t.is_floating_point():
            shown = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
            raise EclipError(f"{path}: {name}: expected float [{want}, E], got {shown}")
        if picks.numel():
            gaps[part] = batch_check(t, picks, part)
        got[name] = t[: order.numel()]
    img, txt = got["img"], got["txt"]
    if img.shape[1] != txt.shape[1]:
        raise EclipError(f"{txt_path}: img and txt widths differ ({img.shape[1]} vs {txt.shape[1]})")
    dev = pick_device(device)
    img, txt = unshuffle(img.float(), order_i).to(dev), unshuffle(txt.float(), order_t).to(dev)
    metrics = retrieval_metrics(img, txt, txt_image.to(dev))
    out = dict(result, metrics=metrics, val_mean_rank=metrics["mean_rank"], ranked_by="harness", eval_split=split)
    if gaps:
        out["batch_gap"] = gaps  # per part, the largest 1 - cosine between a copy and its first
    if split == "test":
        out["test_mean_rank"] = metrics["mean_rank"]
    return out


def batch_check(emb: torch.Tensor, picks: torch.Tensor, part: str) -> float:
    """The largest 1 - cosine between the last K rows of ``emb`` ([N + K, E], copies encoded
    in pairs of their own) and rows ``picks`` (int64 [K], where they were first encoded);
    EclipError past ``BATCH_TOL``: an embedding that moves with its batch uses the other
    items of the scored split (their mean, their spread), which ranking them must not reward."""
    first, again = emb[picks].double(), emb[emb.shape[0] - picks.numel():].double()
    gap = (1 - torch.nn.functional.cosine_similarity(first, again, dim=1)).nan_to_num(nan=2.0)
    worst = float(gap.max())
    if worst > BATCH_TOL:
        raise EclipError(f"evaluation ({part}): an item encoded again in another batch got another embedding "
                         f"(1 - cosine {worst:.3g}, at most {BATCH_TOL:g}): an embedding must depend on its "
                         "own input only, not on the rest of its batch nor on chance (dropout at evaluation)")
    return worst
