"""Training data resident on the device: index sampling, caption choice and augmentation there.

A split of the cache (11k images at 224 px are 1.6 GB of uint8) is copied to the device once;
each step then costs a few gathers and one ``grid_sample`` on the device, no DataLoader, no
host round trip. When the images do not fit (more than ``max_fraction`` of the free device
memory; or ``placement="host"``) they stay in host memory: the image order is then drawn
on the host, a few batches ahead, and a background thread gathers those rows into pinned
buffers and copies them to the device on a side stream while the current step runs
(``eclip.data.prefetch``). Captions, boxes and phrases are small and stay on the device.

Sampling is epoch-based (a fresh permutation each pass; no image twice in an epoch, nor in a
batch no larger than the split, since an epoch's tail short of a batch is left out) from
seeded ``torch.Generator``s, so a run is reproducible from its seed and resumable from the
generators' states (the batches drawn ahead but not yet taken are not part of the state).
An image with several captions contributes one, drawn per step.
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn.functional as F

from eclip.batch import Batch
from eclip.data.cache import Cache
from eclip.data.prefetch import HostPrefetcher
from eclip.errors import first_line

MAX_REGIONS = 16  # boxes kept per image for heatmaps (the first ones, in source order)
# A box narrower or shorter than this many output pixels shows nothing of its region: a
# sliver a centre crop left at the border (stored, since prepare keeps any visible width) or a
# random crop cut it to. It is no region, whether or not this run augments (the heatmap of a
# 0.003-pixel box is a blob at the border, trained on as the phrase's place)
MIN_BOX_PX = 0.5


def _csr(owner: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the entries whose ``owner`` is in ``rows`` by owner position in ``rows``.

    Returns (entry ids sorted by owner [E], start offset per row [n], count per row [n])."""
    size = max(int(owner.max()) + 1 if owner.numel() else 0, int(rows.max()) + 1 if rows.numel() else 0)
    pos = torch.full((max(size, 1),), -1, dtype=torch.int64)
    pos[rows] = torch.arange(rows.numel())
    local = pos[owner] if owner.numel() else owner
    keep = torch.nonzero(local >= 0).flatten()
    order = keep[torch.argsort(local[keep], stable=True)]
    counts = torch.bincount(local[keep], minlength=rows.numel())
    starts = torch.cumsum(counts, 0) - counts
    return order, starts, counts


def _visible(boxes: torch.Tensor, res: int) -> torch.Tensor:
    """Which boxes ([..., 4] x1, y1, x2, y2 in [0, 1]) span ``MIN_BOX_PX`` output pixels or more
    both ways, on an image of ``res`` pixels a side: bool [...]."""
    least = MIN_BOX_PX / res
    return (boxes[..., 2] - boxes[..., 0] >= least) & (boxes[..., 3] - boxes[..., 1] >= least)


class DeviceData:
    """The images, captions and regions of ``rows`` of a cache, ready to sample batches from.

    images uint8 [n, 3, R, R] · caption tokens [C, L] with a CSR index per image · region boxes
    padded to [n, K, 4] with a mask · phrase tokens [G, Lp] with a CSR index per image.
    """

    def __init__(self, cache: Cache, rows: torch.Tensor, device: torch.device, seed: int,
                 crop_scale: float = 1.0, flip: bool = False, max_fraction: float = 0.6,
                 placement: str = "auto", lookahead: int = 2):
        if not 0 < crop_scale <= 1:
            raise ValueError(f"crop_scale: must be in (0, 1], got {crop_scale}")
        if placement not in ("auto", "device", "host"):
            raise ValueError(f"data placement: expected auto, device or host, got {placement!r}")
        if lookahead < 1:
            raise ValueError(f"lookahead: must be at least 1, got {lookahead}")
        self.device, self.crop_scale, self.flip = device, float(crop_scale), bool(flip)
        self.n = int(rows.numel())
        if self.n == 0:
            raise ValueError("no images to train on in the selected split")
        images = cache.images.index_select(0, rows)
        if placement == "auto":
            placement = ("device" if device.type == "cpu"
                         or images.numel() <= max_fraction * torch.cuda.mem_get_info(device)[0] else "host")
        self.placement = placement
        self.images = images.to(device) if self.on_device else None
        self.prefetch = None if self.on_device else HostPrefetcher(images, device)
        cap, self.cap_start, self.cap_count = _csr(cache.caption_image, rows)
        # Trim the padding no caption of this split uses: [C, L'] with L' = longest caption.
        longest = max(1, int(cache.lengths[cap].max())) if cap.numel() else 1
        self.tokens = cache.tokens[cap, :longest].to(device, torch.int64)
        reg, reg_start, reg_count = _csr(cache.region_image, rows)
        k = max(1, min(MAX_REGIONS, int(reg_count.max()) if reg_count.numel() else 1))
        slot = torch.arange(reg.numel()) - torch.repeat_interleave(reg_start, reg_count)
        owner = torch.repeat_interleave(torch.arange(self.n), reg_count)
        keep = slot < k
        boxes = torch.zeros(self.n, k, 4)
        box_mask = torch.zeros(self.n, k, dtype=torch.bool)
        boxes[owner[keep], slot[keep]] = cache.region_boxes[reg[keep]]
        box_mask[owner[keep], slot[keep]] = _visible(cache.region_boxes[reg[keep]], cache.images.shape[-1])
        self.boxes, self.box_mask = boxes.to(device), box_mask.to(device)
        longest = max(1, int(cache.region_lengths[reg].max())) if reg.numel() else 1
        phrase_tokens = cache.region_tokens[reg, :longest].to(torch.int64)  # [G, Lp']
        self.phrase_tokens = phrase_tokens.to(device)
        # The expert term pairs the heatmap with the sampled phrase, so a batch's box_mask
        # marks that phrase's boxes only: the region drawn and any other box of the image
        # with the same phrase ("two women": one region per woman). Phrase ids: [G], and
        # per box slot [N, K] (-1 where no box).
        phrase_id = (torch.unique(phrase_tokens, dim=0, return_inverse=True)[1] if reg.numel()
                     else torch.zeros(0, dtype=torch.int64))
        slot_phrase = torch.full((self.n, k), -1, dtype=torch.int64)
        slot_phrase[owner[keep], slot[keep]] = phrase_id[keep]
        self.phrase_id, self.slot_phrase = phrase_id.to(device), slot_phrase.to(device)
        self.reg_start, self.reg_count = reg_start.to(device), reg_count.to(device)
        self.reg_pick = reg_count.clamp(max=k).to(device)  # a phrase is drawn among the boxes kept
        self.cap_start, self.cap_count = self.cap_start.to(device), self.cap_count.to(device)
        self.generator = torch.Generator(device=device)  # caption/phrase choice, augmentation
        self.generator.manual_seed(seed)
        # The image order is drawn where the images are: on the host path its rows must be
        # known a few steps ahead without waiting for the device.
        if self.on_device:
            self.index_generator = self.generator
        else:
            self.index_generator = torch.Generator()
            self.index_generator.manual_seed(seed)
        self.perm = torch.empty(0, dtype=torch.int64, device=device if self.on_device else "cpu")
        self.cursor = 0
        self.epoch = 0
        self.lookahead = int(lookahead)  # host path: batches gathered ahead of the one taken
        self._ahead: deque = deque()  # host path: (sampler position before the draw, rows [B]) per queued batch

    @property
    def on_device(self) -> bool:
        return self.placement == "device"

    # -- state, for checkpoints ------------------------------------------------------------

    def _live_position(self) -> tuple:
        gen = None if self.on_device else self.index_generator.get_state()
        return gen, self.perm, self.cursor, self.epoch

    def _position(self) -> tuple:
        """The image order's state before the next batch not yet taken (batches drawn ahead
        for the prefetcher do not count)."""
        return self._ahead[0][0] if self._ahead else self._live_position()

    def _set_position(self, pos: tuple) -> None:
        gen, self.perm, self.cursor, self.epoch = pos
        if gen is not None:
            self.index_generator.set_state(gen)
        self._ahead.clear()
        if self.prefetch is not None:
            self.prefetch.clear()

    def state_dict(self) -> dict:
        gen, perm, cursor, epoch = self._position()
        state = {"generator": self.generator.get_state(), "perm": perm.cpu(), "cursor": cursor, "epoch": epoch}
        if gen is not None:
            state["index_generator"] = gen
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``. A state saved on the other placement resumes
        validly but not bitwise: the host path keeps the image order on its own generator."""
        perm, n = state["perm"], self.n
        # a permutation of this split's rows (or none yet: no epoch drawn), or the batches
        # would index other rows, or none
        if (not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or perm.shape not in ((n,), (0,))
                or (perm.numel() and not torch.equal(perm.sort().values.cpu(), torch.arange(n)))):
            raise ValueError(f"the data order (data_perm) is no permutation of this split's {n} rows")
        if not 0 <= int(state["cursor"]) <= perm.numel():
            raise ValueError(f"the data position (data_cursor {state['cursor']}) lies outside 0..{perm.numel()}")
        try:
            self.generator.set_state(state["generator"])
            gen = None if self.on_device else state.get("index_generator")
            if gen is not None:
                torch.Generator().set_state(gen)  # checked on a spare one: _set_position sets the real one
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"the data generator's state does not fit ({first_line(e)})") from None
        self._set_position((gen, perm.to(self.perm.device), int(state["cursor"]), int(state["epoch"])))

    def snapshot(self) -> tuple:
        """Cheap copy of the sampling position (no device sync): see ``restore``."""
        return self.generator.get_state(), self._position()

    def restore(self, snap: tuple) -> None:
        gen, pos = snap
        self.generator.set_state(gen)
        self._set_position(pos)

    def close(self) -> None:
        """Drop the batches drawn ahead (the position stays that of the last batch taken)
        and stop the prefetch thread."""
        self._set_position(self._position())
        if self.prefetch is not None:
            self.prefetch.close()

    # -- sampling --------------------------------------------------------------------------

    def _indices(self, b: int) -> torch.Tensor:
        """The next ``b`` image rows [b]. An epoch's last few rows, fewer than ``b``, are left
        out when ``b <= n``: joined to the next epoch's first rows, they could put one image
        twice in a batch, a false negative for the contrastive loss. The permutation is fresh
        each epoch, so no image is left out more often than another. A batch larger than the
        split takes whole epochs and repeats images of necessity."""
        if b <= self.n and self.perm.numel() - self.cursor < b:
            self.cursor = self.perm.numel()
        parts, need = [], b
        while need > 0:
            if self.cursor >= self.perm.numel():
                self.perm = torch.randperm(self.n, generator=self.index_generator, device=self.perm.device)
                self.cursor, self.epoch = 0, self.epoch + 1
            take = min(need, self.perm.numel() - self.cursor)
            parts.append(self.perm[self.cursor: self.cursor + take])
            self.cursor += take
            need -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _pick(self, start: torch.Tensor, count: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One entry per sampled image, uniformly among its entries (0 when it has none)."""
        u = torch.rand(idx.numel(), generator=self.generator, device=self.device)
        c = count[idx]
        return start[idx] + torch.minimum((u * c).long(), (c - 1).clamp(min=0))

    def _host_batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [B] (on the device) and their images, gathered ahead by the prefetcher."""
        if self._ahead and self._ahead[0][1].numel() != b:  # another batch size: draw again from there
            self._set_position(self._ahead[0][0])
        while len(self._ahead) <= self.lookahead:
            pos = self._live_position()
            idx = self._indices(b)
            self._ahead.append((pos, idx))
            self.prefetch.submit(idx)
        _, idx = self._ahead.popleft()
        if self.device.type == "cuda":  # from pageable memory the driver may wait for the stream
            idx = idx.pin_memory()
        return idx.to(self.device, non_blocking=True), self.prefetch.take()

    def sample(self, batch_size: int) -> Batch:
        if self.on_device:
            idx = self._indices(batch_size)  # [B] image rows
            images = self.images[idx]
        else:
            idx, images = self._host_batch(batch_size)
        cap = self._pick(self.cap_start, self.cap_count, idx)
        tokens = self.tokens[cap]
        has_region = self.reg_count[idx] > 0
        phrase = self._pick(self.reg_start, self.reg_pick, idx).clamp(max=max(self.phrase_tokens.shape[0] - 1, 0))
        boxes, box_mask = self.boxes[idx], self.box_mask[idx]
        if self.phrase_tokens.shape[0]:
            phrase_tokens = self.phrase_tokens[phrase]
            phrase_mask = (phrase_tokens != 0) & has_region[:, None]
            phrase_id = self.phrase_id[phrase]  # [B]
            box_mask = box_mask & (self.slot_phrase[idx] == phrase_id[:, None])  # [B, K]
        else:
            phrase_tokens = torch.zeros(idx.numel(), 1, dtype=torch.int64, device=self.device)
            phrase_mask = torch.zeros_like(phrase_tokens, dtype=torch.bool)
            phrase_id = torch.zeros(idx.numel(), dtype=torch.int64, device=self.device)
        if self.crop_scale < 1 or self.flip:
            images, boxes, box_mask = self._augment(images, boxes, box_mask)
        has_region = has_region & box_mask.any(dim=1)
        return Batch(images=images, tokens=tokens, mask=tokens != 0, boxes=boxes, box_mask=box_mask,
                     phrase_tokens=phrase_tokens, phrase_mask=phrase_mask, has_region=has_region,
                     phrase_id=phrase_id)

    def _augment(self, images: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor):
        """Random resized crop (area in [crop_scale, 1], aspect in [3/4, 4/3] narrowed to what
        that area allows inside the image) and optional horizontal flip, applied to images
        (→ float in [0, 1]) and boxes alike."""
        b, g = images.shape[0], self.generator
        area = self.crop_scale + (1 - self.crop_scale) * torch.rand(b, generator=g, device=self.device)
        log_r = math.log(3 / 4) + math.log(16 / 9) * torch.rand(b, generator=g, device=self.device)
        # |log r| <= -log(area) keeps both sides within the image (w, h <= 1), so the crop
        # keeps the area drawn: an aspect too wide for it is narrowed, not a side cut short.
        # With crop_scale 1 (flips only) the area is 1 and the aspect 1: the whole image.
        bound = -torch.log(area)
        log_r = torch.clamp(log_r, min=-bound, max=bound)
        w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)  # crop size, fraction of the side (clamp: rounding)
        h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
        x0 = (1 - w) * torch.rand(b, generator=g, device=self.device)
        y0 = (1 - h) * torch.rand(b, generator=g, device=self.device)
        flip = (torch.rand(b, generator=g, device=self.device) < 0.5) if self.flip else torch.zeros(b, dtype=torch.bool, device=self.device)
        sx = torch.where(flip, -w, w)
        # affine_grid maps output coords in [-1, 1] to input coords: x_in = sx·x_out + tx
        theta = torch.zeros(b, 2, 3, device=self.device)
        theta[:, 0, 0], theta[:, 0, 2] = sx, 2 * x0 + w - 1
        theta[:, 1, 1], theta[:, 1, 2] = h, 2 * y0 + h - 1
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out = F.grid_sample(images.float() / 255.0, grid, mode="bilinear", padding_mode="border",
                            align_corners=False)
        x1 = ((boxes[..., 0] - x0[:, None]) / w[:, None]).clamp(0, 1)
        x2 = ((boxes[..., 2] - x0[:, None]) / w[:, None]).clamp(0, 1)
        y1 = ((boxes[..., 1] - y0[:, None]) / h[:, None]).clamp(0, 1)
        y2 = ((boxes[..., 3] - y0[:, None]) / h[:, None]).clamp(0, 1)
        fx1 = torch.where(flip[:, None], 1 - x2, x1)
        fx2 = torch.where(flip[:, None], 1 - x1, x2)
        boxes = torch.stack([fx1, y1, fx2, y2], dim=-1) * box_mask[..., None]
        box_mask = box_mask & _visible(boxes, out.shape[-1])  # boxes cropped away, or to a sliver, vanish
        return out, boxes, box_mask
