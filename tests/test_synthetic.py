"""The built-in dataset: determinism, uniqueness, honest boxes, and that it is a real task."""

import math
import signal
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from eclip.data import synthetic
from eclip.data.synthetic import (
    COLOURS,
    POSITIONS,
    SHAPES,
    Scene,
    SceneObject,
    render_scene,
    sample_split,
)
from eclip.evaluate import retrieval_metrics


def test_scenes_and_pixels_are_deterministic():
    a = sample_split(7, "train", 50, unique=False)
    b = sample_split(7, "train", 50, unique=False)
    assert a == b
    assert a != sample_split(8, "train", 50, unique=False)
    img_a, box_a = render_scene(a[3], 64)
    img_b, box_b = render_scene(b[3], 64)
    assert np.array_equal(img_a, img_b) and box_a == box_b
    assert img_a.shape == (64, 64, 3) and img_a.dtype == np.uint8


def test_vocabulary_of_the_task():
    scenes = sample_split(1, "train", 2000, unique=False)
    objs = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES) and len(SHAPES) >= 4
    assert {o.colour for o in objs} == set(COLOURS) and len(COLOURS) >= 8
    assert {o.size for o in objs} == {"small", "large"}
    assert {o.position for o in objs} == set(POSITIONS) and len(POSITIONS) >= 4
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    for s in scenes[:50]:  # objects of a scene sit in distinct places
        assert len({o.position for o in s.objects}) == len(s.objects)
    s = next(s for s in scenes if len(s.objects) == 2)
    o1, o2 = s.objects
    assert s.caption == f"a {o1.size} {o1.colour} {o1.shape} at the {o1.position} and " \
                        f"a {o2.size} {o2.colour} {o2.shape} at the {o2.position}"


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluation_captions_are_unique(split):
    scenes = sample_split(42, split, 1000, unique=True)
    assert len({s.caption for s in scenes}) == 1000
    assert len({s.key for s in scenes}) == 1000  # not even a reordering of another caption


def test_region_boxes_cover_their_objects():
    # The pixel at each box's centre has the named colour (every shape is filled there).
    for scene in sample_split(3, "val", 40, unique=True):
        img, boxes = render_scene(scene, 64)
        assert len(boxes) == len(scene.objects)
        for obj, (x1, y1, x2, y2) in zip(scene.objects, boxes, strict=True):
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
            got = img[cy, cx].astype(float)
            want = np.array(COLOURS[obj.colour], dtype=float)
            assert np.abs(got - want).max() < 50, (obj, got, want)
            fx, fy = POSITIONS[obj.position]  # and the box lies in the named quadrant
            assert abs((x1 + x2) / 128 - fx) < 0.1 and abs((y1 + y2) / 128 - fy) < 0.1


def _bag(scene, attr, values):
    v = np.zeros(len(values))
    for o in scene.objects:
        v[values.index(getattr(o, attr))] += 1
    return v


def test_colour_alone_cannot_get_near_a_good_mean_rank():
    """A matcher that perceives colours perfectly (exact colour counts on both sides) but
    nothing else: ties count against it, so it ranks about as far down as the scenes that
    share its colours. A trained model must reach a val mean rank <= 50; colour alone
    stays near 90, and a full description ranks 0 (the task is solvable)."""
    scenes = sample_split(42, "val", 1000, unique=True)
    colours = torch.tensor(np.stack([_bag(s, "colour", list(COLOURS)) for s in scenes]))
    colour_only = retrieval_metrics(colours, colours)["mean_rank"]
    assert colour_only > 80
    full = torch.tensor(np.stack([
        np.concatenate([[o.colour == c and o.shape == sh and o.size == sz and o.position == p
                         for o in s.objects] for c in COLOURS for sh in SHAPES
                        for sz in ("small", "large") for p in POSITIONS]).reshape(-1, len(s.objects)).sum(1)
        for s in scenes]).astype(float))
    assert retrieval_metrics(full, full)["mean_rank"] == 0


def test_one_object_groups_fit_their_layouts():
    # 48 layouts per colour for one-object scenes: the group size must leave room.
    assert synthetic.EVAL_GROUP_SINGLE <= len(SHAPES) * 2 * len(POSITIONS)


def test_evaluation_splits_are_capped_at_the_distinct_scenes_that_exist():
    # Every colour multiset is one group: the cap is reachable, one more scene is refused
    # (it used to loop forever looking for a multiset not yet used).
    cap = synthetic.MAX_EVAL_SCENES
    groups = synthetic._eval_groups(0, "val", cap)
    assert len(groups) == cap and len(set(groups)) == 8 + 36 + 120

    def hung(*_):
        raise TimeoutError("_eval_groups did not return")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        with pytest.raises(ValueError, match=f"synthetic val: at most {cap} distinct evaluation scenes"):
            synthetic._eval_groups(0, "val", cap + 1)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextmanager
def _within(seconds: int):
    def hung(*_):
        raise TimeoutError(f"did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("count", [5, 37, 120])
def test_a_small_evaluation_split_keeps_many_colour_groups(count):
    # one colour multiset per group, at least MIN_GROUPS groups (one scene each when the
    # split is smaller than that), in consecutive runs, one entry per scene
    with _within(20):  # a group size of 0 for small splits would loop forever
        groups = synthetic._eval_groups(0, "val", count)
    assert len(groups) == count
    runs = [g for i, g in enumerate(groups) if i == 0 or g != groups[i - 1]]
    assert len(runs) == len(set(runs)) >= min(count, synthetic.MIN_GROUPS)
    assert max(groups.count(g) for g in set(groups)) <= max(1, count // synthetic.MIN_GROUPS)
    scenes = sample_split(0, "val", count, unique=True)
    assert [tuple(sorted(o.colour for o in s.objects)) for s in scenes] == groups


def test_colours_of_a_group_are_dealt_in_random_order():
    # within a colour group the caption must not list colours in a fixed (sorted) order,
    # or the first word after "a small/large" would give the scene's colour bag away
    scenes = sample_split(42, "val", 1000, unique=True)
    firsts = [s.objects[0].colour == min(o.colour for o in s.objects)
              for s in scenes if len({o.colour for o in s.objects}) > 1]
    assert len(firsts) > 300 and 0.3 < np.mean(firsts) < 0.7


# geometric fill of the box by each shape (area of the shape over area of its bounding box)
_STAR = (10 * 0.5 * 0.45 * math.sin(math.pi / 5)) / (2 * math.cos(math.pi / 10) * (1 + math.sin(3 * math.pi / 10)))
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "cross": 5 / 9, "star": _STAR}


@pytest.mark.parametrize("shape", list(FILL))
def test_each_shape_fills_its_box_as_its_geometry_says(shape):
    # A large blue shape alone: the share of its box in its colour is the shape's own area
    # ratio, and its box is the whole drawn extent (no blue pixel outside it).
    size = 160
    fills = []
    for seed in range(3):
        obj = SceneObject(shape=shape, colour="blue", size="large", position="top left")
        img, [box] = render_scene(Scene(objects=(obj,), seed=seed), size)
        blue = np.abs(img.astype(float) - np.array(COLOURS["blue"])).max(-1) < 45
        x1, y1, x2, y2 = box
        inside = np.zeros_like(blue)
        inside[math.ceil(y1):math.floor(y2), math.ceil(x1):math.floor(x2)] = True
        fills.append(blue[inside].mean())
        grown = np.zeros_like(blue)
        grown[max(0, int(y1) - 1):int(y2) + 2, max(0, int(x1) - 1):int(x2) + 2] = True
        assert blue[~grown].mean() < 0.01, seed
    assert np.median(fills) == pytest.approx(FILL[shape], abs=0.06)


def test_a_box_near_the_edge_is_the_drawn_extent():
    # A square's box is square, also when the square comes within a pixel of the image's
    # right edge (boxes are clipped to [0, size] only, which a shape never passes).
    obj = SceneObject(shape="square", colour="red", size="large", position="top right")
    near = 0
    for seed in range(100):
        _, [(x1, y1, x2, y2)] = render_scene(Scene(objects=(obj,), seed=seed), 32)
        assert x2 <= 32 and x2 - x1 == pytest.approx(y2 - y1, abs=1e-9), seed
        near += x2 > 31
    assert near > 5
