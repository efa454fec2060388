"""The built-in dataset: procedurally drawn scenes of coloured shapes with compositional captions.

Each scene holds 1–3 objects, each a (size, colour, shape) placed in a distinct quadrant, on a
noisy, tinted background. The caption lists the objects in a random order, e.g.
"a large red circle at the top left and a small blue square at the bottom right", and every
object is also a region: its pixel bounding box and its phrase ("a large red circle").

Everything is a pure function of ``(seed, split, index)``, so any worker process can draw any
scene without coordination and a cache rebuilt from the same seed is bit-identical.

Retrieval on it is a real task: a model must bind colour to shape and both to position.
Colour alone collides constantly (8 colours, 1–3 objects), so does shape alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 70, 220),
    "purple": (140, 50, 190),
    "pink": (250, 130, 190),
}
SIZES = {"small": 0.22, "large": 0.40}  # object extent as a fraction of the image side
POSITIONS = {  # quadrant centres as fractions of the image side (x, y)
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
NUM_OBJECTS_P = (0.2, 0.4, 0.4)  # probability of 1, 2, 3 objects in a scene
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
EVAL_GROUP = 100  # evaluation scenes sharing one colour multiset (2–3 objects)
EVAL_GROUP_SINGLE = 40  # the same for one-object scenes (48 distinct layouts per colour)
MIN_GROUPS = 10  # an evaluation split has at least this many colour groups
SUPERSAMPLE = 2  # shapes are drawn at 2x and box-filtered down, for clean edges
# Distinct scenes an evaluation split can hold: one group per colour multiset (8 of one
# colour, 36 of two, 120 of three), each of at most EVAL_GROUP (EVAL_GROUP_SINGLE) scenes.
MAX_EVAL_SCENES = sum(math.comb(len(COLOURS) + n - 1, n) * (EVAL_GROUP if n > 1 else EVAL_GROUP_SINGLE)
                      for n in range(1, len(NUM_OBJECTS_P) + 1))


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in caption order
    seed: int  # the per-scene seed that also drives the background and jitter

    @property
    def caption(self) -> str:
        return " and ".join(f"{o.phrase} at the {o.position}" for o in self.objects)

    @property
    def key(self) -> frozenset:
        """Order-free identity: two scenes with the same key show the same thing."""
        return frozenset(self.objects)


def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def sample_scene(seed: int, split: str, index: int, attempt: int = 0,
                 colours: tuple[str, ...] | None = None) -> Scene:
    """Draw the objects of one scene; ``attempt`` re-draws it (used to avoid duplicates).
    ``colours`` fixes the scene's multiset of colours (and so its object count); the order in
    which they are dealt to objects is still random."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index, attempt])
    n = len(colours) if colours else int(rng.choice(3, p=NUM_OBJECTS_P)) + 1
    if colours is None:
        colours = tuple(list(COLOURS)[int(c)] for c in rng.integers(len(COLOURS), size=n))
    dealt = [colours[int(k)] for k in rng.permutation(n)]
    positions = rng.choice(len(POSITIONS), size=n, replace=False)
    names = list(POSITIONS)
    objs = tuple(
        SceneObject(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            colour=dealt[k],
            size=list(SIZES)[int(rng.integers(len(SIZES)))],
            position=names[int(p)],
        )
        for k, p in enumerate(positions)
    )
    return Scene(objects=objs, seed=int(rng.integers(2**31)))


def _eval_groups(seed: int, split: str, count: int) -> list[tuple[str, ...]]:
    """Colour multisets for an evaluation split, one per scene, in groups of EVAL_GROUP
    (fewer for one-object scenes, which have only 48 distinct layouts per colour, and for
    small splits, which keep at least MIN_GROUPS groups)."""
    if count > MAX_EVAL_SCENES:  # the loop below would run out of multisets and never end
        raise ValueError(f"synthetic {split}: at most {MAX_EVAL_SCENES} distinct evaluation scenes, "
                         f"{count} asked for")
    rng = np.random.default_rng([seed, SPLIT_IDS[split], 2**20])
    out, used = [], set()
    while len(out) < count:
        n = int(rng.choice(3, p=NUM_OBJECTS_P)) + 1
        bag = tuple(sorted(list(COLOURS)[int(c)] for c in rng.integers(len(COLOURS), size=n)))
        if bag in used:  # one group per multiset, so groups never blur into each other
            continue
        used.add(bag)
        # At least MIN_GROUPS groups, so a small split is not one big group of look-alikes.
        size = max(1, min(EVAL_GROUP if n > 1 else EVAL_GROUP_SINGLE, count // MIN_GROUPS))
        out += [bag] * min(size, count - len(out))
    return out


def sample_split(seed: int, split: str, count: int, unique: bool) -> list[Scene]:
    """The scenes of one split.

    Training scenes are drawn freely. Evaluation splits (``unique``) hold distinct scenes
    (no two captions describe the same picture) in groups that share one multiset of
    colours: within a group only shapes, sizes, positions and which colour goes where tell
    scenes apart, so colour alone cannot rank well and a model has to bind attributes.
    """
    groups = _eval_groups(seed, split, count) if unique else [None] * count
    scenes, seen = [], set()
    for i in range(count):
        for attempt in range(1000):
            s = sample_scene(seed, split, i, attempt, colours=groups[i])
            if not unique or s.key not in seen:
                break
        else:  # pragma: no cover - 1000 collisions in a row means the split is too large
            raise ValueError(f"synthetic {split}: cannot draw {count} distinct scenes")
        seen.add(s.key)
        scenes.append(s)
    return scenes


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        t = r / 3
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
                (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
                (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]
    if shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene, size: int) -> tuple[np.ndarray, list[list[float]]]:
    """Draw a scene as uint8 [size, size, 3] RGB plus one pixel box [x1, y1, x2, y2] per object
    (caption order). Boxes are the drawn extent, clipped to the image."""
    rng = np.random.default_rng(scene.seed)
    big = size * SUPERSAMPLE
    # Background: a random tint, a linear gradient and per-pixel noise, so colour statistics
    # of the whole image say little and the model has to find the objects.
    tint = rng.uniform(60, 170, size=3)
    gx, gy = rng.uniform(-40, 40, size=2)
    yy, xx = np.mgrid[0:big, 0:big] / big - 0.5
    bg = tint[None, None, :] + (gx * xx + gy * yy)[..., None]
    bg = bg + rng.normal(0, 18, size=(big, big, 3))
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    boxes = []
    for obj in scene.objects:
        fx, fy = POSITIONS[obj.position]
        jx, jy = rng.uniform(-0.05, 0.05, size=2)
        r = SIZES[obj.size] * big / 2 * rng.uniform(0.9, 1.1)
        cx, cy = (fx + jx) * big, (fy + jy) * big
        colour = tuple(int(c) for c in np.clip(np.array(COLOURS[obj.colour]) + rng.normal(0, 10, 3), 0, 255))
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
            pts = [(cx - r, cy - r), (cx + r, cy + r)]
        else:
            pts = _shape_polygon(obj.shape, cx, cy, r)
            draw.polygon(pts, fill=colour)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        box = [min(xs), min(ys), max(xs), max(ys)]
        boxes.append([float(np.clip(v / SUPERSAMPLE, 0, size)) for v in box])
    img = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8), boxes
