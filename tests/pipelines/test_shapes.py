"""Synthetic shapes: deterministic, compositional captions, a held-out split, readable by webdataset and Ray."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import webdataset as wds

from lidit.pipelines.shapes import PALETTE, Scene, ShapesSpec, caption_of, is_heldout, render, samples, write_shapes


def test_deterministic_by_seed(tmp_path):
    a = write_shapes(str(tmp_path / "a"), ShapesSpec(train=40, heldout=8, shard_size=16, seed=3))
    b = write_shapes(str(tmp_path / "b"), ShapesSpec(train=40, heldout=8, shard_size=16, seed=3))
    assert a == b
    for name in a["splits"]["train"]["shards"] + a["splits"]["heldout"]["shards"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    write_shapes(str(tmp_path / "c"), ShapesSpec(train=40, heldout=8, shard_size=16, seed=4))
    assert (tmp_path / "c" / "train-000000.tar").read_bytes() != (tmp_path / "a" / "train-000000.tar").read_bytes()


def test_heldout_combinations_never_appear_in_training():
    train = {scene.combination() for _, scene in samples("train", 2000)}
    heldout = {scene.combination() for _, scene in samples("heldout", 200)}
    assert heldout and not (train & heldout)
    # ...while every colour and shape on its own is seen in training
    seen = " ".join(train)
    assert all(color in seen for color in PALETTE) and all(s in seen for s in ("circle", "square", "triangle"))


def test_captions_are_compositional_and_match_the_scene():
    scenes = [scene for _, scene in samples("train", 300)]
    assert {s.kind for s in scenes} == {"single", "spatial", "count"}
    for scene in scenes:
        assert scene.caption == caption_of(scene) and Scene.from_dict(scene.to_dict()) == scene
        if scene.kind == "spatial":
            a, b = scene.objects
            axis = "x" if scene.relation in ("left of", "right of") else "y"
            first_smaller = scene.relation in ("left of", "above")
            assert (getattr(a, axis) < getattr(b, axis)) == first_smaller
        if scene.kind == "count":
            assert len(scene.objects) == scene.count
    spatial = next(s for s in scenes if s.kind == "spatial" and s.relation == "left of")
    assert " to the left of " in spatial.caption


def test_render_draws_the_named_colours():
    scene = next(scene for _, scene in samples("train", 50) if scene.kind == "single")
    pixels = render(scene, 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    lit = pixels.reshape(-1, 3)[pixels.reshape(-1, 3).max(1) > 100]
    nearest = min(PALETTE, key=lambda c: np.abs(lit.mean(0) - PALETTE[c]).sum())
    assert nearest == scene.objects[0].color


def test_reads_back_with_webdataset_and_ray(shapes_data, ray_local):
    manifest = json.loads((shapes_data / "dataset.json").read_text())
    urls = [str(shapes_data / name) for name in manifest["splits"]["train"]["shards"]]
    rows = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert len(rows) == manifest["splits"]["train"]["samples"]
    first = rows[0]
    assert first["png"].shape == (32, 32, 3) and first["txt"] == first["json"]["caption"]
    assert not is_heldout(Scene.from_dict(first["json"]["scene"]))

    ds = ray_local.data.read_webdataset(urls)
    ray_rows = ds.take_all()
    assert len(ray_rows) == len(rows)
    by_key = {r["__key__"]: r for r in ray_rows}
    assert np.array_equal(by_key[first["__key__"]]["png"], first["png"])


def test_cli_make_shapes(tmp_path, s3_server):
    lidit = str(Path(sys.executable).with_name("lidit"))
    out = subprocess.run([lidit, "data", "make-shapes", str(tmp_path / "d"), "--train", "20", "--heldout", "5",
                          "--shard-size", "8"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["train"]["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    bad = subprocess.run([lidit, "data", "make-shapes", str(tmp_path / "e"), "--train", "0"], capture_output=True,
                         text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "lidit data: bad spec: make-shapes: train: Input should be greater than 0"
    uri = s3_server.bucket("shapes") + "/v1"
    subprocess.run([lidit, "data", "make-shapes", uri, "--train", "8", "--heldout", "2"], check=True,
                   capture_output=True)
    objects = s3_server.client().list_objects_v2(Bucket="shapes", Prefix="v1/")["Contents"]
    assert sorted(o["Key"] for o in objects) == ["v1/dataset.json", "v1/heldout-000000.tar", "v1/train-000000.tar"]
