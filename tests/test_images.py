"""Image decoding for the cache: exact pixels of deep and cropped images, box limits."""

import numpy as np
import pytest
from PIL import Image

from eclip.data.images import Job, decode_job, normalise_boxes


def decode(path, size, policy="squash", boxes=()):
    return decode_job(Job(path=str(path), scene=None, boxes=[list(b) for b in boxes], size=size, policy=policy))


def test_sixteen_bit_values_are_divided_by_257_and_rounded(tmp_path):
    # decoded at its own size (no resampling), so every pixel is the 16-bit value scaled:
    # 257·k is k exactly; 257·100 + 200 is 100.78, rounded to 101, not cut to 100
    values = np.array([[0, 257 * 100, 257 * 200, 65535], [257 * 100 + 200, 128, 129, 257 * 254 + 129]] * 2,
                      dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    d = decode(tmp_path / "deep.png", 4)
    assert d.error is None, d.error
    want = np.rint(values / 257.0).astype(np.uint8)
    assert want[1].tolist() == [101, 0, 1, 255]  # the independent computation, spelled out
    assert np.array_equal(d.image, np.broadcast_to(want, (3, 4, 4)))


def test_float_images_stretch_their_finite_range_and_nan_takes_the_minimum(tmp_path):
    a = np.array([[-1000, 3000], [np.nan, 1000]], dtype=np.float32)  # 1000 sits at 127.5: rounds to 128
    Image.fromarray(a).save(tmp_path / "f.tiff")
    d = decode(tmp_path / "f.tiff", 2)
    assert d.error is None, d.error
    assert d.image[0].tolist() == [[0, 255], [0, 128]]


@pytest.mark.parametrize("mode,value,want", [("F", 100.0, 100), ("I", 300, 255), ("I", -5, 0)])
def test_a_constant_deep_image_keeps_its_value_clipped_to_8_bits(tmp_path, mode, value, want):
    # no range to stretch: dividing by max - min = 0 must not happen
    Image.new(mode, (3, 3), value).save(tmp_path / "flat.tiff")
    d = decode(tmp_path / "flat.tiff", 3)
    assert d.error is None, d.error
    assert (d.image == want).all(), d.image[0]


def test_center_crop_keeps_the_middle_square_of_the_pixels(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(10, 30, 3), dtype=np.uint8)  # 30 wide, 10 high
    Image.fromarray(arr).save(tmp_path / "wide.png")
    d = decode(tmp_path / "wide.png", 10, "center-crop", boxes=[(10, 0, 20, 10)])
    assert d.error is None, d.error
    assert np.array_equal(d.image, arr[:, 10:20].transpose(2, 0, 1))  # no resampling at 10 px
    assert d.boxes == [[0.0, 0.0, 1.0, 1.0]]


@pytest.mark.parametrize("width", [31, 33])
def test_center_crop_moves_boxes_by_the_whole_pixels_it_cuts(tmp_path, width):
    # an odd margin (21 or 23 pixels): the pixels were cut at round(10.5) = 10 or round(11.5) =
    # 12 (halves to even), the boxes moved by 10.5 or 11.5, half a pixel off either way
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=(10, width, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    left = (width - 10) // 2
    d = decode(tmp_path / "wide.png", 10, "center-crop", boxes=[(left, 0, left + 10, 10), (left + 2, 1, left + 5, 9)])
    assert d.error is None, d.error
    assert np.array_equal(d.image, arr[:, left:left + 10].transpose(2, 0, 1))
    assert d.boxes == [[0.0, 0.0, 1.0, 1.0], pytest.approx([0.2, 0.1, 0.5, 0.9])]


def test_an_image_over_the_pixel_limit_is_refused(tmp_path, monkeypatch):
    # PIL only warns below twice its limit; decoding it anyway could take all memory
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 pixels: over the limit, under twice it
    d = decode(tmp_path / "big.png", 8)
    assert d.image is None and d.error.startswith(f"unreadable or truncated image {tmp_path / 'big.png'} (")
    assert "exceeds limit" in d.error


@pytest.mark.parametrize("box,want", [
    ((0, 0, 20.5, 5), [0.0, 0.0, 1.0, 0.5]),  # annotation tools round: half a pixel past the right edge
    ((0, 0, 10, 11), [0.0, 0.0, 0.5, 1.0]),  # a whole pixel past the bottom edge: still clipped
])
def test_boxes_within_a_pixel_of_the_border_are_clipped(box, want):
    assert normalise_boxes([list(box)], 20, 10, "squash") == ([want], [])


@pytest.mark.parametrize("box,shown", [
    ((0, 0, 21.5, 5), "0, 0, 21.5, 5"), ((0, 0, 10, 11.5), "0, 0, 10, 11.5"),
    # within the tolerance, but wholly past the border: was dropped as if a crop had cut it
    ((20.5, 1, 21, 5), "20.5, 1, 21, 5"), ((1, 10, 5, 10.8), "1, 10, 5, 10.8"),
])
def test_boxes_further_past_the_border_are_bad(box, shown):
    # both axes are checked, each against its own side (the image is 20 wide, 10 high)
    good = [1, 1, 5, 5]
    assert normalise_boxes([good, list(box)], 20, 10, "squash") == (
        [[0.05, 0.1, 0.25, 0.5], None], [(1, f"bbox [{shown}] lies outside the 20x10 image")])
