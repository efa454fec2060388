"""Batches from ``eclip.data.device``: the device-resident path and the host path with prefetch.

On a CPU both paths run (``placement="host"`` forces the second one); what is checked is the
contract: each image once per epoch, captions belonging to their image, the prefetcher
handing back exactly the rows asked for, in order, and a sampler position that
``snapshot``/``restore`` and ``state_dict``/``load_state_dict`` reproduce bitwise even
though the host path has drawn batches ahead."""

from pathlib import Path

import pytest
import torch

from eclip.data.cache import Cache
from eclip.data.device import DeviceData
from eclip.data.prefetch import HostPrefetcher

CPU = torch.device("cpu")
# On a GPU the host path runs for real: pinned memory, side-stream copies, stream waits.
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def cache():
    """380 random images (300 train) with 1–3 captions and 0–3 regions each (ragged, some
    without any region), built in memory: no dataset preparation, so the CUDA variants run
    on a GPU machine that has only torch, numpy and safetensors."""
    g = torch.Generator().manual_seed(0)
    n, ctx, vocab = 380, 12, 500
    n_cap = torch.randint(1, 4, (n,), generator=g)
    n_reg = torch.randint(0, 4, (n,), generator=g)
    caption_image = torch.repeat_interleave(torch.arange(n), n_cap)
    region_image = torch.repeat_interleave(torch.arange(n), n_reg)
    c, r = caption_image.numel(), region_image.numel()
    lengths = torch.randint(3, ctx + 1, (c,), generator=g, dtype=torch.int32)
    tokens = torch.randint(1, vocab, (c, ctx), generator=g, dtype=torch.int32)
    tokens[torch.arange(ctx)[None, :] >= lengths[:, None]] = 0
    xy = torch.rand(r, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.1 + torch.rand(r, 2, generator=g) * 0.4], dim=1)
    split = torch.zeros(n, dtype=torch.int8)
    split[300:] = 1
    return Cache(path=Path("random"), manifest={"fingerprint": "random"},
                 images=torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8),
                 tokens=tokens, lengths=lengths, caption_image=caption_image, region_boxes=boxes,
                 region_image=region_image, region_tokens=torch.randint(1, vocab, (r, 4), generator=g, dtype=torch.int32),
                 region_lengths=torch.full((r,), 4, dtype=torch.int32), split=split,
                 fold=torch.zeros(n, dtype=torch.int8))


def fingerprints(images: torch.Tensor) -> torch.Tensor:
    """One int64 per image, equal for identical pixels (an exact integer projection of the
    bytes: a float one would depend on the summation order, which depends on the batch)."""
    w = torch.randint(1, 2**20, (images[0].numel(),), generator=torch.Generator().manual_seed(3))
    return (images.flatten(1).long() * w).sum(1)


def rows_of(batch_images: torch.Tensor, cache, rows: torch.Tensor) -> torch.Tensor:
    """The cache row of each image in a batch (uint8 [B, 3, R, R]), found by its pixels."""
    ref = fingerprints(cache.images[rows])
    got = fingerprints(batch_images.cpu())
    match = (got[:, None] == ref[None, :])
    assert bool((match.sum(1) == 1).all()), "a batch image matches no training image, or several"
    return rows[match.float().argmax(1)]


def batches(data, n, b):
    return [data.sample(b) for _ in range(n)]


def same(a, b) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in
               ("images", "tokens", "mask", "boxes", "box_mask", "phrase_tokens", "phrase_mask", "has_region"))


def test_prefetcher_returns_the_rows_asked_for_in_order():
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    pre = HostPrefetcher(images, CPU)
    asks = [torch.randperm(40)[:7], torch.tensor([3, 3, 0]), torch.arange(39, -1, -1)]
    for idx in asks:
        pre.submit(idx)
    assert len(pre) == 3
    for idx in asks:
        assert torch.equal(pre.take(), images[idx])
    with pytest.raises(RuntimeError, match="no batch was submitted"):
        pre.take()
    pre.submit(torch.tensor([1]))
    pre.clear()
    assert len(pre) == 0
    pre.submit(torch.tensor([40]))  # out of range: the gather fails in the thread …
    with pytest.raises(IndexError):
        pre.take()  # … and the batch's taker sees it
    pre.submit(torch.tensor([41]))
    pre.close()  # a failed batch nobody takes does not break the clean-up
    assert pre.pool._shutdown and pre.images is None
    with pytest.raises(ValueError, match="must be in host memory"):
        HostPrefetcher(images.to("meta"), CPU)


def test_the_gather_thread_computes_alone_and_changes_no_other_thread():
    import threading

    # two threads whatever the test run's own setting (the suite runs with one), so that the
    # gather thread's single one differs from the caller's
    outer = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pre = HostPrefetcher(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), CPU)
        assert pre.pool.submit(torch.get_num_threads).result() == 1
        later = []
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert torch.get_num_threads() == 2 and later == [2]
        pre.close()
    finally:
        torch.set_num_threads(outer)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("placement", ["device", "host"])
def test_each_image_once_per_epoch_with_its_own_captions(cache, placement, device):
    rows = cache.split_images("train")  # 300 images
    data = DeviceData(cache, rows, device, seed=1, placement=placement)
    assert data.placement == placement and data.on_device == (placement == "device")
    seen = []
    for batch in batches(data, 6, 50):  # 6 × 50 = one epoch
        got = rows_of(batch.images, cache, rows)
        seen.append(got)
        for r, toks in zip(got.tolist(), batch.tokens.cpu(), strict=True):
            caps = torch.nonzero(cache.caption_image == r).flatten()
            n = toks.numel()
            assert any(torch.equal(toks, cache.tokens[c, :n].long()) for c in caps), r
        assert torch.equal(batch.has_region.cpu(), cache.region_image.bincount(minlength=cache.images.shape[0])[got] > 0)
    assert torch.equal(torch.cat(seen).sort().values, rows.sort().values)
    data.close()


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_host_path_draws_ahead_but_its_state_is_that_of_the_batches_taken(cache, device):
    rows = cache.split_images("train")
    a = DeviceData(cache, rows, device, seed=5, placement="host", lookahead=3)
    batches(a, 4, 64)  # crosses an epoch boundary (300 images): perm and epoch change
    assert len(a._ahead) == 3 and len(a.prefetch) == 3  # drawn and gathered ahead
    state = a.state_dict()
    assert state["epoch"] == 1 and state["cursor"] == 4 * 64 and "index_generator" in state
    snap = a.snapshot()
    after = batches(a, 5, 64)
    a.restore(snap)  # e.g. a step cut short by Ctrl-C gives its batch back
    assert all(same(x, y) for x, y in zip(after, batches(a, 5, 64), strict=True))
    b = DeviceData(cache, rows, device, seed=99, placement="host")  # another seed: the state decides
    b.load_state_dict(state)
    assert all(same(x, y) for x, y in zip(after, batches(b, 5, 64), strict=True))
    a.close()
    # epochs of 4 batches (the tail of 44 rows is left out): the 9th batch opened the third
    assert len(a._ahead) == 0 and a.state_dict()["cursor"] == 64 and a.state_dict()["epoch"] == 3
    b.close()


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("placement", ["device", "host"])
def test_no_image_twice_in_a_batch_across_epochs(cache, placement, device):
    # 300 images in batches of 70: an epoch takes 4 batches and leaves 20 images out; joined
    # to the next epoch's first 50, the 5th batch would often hold an image twice.
    rows = cache.split_images("train")
    data = DeviceData(cache, rows, device, seed=4, placement=placement)
    for batch in batches(data, 20, 70):  # 5 epochs
        assert rows_of(batch.images, cache, rows).unique().numel() == 70
    assert data.state_dict()["epoch"] == 5 and data.state_dict()["cursor"] == 280
    # a batch larger than the split takes a whole epoch, then part of the next
    big = rows_of(data.sample(350).images, cache, rows)
    assert big.unique().numel() == 300 and big.numel() == 350
    data.close()


def test_host_path_follows_a_change_of_batch_size(cache):
    rows = cache.split_images("train")
    data = DeviceData(cache, rows, CPU, seed=2, placement="host")
    twin = DeviceData(cache, rows, CPU, seed=2, placement="host", lookahead=1)
    got = [data.sample(b) for b in (32, 32, 7, 100)]
    want = [twin.sample(b) for b in (32, 32, 7, 100)]
    assert [g.images.shape[0] for g in got] == [32, 32, 7, 100]
    assert all(same(x, y) for x, y in zip(got, want, strict=True))  # the lookahead depth changes nothing drawn
    data.close()
    twin.close()


def test_device_path_state_round_trip_and_bad_options(cache):
    rows = cache.split_images("train")
    a = DeviceData(cache, rows, CPU, seed=3)  # auto on a CPU: resident
    assert a.placement == "device"
    batches(a, 3, 64)
    state = a.state_dict()
    assert "index_generator" not in state
    after = batches(a, 4, 64)
    b = DeviceData(cache, rows, CPU, seed=0)
    b.load_state_dict(state)
    assert all(same(x, y) for x, y in zip(after, batches(b, 4, 64), strict=True))
    with pytest.raises(ValueError, match="data placement: expected auto, device or host, got 'gpu'"):
        DeviceData(cache, rows, CPU, seed=0, placement="gpu")
    with pytest.raises(ValueError, match="lookahead: must be at least 1, got 0"):
        DeviceData(cache, rows, CPU, seed=0, placement="host", lookahead=0)


def phrase_boxes_hold(cache, data, rows, n_batches=4):
    """Each sample's box_mask marks exactly the kept boxes of its image whose phrase is the
    sampled phrase; returns how many samples had more than one such box."""
    several = 0
    for batch in batches(data, n_batches, 50):
        got = rows_of(batch.images, cache, rows)
        for i, r in enumerate(got.tolist()):
            regions = torch.nonzero(cache.region_image == r).flatten()[: batch.box_mask.shape[1]]
            mask = batch.box_mask[i].cpu()
            assert bool(batch.has_region[i]) == (regions.numel() > 0)
            if regions.numel() == 0:
                assert not mask.any()
                continue
            phrase = batch.phrase_tokens[i].cpu()
            toks = cache.region_tokens[regions, : phrase.numel()].long()
            want = (toks == phrase).all(dim=1)  # [R] the image's boxes with the sampled phrase
            assert want.any(), "the phrase is none of the image's kept regions"
            assert torch.equal(mask[: regions.numel()], want) and not mask[regions.numel():].any()
            several += int(want.sum() > 1)
    return several


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_box_mask_marks_the_boxes_of_the_sampled_phrase(cache, device, monkeypatch):
    # The heatmap shows what the phrase names: the drawn region's box, not every box. Two
    # boxes kept per image, so images with three regions have a phrase without a box, which
    # must never be drawn.
    import dataclasses

    from eclip.data import device as device_mod
    monkeypatch.setattr(device_mod, "MAX_REGIONS", 2)
    assert int(cache.region_image.bincount().max()) > 2
    rows = cache.split_images("train")
    assert phrase_boxes_hold(cache, DeviceData(cache, rows, device, seed=2), rows) == 0
    # every region of an even image row gets one phrase ("two women": a box per woman)
    tokens = cache.region_tokens.clone()
    first = torch.zeros_like(cache.region_image)
    for j in range(1, tokens.shape[0]):
        same = cache.region_image[j] == cache.region_image[j - 1]
        first[j] = first[j - 1] if same else j
    even = cache.region_image % 2 == 0
    tokens[even] = tokens[first[even]]
    dup = dataclasses.replace(cache, region_tokens=tokens)
    assert phrase_boxes_hold(dup, DeviceData(dup, rows, device, seed=2), rows) > 10


def test_a_subset_keeps_its_images_captions_and_regions_and_samples_alike(cache):
    # ragged: every fourth image plus the last, so captions (1-3) and regions (0-3) per image vary
    rows = torch.cat([torch.arange(0, 379, 4), torch.tensor([379])])
    sub = cache.subset(rows)
    assert torch.equal(sub.images, cache.images[rows]) and torch.equal(sub.rows, rows)
    assert torch.equal(sub.split, cache.split[rows]) and torch.equal(sub.fold, cache.fold[rows])
    for k, r in enumerate(rows.tolist()):
        cap, new_cap = cache.caption_image == r, sub.caption_image == k
        assert torch.equal(sub.tokens[new_cap], cache.tokens[cap]) and torch.equal(sub.lengths[new_cap], cache.lengths[cap])
        reg, new_reg = cache.region_image == r, sub.region_image == k
        assert torch.equal(sub.region_boxes[new_reg], cache.region_boxes[reg])
        assert torch.equal(sub.region_tokens[new_reg], cache.region_tokens[reg])
    assert sub.tokens.shape[0] == int(torch.isin(cache.caption_image, rows).sum())
    # a subset of a subset still names the original rows; the copies share no memory
    assert torch.equal(sub.subset(torch.tensor([1, 2])).rows, rows[1:3])
    assert sub.images.untyped_storage().data_ptr() != cache.images.untyped_storage().data_ptr()
    # training on the subset is training on those rows of the whole cache: the same batches
    a = DeviceData(cache, rows, CPU, seed=5)
    b = DeviceData(sub, torch.arange(rows.numel()), CPU, seed=5)
    assert all(same(x, y) for x, y in zip(batches(a, 3, 32), batches(b, 3, 32), strict=True))
    with pytest.raises(ValueError, match="rows must be strictly ascending"):
        cache.subset(torch.tensor([3, 1]))


def _boxes_cache(n: int = 64, res: int = 64, seed: int = 5) -> Cache:
    """Black images with one white rectangle each, on whole pixels, and that rectangle as the
    image's only region box; three captions an image (one token each: 3·i + k + 1)."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.randint(4, res // 2, (n, 2), generator=g)
    hi = lo + torch.randint(8, res // 2 - 4, (n, 2), generator=g)
    images = torch.zeros(n, 3, res, res, dtype=torch.uint8)
    for i in range(n):
        images[i, :, lo[i, 1] : hi[i, 1], lo[i, 0] : hi[i, 0]] = 255
    boxes = torch.cat([lo, hi], dim=1).float() / res  # x1, y1, x2, y2
    tokens = torch.zeros(3 * n, 4, dtype=torch.int32)
    tokens[:, 0] = torch.arange(1, 3 * n + 1, dtype=torch.int32)
    return Cache(path=Path("boxes"), manifest={"fingerprint": "boxes"}, images=images, tokens=tokens,
                 lengths=torch.ones(3 * n, dtype=torch.int32), caption_image=torch.arange(n).repeat_interleave(3),
                 region_boxes=boxes, region_image=torch.arange(n), region_tokens=torch.ones(n, 2, dtype=torch.int32),
                 region_lengths=torch.ones(n, dtype=torch.int32), split=torch.zeros(n, dtype=torch.int8),
                 fold=torch.zeros(n, dtype=torch.int8))


def test_a_crop_moves_the_boxes_with_the_pixels():
    # Random resized crops (aspect 3/4..4/3) and flips: where a kept box says the rectangle is,
    # the augmented image must be white, and black away from it. A crop offset or scale taken
    # from the wrong axis, or the aspect ratio ignored, moves the box off its pixels.
    cache = _boxes_cache()
    data = DeviceData(cache, torch.arange(64), CPU, seed=3, crop_scale=0.3, flip=True)
    res, margin = 64, 2.5  # pixels of bilinear edge (an upscaled crop spreads an edge over ~2)
    centre = (torch.arange(res) + 0.5) / res
    checked, stretch = 0, []
    for _ in range(4):
        batch = data.sample(64)
        src = cache.region_boxes[(batch.tokens[:, 0].long() - 1) // 3]  # each sample's box before
        for img, box, keep, before in zip(batch.images, batch.boxes, batch.box_mask, src, strict=True):
            if not keep[0]:
                continue
            if bool((box[0] > 0).all() and (box[0] < 1).all()):  # not clipped: its aspect tells the crop's
                stretch.append(float((box[0, 2] - box[0, 0]) / (box[0, 3] - box[0, 1])
                                     * (before[3] - before[1]) / (before[2] - before[0])))
            x1, y1, x2, y2 = (box[0] * res).tolist()
            u = v = centre * res  # pixel centres, in pixels (square images)
            inside = ((u[None, :] > x1 + margin) & (u[None, :] < x2 - margin)
                      & (v[:, None] > y1 + margin) & (v[:, None] < y2 - margin))
            outside = ((u[None, :] < x1 - margin) | (u[None, :] > x2 + margin)
                       | (v[:, None] < y1 - margin) | (v[:, None] > y2 + margin))
            grey = img.mean(0)  # [H, W] in [0, 1]
            assert bool((grey[outside] < 0.1).all())
            if inside.any():  # a box the crop left a sliver of has no pixel clear of its edges
                assert bool((grey[inside] > 0.9).all())
                checked += 1
    assert checked > 150
    # crops of aspect 3/4..4/3 stretch a box's aspect by the inverse, over the whole range
    assert 0.75 - 1e-4 <= min(stretch) < 0.85 and 1.2 < max(stretch) <= 4 / 3 + 1e-4, (min(stretch), max(stretch))
    data.close()


def test_every_caption_of_an_image_gets_drawn():
    # Three captions an image: each one comes up, about a third of the time.
    cache = _boxes_cache()
    data = DeviceData(cache, torch.arange(64), CPU, seed=4)
    counts = torch.zeros(3)
    for _ in range(60):
        batch = data.sample(64)
        first = batch.tokens[:, 0].long() - 1  # 3·image + which caption
        counts += torch.bincount(first % 3, minlength=3)
    share = counts / counts.sum()
    assert bool((share > 0.28).all()), share
    data.close()


def test_a_sample_whose_box_the_crop_removed_has_no_region():
    # every image has one box; a crop that cuts it away leaves a phrase with an empty
    # heatmap, which the expert term must not train on
    cache = _boxes_cache()
    data = DeviceData(cache, torch.arange(64), CPU, seed=3, crop_scale=0.1)
    lost = 0
    for _ in range(8):
        batch = data.sample(64)
        assert torch.equal(batch.has_region, batch.box_mask.any(dim=1))
        lost += int((~batch.has_region).sum())
    assert lost > 0  # some crops did remove the box
    data.close()


@pytest.mark.parametrize("placement", ["device", "host"])
def test_batches_hold_whole_captions_and_phrases(cache, placement):
    # The token tables are trimmed to the split's longest caption (phrase): the trim must
    # keep every token of that longest one (its <eos>, in a real cache) and drop only
    # the padding no row of the split uses.
    rows = cache.split_images("train")
    data = DeviceData(cache, rows, CPU, seed=6, placement=placement)
    caps = torch.isin(cache.caption_image, rows)
    regs = torch.isin(cache.region_image, rows)
    width, pwidth = int(cache.lengths[caps].max()), int(cache.region_lengths[regs].max())
    assert width == cache.tokens.shape[1] and pwidth == cache.region_tokens.shape[1]  # both full: no slack
    for batch in batches(data, 2, 50):
        assert batch.tokens.shape == (50, width) and batch.phrase_tokens.shape == (50, pwidth)
        got = rows_of(batch.images, cache, rows)
        for i, r in enumerate(got.tolist()):
            mine = cache.tokens[cache.caption_image == r].long()
            assert (mine == batch.tokens[i]).all(dim=1).any(), r  # one of its captions, whole
            if batch.has_region[i]:
                theirs = cache.region_tokens[cache.region_image == r].long()
                assert (theirs == batch.phrase_tokens[i]).all(dim=1).any(), r
    data.close()


def test_an_empty_split_is_refused_by_name(cache):
    # e.g. a fold with no training image: said in words, not as a tensor error later on
    with pytest.raises(ValueError, match="no images to train on in the selected split"):
        DeviceData(cache, torch.zeros(0, dtype=torch.int64), CPU, seed=0)


def test_at_most_max_regions_boxes_are_kept_per_image(cache, monkeypatch):
    # The box tables are as wide as the busiest image, but never wider than MAX_REGIONS.
    from eclip.data import device as device_mod
    rows = cache.split_images("train")
    most = int(torch.bincount(cache.region_image[torch.isin(cache.region_image, rows)]).max())
    assert most == 3
    assert DeviceData(cache, rows, CPU, seed=0).sample(8).box_mask.shape == (8, 3)
    monkeypatch.setattr(device_mod, "MAX_REGIONS", 2)
    batch = DeviceData(cache, rows, CPU, seed=0).sample(8)
    assert batch.boxes.shape == (8, 2, 4) and batch.box_mask.shape == (8, 2)


def test_the_host_image_order_follows_the_seed(cache):
    # The host path draws the order on its own generator: it must be seeded too, or every
    # seed would train on the same sequence of batches.
    rows = cache.split_images("train")

    def order(seed):
        data = DeviceData(cache, rows, CPU, seed=seed, placement="host")
        got = torch.cat([rows_of(b.images, cache, rows) for b in batches(data, 2, 40)])
        data.close()
        return got

    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))


@pytest.mark.parametrize("placement", ["device", "host"])
def test_a_batch_as_large_as_the_split_is_a_permutation_each_time(cache, placement):
    # b == n after a smaller batch: the 10 rows the first epoch has left are not joined to
    # the next epoch's first 30 (which could repeat an image); each such batch is a new epoch.
    rows = cache.split_images("train")[:40]
    data = DeviceData(cache, rows, CPU, seed=3, placement=placement)
    data.sample(30)
    for batch in batches(data, 4, 40):
        assert torch.equal(rows_of(batch.images, cache, rows).sort().values, rows)
    assert data.state_dict()["epoch"] == 5
    data.close()


def test_samples_without_a_region_have_no_phrase(cache):
    # their phrase index falls on a neighbour's phrase: the masks must hide it from the text tower
    rows = cache.split_images("train")
    data = DeviceData(cache, rows, CPU, seed=8)
    batch = data.sample(100)
    none = ~batch.has_region
    assert none.any() and batch.has_region.any()
    assert not batch.phrase_mask[none].any() and not batch.box_mask[none].any()
    assert torch.equal(batch.phrase_mask[~none], batch.phrase_tokens[~none] != 0)


def _ramp_cache(n=8, res=64):
    """Images whose red channel is the column ramp 4·x + 2 and green the row ramp: a crop's
    extent can be read back from the pixels it kept."""
    ramp = (torch.arange(res) * 4 + 2).to(torch.uint8)
    images = torch.zeros(n, 3, res, res, dtype=torch.uint8)
    images[:, 0] = ramp[None, None, :]
    images[:, 1] = ramp[None, :, None]
    return Cache(path=Path("ramp"), manifest={"fingerprint": "ramp"}, images=images,
                 tokens=torch.ones(n, 2, dtype=torch.int32), lengths=torch.ones(n, dtype=torch.int32),
                 caption_image=torch.arange(n), region_boxes=torch.zeros(0, 4),
                 region_image=torch.zeros(0, dtype=torch.int64), region_tokens=torch.zeros(0, 2, dtype=torch.int32),
                 region_lengths=torch.zeros(0, dtype=torch.int32), split=torch.zeros(n, dtype=torch.int8),
                 fold=torch.zeros(n, dtype=torch.int8))


def _crops(images: torch.Tensor, res: int = 64):
    """(x0, y0, w, h, flipped) of each augmented ramp image, read from two interior pixel
    columns (rows) where bilinear sampling of a linear ramp is exact: output pixel j shows
    input position x0 + w·(j + 0.5)/res, mirrored when flipped."""
    to_u = lambda v: v * 255 / 256  # ramp value (4·c + 2)/255 at position u = (c + 0.5)/res
    j1, j2 = 16, 47
    a, b = to_u(images[:, 0, res // 2, j1]), to_u(images[:, 0, res // 2, j2])
    c, d = to_u(images[:, 1, j1, res // 2]), to_u(images[:, 1, j2, res // 2])
    w, h = (b - a).abs() / ((j2 - j1) / res), (d - c) / ((j2 - j1) / res)
    x0 = torch.minimum(a, b) - w * (j1 + 0.5) / res
    y0 = c - h * (j1 + 0.5) / res
    return x0, y0, w, h, b < a


@pytest.mark.parametrize("crop_scale", [0.5, 0.9])
def test_random_crops_keep_their_area_and_aspect_inside_the_image(crop_scale):
    # Area in [crop_scale, 1], aspect in [3/4, 4/3], and the crop inside the image. At 0.9
    # an aspect drawn freely would need a side longer than the image for areas near 1:
    # clamping that side alone would keep less than crop_scale (down to 0.82 of the image).
    data = DeviceData(_ramp_cache(), torch.arange(8), CPU, seed=1, crop_scale=crop_scale, flip=True)
    crops = [_crops(data.sample(8).images) for _ in range(40)]
    x0, y0, w, h, flipped = (torch.cat(t) for t in zip(*crops, strict=True))
    tol = 1e-4
    area, aspect = w * h, w / h
    assert bool((area >= crop_scale - tol).all() and (area <= 1 + tol).all()), (area.min(), area.max())
    assert float(area.min()) < crop_scale + 0.05 and float(area.max()) > 0.95  # the whole range is drawn
    assert bool((aspect >= 0.75 - tol).all() and (aspect <= 4 / 3 + tol).all())
    assert bool((x0 >= -tol).all() and (x0 + w <= 1 + tol).all())
    assert bool((y0 >= -tol).all() and (y0 + h <= 1 + tol).all())
    assert 0.3 < float(flipped.float().mean()) < 0.7  # about half mirrored
    data.close()


def test_flip_only_mirrors_whole_images():
    # crop_scale 1 with flip: each image is the original or its mirror, undistorted, and
    # both happen; its boxes are mirrored with it.
    cache = _boxes_cache(n=32)
    data = DeviceData(cache, torch.arange(32), CPU, seed=2, flip=True)
    batch = data.sample(32)
    src = (batch.tokens[:, 0].long() - 1) // 3  # each sample's image row
    original = cache.images[src].float() / 255
    same = (batch.images - original).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (batch.images - original.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    # (an image symmetric about its middle column is both)
    assert bool((same | mirrored).all()) and bool((same & ~mirrored).any()) and bool((mirrored & ~same).any())
    box = cache.region_boxes[src]
    want = torch.where(mirrored[:, None], torch.stack([1 - box[:, 2], box[:, 1], 1 - box[:, 0], box[:, 3]], -1), box)
    torch.testing.assert_close(batch.boxes[:, 0], want, atol=1e-6, rtol=0)
    data.close()


def test_clearing_a_failed_gather_raises_nothing():
    # The sampler rewinds (restore, a change of batch size, close) after a gather failed:
    # that batch's error belongs to nobody and must not surface in the clean-up.
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    pre = HostPrefetcher(images, CPU)
    pre.submit(torch.tensor([6]))
    assert isinstance(pre.pending[0].exception(timeout=10), IndexError)  # it ran, and failed
    pre.clear()
    pre.submit(torch.tensor([5, 0]))
    assert torch.equal(pre.take(), images[[5, 0]])  # the queue goes on
    pre.submit(torch.tensor([7]))
    pre.pending[0].exception(timeout=10)
    pre.close()
    assert pre.images is None
