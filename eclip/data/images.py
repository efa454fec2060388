"""Image decoding for the cache: file or synthetic scene → uint8 [3, R, R] plus boxes in [0, 1].

Runs in worker processes (``decode_job`` is a top-level function so it pickles). Errors come
back as values, not exceptions, so one bad image cannot take a pool down and the parent
reports it at the row that named the image (or, for a bad box, at the row that gave the box).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from eclip.data import synthetic
from eclip.errors import first_line

RESIZE_POLICIES = ("squash", "center-crop")
BOX_TOLERANCE_PX = 1.0  # annotation tools round; a box this far past the border is clipped
DECODE_VERSION = 2  # bump when decoding changes pixels, so caches rebuild (2: deep images scaled)


@dataclass
class Job:
    path: str | None  # image file to decode, or None for a synthetic scene
    scene: synthetic.Scene | None  # the scene to draw when path is None
    boxes: list[list[float]]  # pixel boxes of the record (ignored for scenes: they draw their own)
    size: int  # output resolution R
    policy: str  # "squash" or "center-crop"


@dataclass
class Decoded:
    image: np.ndarray | None  # uint8 [3, R, R], None on error
    boxes: list[list[float] | None]  # normalised (x1, y1, x2, y2) per input box; None = cropped away or bad
    error: str | None = None  # one-line problem when the image could not be decoded
    bad_boxes: list[tuple[int, str]] = field(default_factory=list)  # (input box index, problem)
    # an EXIF orientation other than upright: not applied (pixels and boxes stay in the stored
    # frame, as PIL and torchvision read them by default), so prepare says how many there are
    rotated: bool = False


def _crop_box(policy: str, w: int, h: int) -> tuple[float, float, float, float]:
    """The visible window in source pixels: left, top, width, height."""
    if policy == "squash":
        return 0.0, 0.0, float(w), float(h)
    m = min(w, h)
    # whole pixels, as the crop cuts them: a half-pixel offset (w - m odd) put every box half a
    # source pixel off its pixels, one way or the other as round() took the half to even
    return float((w - m) // 2), float((h - m) // 2), float(m), float(m)


def normalise_boxes(boxes: list[list[float]], w: int, h: int,
                    policy: str) -> tuple[list, list[tuple[int, str]]]:
    """Pixel boxes → [0, 1] boxes in the resized image's frame, after checking they lie in the
    source image. A box that ends up entirely outside a centre crop becomes None. Every box is
    checked (the boxes of one image come from several rows, each reported at its own line):
    a bad one becomes None too and is listed with its index in the second result."""
    x0, y0, sx, sy = _crop_box(policy, w, h)
    out, bad = [], []
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        # within the tolerance a box may still lie wholly past the border ([48.5, 1, 49, 5] on
        # a width of 48): nothing of it is in the picture, which is no crop's doing
        if x2 > w + BOX_TOLERANCE_PX or y2 > h + BOX_TOLERANCE_PX or x1 >= w or y1 >= h:
            shown = ", ".join(f"{v:g}" for v in (x1, y1, x2, y2))
            bad.append((k, f"bbox [{shown}] lies outside the {w}x{h} image"))
            out.append(None)
            continue
        nx1, nx2 = (np.clip([x1, x2], 0, w) - x0) / sx
        ny1, ny2 = (np.clip([y1, y2], 0, h) - y0) / sy
        nb = [float(np.clip(v, 0.0, 1.0)) for v in (nx1, ny1, nx2, ny2)]
        out.append(nb if nb[2] > nb[0] and nb[3] > nb[1] else None)
    return out, bad


def _to_8bit(im: Image.Image) -> Image.Image:
    """Deep images (16-bit and float: medical PNGs, scientific TIFFs) as 8-bit greyscale.
    ``convert("RGB")`` clips them at 255 instead of scaling, so a 16-bit scan comes out almost
    white. I;16 modes span 0..65535 and are divided by 257 (65535 → 255). I (int32) and F
    (float32) have no range of their own (the same mode holds 16-bit data from older decoders,
    floats in [0, 1], Hounsfield units, ...), so the image's own min..max is stretched to
    0..255; a constant image keeps its value, clipped to 0..255. Non-finite floats become the
    minimum."""
    if im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.float32) / 257.0
    elif im.mode in ("I", "F"):
        a = np.asarray(im).astype(np.float32)
        finite = np.isfinite(a)
        lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0.0, 0.0)
        a = np.where(finite, a, lo)
        if hi > lo:
            a = (a - lo) * np.float32(255.0 / (hi - lo))
    else:
        return im
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


EXIF_ORIENTATION = 0x0112  # the tag; 1 is upright, 2..8 flips and rotations a viewer applies


def _load(path: str, size: int, policy: str) -> tuple[np.ndarray, int, int, bool]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im.load()  # forces a full decode: truncated files fail here, not later
            try:
                rotated = im.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1)
            except Exception:  # a damaged EXIF block: the pixels decoded, which is what counts
                rotated = False
            w, h = im.size
            im = _to_8bit(im).convert("RGB")
            x0, y0, sx, sy = _crop_box(policy, w, h)
            if policy == "center-crop":
                im = im.crop((round(x0), round(y0), round(x0 + sx), round(y0 + sy)))
            im = im.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy(), w, h, rotated


def decode_job(job: Job) -> Decoded:
    if job.scene is not None:
        img, px_boxes = synthetic.render_scene(job.scene, job.size)
        boxes = [[v / job.size for v in b] for b in px_boxes]
        return Decoded(image=img.transpose(2, 0, 1).copy(), boxes=boxes)
    try:
        img, w, h, rotated = _load(job.path, job.size, job.policy)
    except Exception as e:  # PIL raises many types: OSError, SyntaxError, ValueError, …
        return Decoded(image=None, boxes=[], error=f"unreadable or truncated image {job.path} ({first_line(e)})")
    boxes, bad = normalise_boxes(job.boxes, w, h, job.policy)
    return Decoded(image=img, boxes=boxes, bad_boxes=bad, rotated=rotated)
