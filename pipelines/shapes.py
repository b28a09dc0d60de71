"""Synthetic shapes: small images of coloured shapes with compositional captions.

The demo's training data and the prompt-following benchmark's ground truth. Each sample carries the
structured scene it depicts (objects with colour, shape, size and centre; the relation or count the
caption states), so a programmatic checker can grade generated images against the prompt.

A held-out split keeps attribute combinations (e.g. "a big purple triangle", or "a red circle above a
blue square") out of training entirely, while each colour, shape, size and relation on its own is seen.
Everything is deterministic by seed: sample `i` depends only on (seed, i).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field

from lidit.platform.config import Spec

# Well-separated colours so a checker can name them even in a blurry generated image.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.16, "big": 0.26}  # half-extent as a fraction of the image side
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = {2: "two", 3: "three"}
KINDS = ("single", "spatial", "count")
BACKGROUND = (0, 0, 0)


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    size: str
    x: float  # centre, as a fraction of the width (0 = left)
    y: float  # centre, as a fraction of the height (0 = top)


@dataclass(frozen=True)
class Scene:
    kind: str  # single | spatial | count
    objects: tuple[ShapeObject, ...]
    relation: str | None = None  # spatial: objects[0] <relation> objects[1]
    count: int | None = None
    caption: str = field(default="")

    def combination(self) -> str:
        """The attribute combination the caption states; held-out splits are drawn over these."""
        first = self.objects[0]
        if self.kind == "single":
            return f"single|{first.size}|{first.color}|{first.shape}"
        if self.kind == "count":
            return f"count|{self.count}|{first.color}|{first.shape}"
        second = self.objects[1]
        return f"spatial|{first.color}|{first.shape}|{self.relation}|{second.color}|{second.shape}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "relation": self.relation, "count": self.count, "caption": self.caption,
                "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        return cls(kind=data["kind"], relation=data.get("relation"), count=data.get("count"),
                   caption=data.get("caption", ""), objects=tuple(ShapeObject(**o) for o in data["objects"]))


def is_heldout(scene: Scene, heldout_percent: int = 10, salt: str = "lidit-shapes-v1") -> bool:
    """Deterministic membership of a scene's attribute combination in the held-out split."""
    digest = hashlib.sha256(f"{salt}|{scene.combination()}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < heldout_percent


def _plural(shape: str) -> str:
    return shape + "s"


def caption_of(scene: Scene) -> str:
    first = scene.objects[0]
    if scene.kind == "single":
        return f"a {first.size} {first.color} {first.shape}"
    if scene.kind == "count":
        return f"{COUNT_WORDS[scene.count]} {first.color} {_plural(first.shape)}"
    second = scene.objects[1]
    relation = {"left of": "to the left of", "right of": "to the right of"}.get(scene.relation, scene.relation)
    return f"a {first.color} {first.shape} {relation} a {second.color} {second.shape}"


def random_scene(rng: random.Random) -> Scene:
    kind = rng.choice(KINDS)
    colors = list(PALETTE)
    if kind == "single":
        size = rng.choice(list(SIZES))
        margin = SIZES[size] + 0.04
        objects = (ShapeObject(rng.choice(colors), rng.choice(SHAPES), size,
                               rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)),)
        scene = Scene(kind, objects)
    elif kind == "count":
        count = rng.choice(list(COUNT_WORDS))
        color, shape = rng.choice(colors), rng.choice(SHAPES)
        cells = rng.sample([(cx, cy) for cx in range(2) for cy in range(2)], count)  # 2x2 grid, no overlap
        objects = tuple(ShapeObject(color, shape, "small", (cx + 0.5) / 2 + rng.uniform(-0.05, 0.05),
                                    (cy + 0.5) / 2 + rng.uniform(-0.05, 0.05)) for cx, cy in cells)
        scene = Scene(kind, objects, count=count)
    else:
        relation = rng.choice(RELATIONS)
        (c1, s1), (c2, s2) = [(rng.choice(colors), rng.choice(SHAPES)) for _ in range(2)]
        while (c2, s2) == (c1, s1):
            c2, s2 = rng.choice(colors), rng.choice(SHAPES)
        near, far, across = 0.27, 0.73, rng.uniform(0.3, 0.7)
        a, b = (near, far) if relation in ("left of", "above") else (far, near)
        if relation in ("left of", "right of"):
            positions = ((a, across), (b, across + rng.uniform(-0.08, 0.08)))
        else:
            positions = ((across, a), (across + rng.uniform(-0.08, 0.08), b))
        objects = (ShapeObject(c1, s1, "small", *positions[0]), ShapeObject(c2, s2, "small", *positions[1]))
        scene = Scene(kind, objects, relation=relation)
    return Scene(scene.kind, scene.objects, scene.relation, scene.count, caption_of(scene))


def render(scene: Scene, size: int = 32, supersample: int = 4) -> np.ndarray:
    """Draw a scene as uint8 [size, size, 3] (anti-aliased by supersampling)."""
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = obj.x * big, obj.y * big, SIZES[obj.size] * big
        color = PALETTE[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif obj.shape == "square":
            s = r * 0.86  # equal area-ish footprint to the circle's
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=color)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def samples(split: str, count: int, seed: int = 0, heldout_percent: int = 10) -> Iterator[tuple[int, Scene]]:
    """The first `count` scenes of `split` ('train' or 'heldout') in index order."""
    want_heldout = {"train": False, "heldout": True}[split]
    index = found = 0
    while found < count:
        scene = random_scene(random.Random(f"{seed}:{index}"))
        if is_heldout(scene, heldout_percent) == want_heldout:
            yield index, scene
            found += 1
        index += 1


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def sample_record(index: int, scene: Scene, split: str, size: int) -> dict:
    """A WebDataset sample: png image, txt caption, json with caption + structured scene."""
    meta = {"caption": scene.caption, "split": split, "index": index, "image_size": size, "scene": scene.to_dict()}
    return {"__key__": f"{split}-{index:08d}", "png": encode_png(render(scene, size)),
            "txt": scene.caption.encode("utf-8"), "json": json.dumps(meta).encode("utf-8")}


class ShapesSpec(Spec):
    """A synthetic shapes data set: how many samples, their size, the shards, the held-out split."""

    train: int = Field(2000, gt=0, description="training samples")
    heldout: int = Field(200, gt=0, description="held-out samples (unseen attribute combinations)")
    image_size: int = Field(32, ge=8, description="image side in pixels")
    shard_size: int = Field(250, gt=0, description="samples per tar shard")
    seed: int = 0
    heldout_percent: int = Field(10, gt=0, lt=100, description="share of attribute combinations held out")


def write_shapes(out_uri: str, spec: ShapesSpec = ShapesSpec(), storage=None) -> dict:
    """Write `train-NNNNNN.tar` and `heldout-NNNNNN.tar` WebDataset shards plus `dataset.json` under
    `out_uri` (local folder or s3:// prefix). Each shard is written whole, then moved into place."""
    import tarfile

    from lidit.platform import storage as st

    seed, size, shard_size, heldout_percent = spec.seed, spec.image_size, spec.shard_size, spec.heldout_percent

    def write_split(split: str, count: int) -> list[str]:
        names, batch = [], []
        for index, scene in samples(split, count, seed, heldout_percent):
            batch.append(sample_record(index, scene, split, size))
            if len(batch) == shard_size:
                names.append(flush(split, len(names), batch))
                batch = []
        if batch:
            names.append(flush(split, len(names), batch))
        return names

    def flush(split: str, number: int, batch: list[dict]) -> str:
        name = f"{split}-{number:06d}.tar"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for record in batch:
                for ext in ("png", "txt", "json"):
                    info = tarfile.TarInfo(f"{record['__key__']}.{ext}")
                    info.size, info.mtime, info.mode = len(record[ext]), 0, 0o644
                    tar.addfile(info, io.BytesIO(record[ext]))
        st.write_bytes_atomic(st.join(out_uri, name), buffer.getvalue(), storage)
        return name

    manifest = {"kind": "lidit-shapes", "version": 1, "seed": seed, "image_size": size,
                "heldout_percent": heldout_percent, "shard_size": shard_size,
                "splits": {"train": {"samples": spec.train, "shards": write_split("train", spec.train)},
                           "heldout": {"samples": spec.heldout, "shards": write_split("heldout", spec.heldout)}}}
    st.write_text_atomic(st.join(out_uri, "dataset.json"), json.dumps(manifest, indent=2), storage)
    return manifest
