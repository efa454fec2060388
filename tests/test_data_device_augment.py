"""Augmented batches from ``eclip.data.device``: random resized crops and flips move the region
boxes with the pixels, keep each crop's area and aspect within range and inside the image, and
every caption of an image gets drawn."""

from pathlib import Path

import pytest
import torch

from eclip.data.cache import Cache
from eclip.data.device import DeviceData

CPU = torch.device("cpu")


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


@pytest.mark.parametrize("augment", [{}, {"flip": True}])
def test_a_sliver_of_a_box_is_no_region_whether_or_not_the_run_augments(augment):
    # a centre crop stored a box 0.003 px wide at the border: trained on as the phrase's place
    # without augmentation, dropped with flips on (the augmentation's own threshold)
    cache = _boxes_cache(n=8)
    cache.region_boxes[0] = torch.tensor([0.0, 0.1, 1e-4, 0.9])  # 0.0064 px of 64
    cache.region_boxes[1] = torch.tensor([0.5, 0.1, 0.5 + 0.6 / 64, 0.9])  # 0.6 px: a real, thin region
    data = DeviceData(cache, torch.arange(8), CPU, seed=0, **augment)
    for _ in range(4):
        batch = data.sample(8)
        image = (batch.tokens[:, 0].long() - 1) // 3
        assert not bool(batch.has_region[image == 0].any())
        assert bool(batch.has_region[image == 1].all()) and bool(batch.has_region[image >= 2].all())
    data.close()


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
