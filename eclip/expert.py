"""The eCLIP expert path: region heatmaps, the heatmap processor, mixup and the expert term.

eCLIP (Kumar & Marttinen, 2024) feeds expert annotations (there: radiologists' gaze
heatmaps; here: annotated region boxes turned into heatmaps) through a *heatmap processor*
that fuses image and heatmap into an "expert image", encodes it with the unchanged image
tower, and adds a contrastive term on the resulting expert embeddings. Scarce annotations
are stretched with a mixup of the plain and the expert image embeddings.

Pieces, in the order a training step uses them:

- ``make_heatmaps``: boxes [B, K, 4] → Gaussian heatmaps [B, 1, S, S] on the boxes' device;
- ``HeatmapProcessor`` (built by ``eclip.model`` when ``cfg.expert.enabled``): patch convs
  of image and heatmap, cross-attention with the heatmap tokens as queries and the image
  tokens as keys/values, a linear map back to pixels added to the image (so the expert
  image starts close to the image and the term is stable from the first step);
- ``expert_schedule`` / ``draw_expert`` / ``expert_weight``: the weight of the term as a
  function of training progress and the seeded per-step Bernoulli draw;
- ``mixup``: Beta(α, α) mixing of image and expert embeddings, renormalised;
- ``expert_loss``: (mixed ↔ region phrase) and (expert ↔ caption) contrastive terms over
  the samples that have a region; the heatmap shows the boxes of that sample's phrase.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eclip.towers import init_linear_

if TYPE_CHECKING:
    from eclip.batch import Batch
    from eclip.model import EclipModel, ExpertConfig


def make_heatmaps(boxes: torch.Tensor, box_mask: torch.Tensor, size: int, min_sigma: float,
                  sigma_scale: float = 0.5) -> torch.Tensor:
    """Gaussian region heatmaps, one channel per sample, merged over boxes by per-pixel max.

    boxes: float [B, K, 4] normalised (x1, y1, x2, y2) in [0, 1]; box_mask: bool [B, K].
    Pixel (i, j) (row i = y) sits at ((j + 0.5) / size, (i + 0.5) / size). Box k contributes
    exp(-(x - cx)² / 2σx² - (y - cy)² / 2σy²) with (cx, cy) its centre and
    σx = max(sigma_scale · half-width, min_sigma / size) (likewise σy): ``min_sigma`` is in
    pixels, so a degenerate box still covers about a pixel. Returns float32 [B, 1, size,
    size] in [0, 1]; all zeros for a sample without boxes. Loops over K only (static).
    """
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes: expected [B, K, 4], got {list(boxes.shape)}")
    if tuple(box_mask.shape) != tuple(boxes.shape[:2]):
        raise ValueError(f"box_mask: expected {list(boxes.shape[:2])}, got {list(box_mask.shape)}")
    if size <= 0:
        raise ValueError(f"size: must be positive, got {size}")
    if not min_sigma > 0:
        raise ValueError(f"min_sigma: must be positive, got {min_sigma}")
    b = boxes.to(torch.float32)
    coords = (torch.arange(size, device=b.device, dtype=torch.float32) + 0.5) / size  # [S]
    cx, cy = (b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2  # [B, K]
    floor = min_sigma / size
    sx = torch.clamp(sigma_scale * (b[..., 2] - b[..., 0]).abs() / 2, min=floor)
    sy = torch.clamp(sigma_scale * (b[..., 3] - b[..., 1]).abs() / 2, min=floor)
    weight = box_mask.to(torch.float32)
    out = torch.zeros(b.shape[0], size, size, device=b.device, dtype=torch.float32)
    for k in range(b.shape[1]):  # separable Gaussian per box: [B, S] × [B, S] → [B, S, S]
        gx = torch.exp(-0.5 * ((coords - cx[:, k, None]) / sx[:, k, None]) ** 2)
        gy = torch.exp(-0.5 * ((coords - cy[:, k, None]) / sy[:, k, None]) ** 2)
        out = torch.maximum(out, gy[:, :, None] * gx[:, None, :] * weight[:, k, None, None])
    return out[:, None]


class HeatmapProcessor(nn.Module):
    """(normalised image [B, 3, H, W], heatmap [B, 1, H, W]) → expert image [B, 3, H, W].

    Both inputs are cut into the image tower's patch grid by their own strided convs
    ([B, N, width] tokens, plus learned positions). Heatmap tokens are the queries of one
    multi-head cross-attention over the image tokens (keys/values), so each location gathers
    the image content its heat points at; the result (with a residual on the queries) is
    mapped back to pixels per patch and added to the image.
    """

    def __init__(self, image_size: int, patch_size: int, width: int, heads: int, eps: float):
        super().__init__()
        self.image_size, self.patch_size, self.width, self.heads = image_size, patch_size, width, heads
        self.grid = image_size // patch_size
        n = self.grid * self.grid
        self.image_patch = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.heat_patch = nn.Conv2d(1, width, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, width))
        self.ln_q = nn.LayerNorm(width, eps=eps)
        self.ln_kv = nn.LayerNorm(width, eps=eps)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.ln_out = nn.LayerNorm(width, eps=eps)
        self.to_pixels = nn.Linear(width, 3 * patch_size * patch_size)
        init_linear_(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)

    def forward(self, x: torch.Tensor, heatmaps: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if tuple(heatmaps.shape) != (b, 1, h, w):
            raise ValueError(f"heatmaps: expected [{b}, 1, {h}, {w}], got {list(heatmaps.shape)}")
        p, g, d, nh = self.patch_size, self.grid, self.width, self.heads
        img = self.image_patch(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N, d]
        heat = self.heat_patch(heatmaps.to(x.dtype)).flatten(2).transpose(1, 2) + self.pos_embed
        q = self.q(self.ln_q(heat)).view(b, -1, nh, d // nh).transpose(1, 2)  # [B, nh, N, d/nh]
        k, v = self.kv(self.ln_kv(img)).view(b, -1, 2, nh, d // nh).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, d)
        tokens = heat + self.proj(y)  # [B, N, d]
        pix = self.to_pixels(self.ln_out(tokens))  # [B, N, 3·p·p], channel-major per patch
        pix = pix.view(b, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, g * p, g * p)
        return x + pix.to(x.dtype)

    def flops(self) -> int:
        """Forward FLOPs per sample (convs, projections, attention, map to pixels)."""
        n, d, pp = self.grid * self.grid, self.width, self.patch_size**2
        convs = 2 * n * (3 * pp) * d + 2 * n * pp * d
        projections = 2 * n * d * d * 4  # q, k, v, out
        attention = 2 * (2 * n * n * d)
        return convs + projections + attention + 2 * n * d * 3 * pp


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError("generator: expected a CPU torch.Generator (draws stay on the host)")


def mixup(a: torch.Tensor, b: torch.Tensor, alpha: float,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row Beta(α, α) mixup of two embedding batches, renormalised.

    a, b: [B, E] (unit rows); returns (normalize(λ·a + (1-λ)·b) [B, E], λ [B]). λ is drawn on
    the host from ``generator`` (a CPU torch.Generator, so runs are reproducible and nothing
    waits on the device) and copied to a's device.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"mixup: expected two [B, E] tensors, got {list(a.shape)}, {list(b.shape)}")
    if not alpha > 0:
        raise ValueError(f"alpha: must be positive, got {alpha}")
    _check_generator(generator)
    # torch has no seeded Beta sampler: seed NumPy's from the torch generator's stream.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    lam_np = np.random.default_rng(seed).beta(alpha, alpha, size=a.shape[0])
    lam = torch.from_numpy(lam_np).float()
    # A plain host→device copy waits for the whole queue; from pinned memory it does not.
    lam = lam.pin_memory().to(a.device, non_blocking=True) if a.is_cuda else lam.to(a.device)
    mixed = lam[:, None] * a.float() + (1 - lam[:, None]) * b.float()
    return F.normalize(mixed, dim=-1).to(a.dtype), lam.to(a.dtype)


def expert_schedule(progress: float, cfg: ExpertConfig) -> tuple[float, float]:
    """(weight, probability) of the expert term at ``progress`` ∈ [0, 1].

    Weight: 0 during the cold start, a linear ramp to ``cfg.weight``, flat, then a linear
    cool-down to 0 over the final ``cfg.cool_down`` of training. Probability: the chance a
    step computes the term, ``cfg.probability`` while the weight is positive, else 0. Both
    0 when the expert path is disabled.
    """
    if not cfg.enabled:
        return 0.0, 0.0
    t = min(max(float(progress), 0.0), 1.0)
    if t < cfg.cold_start:
        f = 0.0
    elif cfg.ramp > 0 and t < cfg.cold_start + cfg.ramp:
        f = (t - cfg.cold_start) / cfg.ramp
    else:
        f = 1.0
    if cfg.cool_down > 0 and t > 1.0 - cfg.cool_down:
        f *= (1.0 - t) / cfg.cool_down
    weight = cfg.weight * f
    return weight, (cfg.probability if weight > 0 else 0.0)


def draw_expert(probability: float, generator: torch.Generator) -> bool:
    """One Bernoulli(probability) draw from a CPU generator. Exactly one number is consumed
    per call whatever the probability, so the stream stays aligned across schedules/resumes."""
    _check_generator(generator)
    u = float(torch.rand((), generator=generator))
    return u < probability


def expert_weight(progress: float, cfg: ExpertConfig, generator: torch.Generator) -> float:
    """The weight to give the expert term this step: the schedule's weight when the seeded
    draw fires, else 0.0 (then skip ``expert_loss`` altogether)."""
    weight, probability = expert_schedule(progress, cfg)
    fired = draw_expert(probability, generator)
    return weight if fired else 0.0


def expert_loss(model: EclipModel, batch: Batch, img_emb: torch.Tensor, txt_emb: torch.Tensor,
                loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                cfg: ExpertConfig, generator: torch.Generator) -> torch.Tensor:
    """The eCLIP expert contrastive term (unweighted), a 0-d tensor.

    Over the samples with ``batch.has_region`` only: heatmaps from the boxes of their
    sampled phrase (``batch.box_mask``), expert
    embeddings ``model.encode_expert``, region phrase embeddings ``model.encode_text``,
    mixed = mixup(img_emb, expert); returns
    ½·(loss_fn(mixed, phrase, s) + loss_fn(expert, caption, s)) with s = exp(logit_scale),
    the phrase term over the first sample of each distinct phrase (``first_of_each``: a twin
    phrase is no negative).
    ``img_emb``/``txt_emb`` [B, E] are the step's CLIP embeddings of the whole batch (their
    graphs are reused). With fewer than two region samples (one pair's loss is 0 whatever
    the embeddings) it returns an exact 0 that is still attached to the graph (a sum over no
    elements), so ``loss + w·term`` always backprops, and encodes nothing.
    Selecting the subsets reads their two sizes on the host at once (one device sync per call).
    """
    has = batch.has_region
    # the phrase term over one sample per distinct phrase: two samples of "a small red circle"
    # (half of a batch of 64 of the built-in data's have a twin) were each other's negatives,
    # a contradiction whose loss no embedding could bring below its floor
    keys = batch.phrase_tokens if batch.phrase_id is None else batch.phrase_id[:, None]  # one column if it can
    first = first_of_each(keys, has)  # bool [B]
    n, m = (int(v) for v in torch.stack([has.sum(), first.sum()]).tolist())  # the one host read
    if n < 2:  # a contrastive loss over one pair is exactly 0, its gradient too: skip the encoders
        return (img_emb[:0].sum() + txt_emb[:0].sum()).float()
    images, boxes, box_mask = batch.images, batch.boxes, batch.box_mask
    phrase_tokens, phrase_mask = batch.phrase_tokens, batch.phrase_mask
    if n < has.shape[0]:  # gather only when some samples lack regions
        idx = _where_true(has, n)  # [n]
        images, boxes, box_mask = images[idx], boxes[idx], box_mask[idx]
        phrase_tokens, phrase_mask = phrase_tokens[idx], phrase_mask[idx]
        img_emb, txt_emb = img_emb[idx], txt_emb[idx]
        first = first[idx]
    heat = make_heatmaps(boxes, box_mask, images.shape[-1], cfg.min_sigma, cfg.sigma_scale)
    expert = model.encode_expert(images, heat)
    keep = _where_true(first, m)  # [m] ascending, among the n
    phrase = model.encode_text(phrase_tokens[keep], phrase_mask[keep])
    mixed, _ = mixup(img_emb, expert, cfg.mixup_alpha, generator)  # all n: the draws do not depend on m
    scale = model.logit_scale.exp()
    if m >= 2:
        phrase_term = loss_fn(mixed[keep], phrase, scale)
    else:  # one distinct phrase: no negative left, 0 still attached to the graph
        phrase_term = (mixed[:0].sum() + phrase[:0].sum()).float()
    return 0.5 * (phrase_term + loss_fn(expert, txt_emb, scale))


def _where_true(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The indices of ``mask``'s True entries, ascending, given their ``count`` (read on the
    host already): int64 [count], without the sync of ``torch.nonzero``."""
    return torch.argsort((~mask).to(torch.int8), stable=True)[:count]


def first_of_each(rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """bool [n]: ``valid`` rows of ``rows`` [n, L] that no earlier valid row equals (the first
    of each distinct row). No device sync: the rows are sorted by a stable sort per column,
    last column first (a radix sort: equal rows end up side by side, in their order), valid
    rows ahead of the others, and a row is a first when it differs from the one before."""
    n = rows.shape[0]
    order = torch.arange(n, device=rows.device)
    for c in reversed(range(rows.shape[1])):
        order = order[torch.argsort(rows[order, c], stable=True)]
    order = order[torch.argsort((~valid[order]).to(torch.int8), stable=True)]
    ranked = rows[order]
    new = torch.ones(n, dtype=torch.bool, device=rows.device)
    new[1:] = (ranked[1:] != ranked[:-1]).any(dim=1)
    first = torch.empty_like(new)
    first[order] = new & valid[order]
    return first
