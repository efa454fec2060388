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


def test_a_batchs_phrase_ids_tell_twin_phrases_as_their_tokens_do(cache):
    # the expert term keeps one sample per distinct phrase by its id (one sort key), where it
    # once compared the token rows: both must pick the same samples
    import dataclasses

    from eclip.expert import first_of_each

    g = torch.Generator().manual_seed(1)
    r = cache.region_tokens.shape[0]
    twins = dataclasses.replace(cache, region_tokens=torch.randint(1, 3, (r, 2), generator=g, dtype=torch.int32),
                                region_lengths=torch.full((r,), 2, dtype=torch.int32))
    data = DeviceData(twins, torch.arange(300), torch.device("cpu"), seed=0)
    for _ in range(3):
        batch = data.sample(64)
        by_id = first_of_each(batch.phrase_id[:, None], batch.has_region)
        assert torch.equal(by_id, first_of_each(batch.phrase_tokens, batch.has_region))
        assert 0 < int(by_id.sum()) < int(batch.has_region.sum())  # twins there, and dropped
    data.close()
