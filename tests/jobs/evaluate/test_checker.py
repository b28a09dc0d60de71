"""The benchmark checker: near 100 % on ground-truth renders, near 0 % on renders that break the prompt."""

import dataclasses

import numpy as np
import pytest

from lidit.jobs.evaluate.checker import check, detect, summarize
from lidit.pipelines.shapes import PALETTE, SHAPES, Scene, ShapeObject, render, samples

SCENES = [scene for _, scene in samples("heldout", 240, seed=1)]


def _accuracy(images, scenes) -> dict[str, float]:
    return summarize([check(image, scene) for image, scene in zip(images, scenes)])


def _recolor(scene: Scene, colors: list[str]) -> Scene:
    return dataclasses.replace(scene, objects=tuple(dataclasses.replace(o, color=c) for o, c in zip(scene.objects, colors)))


def wrong_colors(scene: Scene) -> Scene:
    unused = [c for c in PALETTE if c not in {o.color for o in scene.objects}]
    mapping = {color: unused[i] for i, color in enumerate(dict.fromkeys(o.color for o in scene.objects))}
    return _recolor(scene, [mapping[o.color] for o in scene.objects])


def swapped_colors(scene: Scene) -> Scene:
    return _recolor(scene, [o.color for o in reversed(scene.objects)])


def wrong_shapes(scene: Scene) -> Scene:
    shift = {s: SHAPES[(i + 1) % len(SHAPES)] for i, s in enumerate(SHAPES)}
    return dataclasses.replace(scene, objects=tuple(dataclasses.replace(o, shape=shift[o.shape]) for o in scene.objects))


def wrong_relation(scene: Scene) -> Scene:
    a, b = scene.objects
    return dataclasses.replace(scene, objects=(dataclasses.replace(a, x=b.x, y=b.y), dataclasses.replace(b, x=a.x, y=a.y)))


def wrong_count(scene: Scene) -> Scene:
    if scene.count == 3:
        return dataclasses.replace(scene, objects=scene.objects[:2])
    taken = {(round(o.x), round(o.y)) for o in scene.objects}  # 2x2 grid cells at 0.25 / 0.75
    free = next((cx, cy) for cx in range(2) for cy in range(2) if (cx, cy) not in taken)
    extra = dataclasses.replace(scene.objects[0], x=(free[0] + 0.5) / 2, y=(free[1] + 0.5) / 2)
    return dataclasses.replace(scene, objects=scene.objects + (extra,))


@pytest.mark.parametrize("size", [32, 64])
def test_ground_truth_renders_score_near_one(size):
    scores = _accuracy([render(s, size) for s in SCENES], SCENES)
    assert {"color", "shape", "count", "spatial"} <= set(scores)
    for category in ("color", "shape", "count", "spatial", "overall"):
        assert scores[category] >= 0.97, (category, scores)


def test_detect_reads_colour_shape_and_position():
    scene = Scene("spatial", (ShapeObject("red", "triangle", "small", 0.27, 0.5),
                              ShapeObject("cyan", "square", "small", 0.73, 0.52)), relation="left of")
    first, second = sorted(detect(render(scene, 32)), key=lambda d: d.x)
    assert (first.color, first.shape, second.color, second.shape) == ("red", "triangle", "cyan", "square")
    assert abs(first.x - 0.27) < 0.04 and abs(second.y - 0.52) < 0.04


@pytest.mark.parametrize("corrupt, kinds, category", [
    (wrong_colors, ("single", "spatial", "count"), "color"),
    (wrong_shapes, ("single", "spatial", "count"), "shape"),
    (swapped_colors, ("spatial",), "shape"),  # a blue circle left of a red square for "a red circle ... blue square"
    (wrong_relation, ("spatial",), "spatial"),
    (wrong_count, ("count",), "count"),
])
def test_wrong_renders_score_near_zero_in_their_category(corrupt, kinds, category):
    scenes = [s for s in SCENES if s.kind in kinds]
    if corrupt is swapped_colors:
        scenes = [s for s in scenes if len({o.color for o in s.objects}) == 2 and len({o.shape for o in s.objects}) == 2]
    assert len(scenes) >= 15
    scores = _accuracy([render(corrupt(s), 32) for s in scenes], scenes)
    assert scores[category] <= 0.03, scores
    assert scores["all_correct"] <= 0.03


def test_blank_and_noise_images_score_near_zero():
    rng = np.random.default_rng(0)
    blank = [np.zeros((32, 32, 3), np.uint8) for _ in SCENES]
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in SCENES]
    for images in (blank, noise):
        scores = _accuracy(images, SCENES)
        assert scores["overall"] <= 0.03 and scores["all_correct"] == 0.0, scores


def test_summarize_rejects_an_empty_benchmark():
    with pytest.raises(ValueError, match="results"):
        summarize([])
