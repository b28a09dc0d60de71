"""Programmatic checker for the shapes prompt-following benchmark (T2I-CompBench-style categories).

It reads a generated image the way a person would grade it against the prompt's structured scene:
segment the non-background connected components, name each by its nearest palette colour, tell its
shape from its silhouette, and compare centroids for relations. Categories:

- color: the set of colours in the image is the set the prompt names (nothing missing, nothing extra);
- shape: shape binding: the objects of each named colour have the shapes named with that colour;
- count (count prompts): the number of objects of the named colour and shape;
- spatial (spatial prompts): the first named object lies on the named side of the second.

`overall` is the mean of the four category accuracies (as T2I-CompBench averages its categories);
`all_correct` the share of prompts that pass every check that applies to them (GenEval-style).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lidit.jobs.evaluate.spec import CATEGORIES
from lidit.pipelines.shapes import PALETTE, Scene

_COLORS = np.array(list(PALETTE.values()), dtype=np.float64)
_NAMES = list(PALETTE)
# Thresholds measured on ground-truth renders at 16-64 px (docs/evaluation.md).
MIN_COVERAGE = 0.5  # a pixel belongs to an object when it carries >= half the palette colour
MIN_AREA = 0.012  # of the image; the smallest drawn object covers ~0.046
SQUARE_CORNERS = 1.66  # diagonal / axis extent: circle ~1.41, square ~2.0
TRIANGLE_TOP = 0.5  # mass of the top third / bottom third: triangle ~0.25, others ~1


@dataclass(frozen=True)
class Detection:
    """One object found in an image: colour, shape, area and centre as fractions of the image."""

    color: str
    shape: str
    area: float
    x: float
    y: float


def _classify(mask: np.ndarray, weight: np.ndarray) -> str:
    """Shape of one component: triangles are light on top (they point up), squares reach further
    along the diagonals than along the axes, circles do neither."""
    ys, xs = np.nonzero(mask)
    w = weight[mask]
    dy, dx = ys - (ys * w).sum() / w.sum(), xs - (xs * w).sum() / w.sum()
    height = ys.max() - ys.min() + 1
    third = max(1, height // 3)
    top = mask[ys.min() : ys.min() + third].sum()
    bottom = mask[ys.max() - third + 1 : ys.max() + 1].sum()
    if top < TRIANGLE_TOP * bottom:
        return "triangle"
    diagonal = np.mean([(dx + dy).max(), (dx - dy).max(), (dy - dx).max(), (-dx - dy).max()])
    axis = np.mean([dx.max(), -dx.min(), dy.max(), -dy.min()])
    return "square" if axis > 0 and diagonal / axis >= SQUARE_CORNERS else "circle"


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in a uint8 [H, W, 3] image on a black background, largest first."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image: expected [H, W, 3], got {tuple(image.shape)}")
    pixels = image.astype(np.float64)
    height, width = image.shape[:2]
    # Project each pixel on the ray of every palette colour (a darker edge pixel is the colour blended
    # with black); the nearest ray names the colour, the projection length is the coverage.
    coverage = (pixels @ _COLORS.T / (_COLORS**2).sum(1)).clip(0, None)
    residual = ((pixels[..., None, :] - coverage[..., None] * _COLORS) ** 2).sum(-1)
    nearest = residual.argmin(-1)
    weight = np.take_along_axis(coverage, nearest[..., None], -1)[..., 0].clip(0, 1)
    foreground = weight >= MIN_COVERAGE
    found = []
    for index, name in enumerate(_NAMES):
        labels, count = ndimage.label(foreground & (nearest == index))
        for label in range(1, count + 1):
            mask = labels == label
            area = weight[mask].sum() / (height * width)
            if area < MIN_AREA:
                continue
            ys, xs = np.nonzero(mask)
            w = weight[mask]
            found.append(Detection(name, _classify(mask, weight), float(area),
                                   float(((xs + 0.5) * w).sum() / w.sum() / width),
                                   float(((ys + 0.5) * w).sum() / w.sum() / height)))
    return sorted(found, key=lambda d: -d.area)


def _holds(relation: str, first: Detection, second: Detection) -> bool:
    """Centroid rule: the relation's axis dominates and the sign is right."""
    dx, dy = second.x - first.x, second.y - first.y
    if relation in ("left of", "right of"):
        return abs(dx) > abs(dy) and (dx > 0) == (relation == "left of")
    return abs(dy) > abs(dx) and (dy > 0) == (relation == "above")


def check(image: np.ndarray, scene: Scene) -> dict[str, bool]:
    """Pass/fail per category that applies to the scene (color and shape always; count or spatial)."""
    found = detect(image)
    stated_colors = {o.color for o in scene.objects}
    result = {
        "color": {d.color for d in found} == stated_colors,
        "shape": all({d.shape for d in found if d.color == c} == {o.shape for o in scene.objects if o.color == c}
                     for c in stated_colors),
    }
    if scene.kind == "count":
        target = scene.objects[0]
        result["count"] = sum(d.color == target.color and d.shape == target.shape for d in found) == scene.count
    if scene.kind == "spatial":
        first, second = (next((d for d in found if (d.color, d.shape) == (o.color, o.shape)), None)
                         for o in scene.objects)
        result["spatial"] = first is not None and second is not None and _holds(scene.relation, first, second)
    return result


def summarize(results: list[dict[str, bool]]) -> dict[str, float]:
    """Per-category accuracy, `overall` (their mean over categories with prompts) and `all_correct`."""
    if not results:
        raise ValueError("results: no prompts were scored")
    scores: dict[str, float] = {}
    for category in CATEGORIES:
        graded = [r[category] for r in results if category in r]
        if graded:
            scores[category] = float(np.mean(graded))
    scores["overall"] = float(np.mean([scores[c] for c in CATEGORIES if c in scores]))
    scores["all_correct"] = float(np.mean([all(r.values()) for r in results]))
    return scores
