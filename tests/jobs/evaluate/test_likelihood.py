"""The sampling-free prompt-following score: hard negatives change exactly one attribute, the (t, noise)
pairs are fixed, and the score of a model is a deterministic function of model and spec."""

import random

import pytest
import torch

from helpers import make_checkpoint
from lidit.jobs.evaluate.likelihood import OPPOSITE, likelihood_score, negatives, shared_pairs
from lidit.jobs.evaluate.spec import BenchmarkSpec
from lidit.models import DiffusionSchedule
from lidit.pipelines.shapes import caption_of, samples


def attributes(scene):
    return ([(o.color, o.shape) for o in scene.objects], scene.count, scene.relation)


def test_each_negative_changes_exactly_one_attribute_of_the_caption():
    rng = random.Random(0)
    seen = set()
    for _, scene in samples("heldout", 60, seed=0):
        negs = negatives(scene, rng)
        expected = {"single": {"color", "shape"}, "count": {"color", "shape", "count"},
                    "spatial": {"color", "shape", "spatial"}}[scene.kind]
        assert set(negs) == expected, scene.kind
        seen.add(scene.kind)
        for category, negative in negs.items():
            assert negative.caption == caption_of(negative) and negative.caption != scene.caption
            (pairs, count, relation), (npairs, ncount, nrelation) = attributes(scene), attributes(negative)
            changed_colors = sum(a[0] != b[0] for a, b in zip(pairs, npairs))
            changed_shapes = sum(a[1] != b[1] for a, b in zip(pairs, npairs))
            if category == "spatial":
                assert (npairs, ncount, nrelation) == (pairs, count, OPPOSITE[relation])
            elif category == "count":
                assert (npairs, {count, ncount}, nrelation) == (pairs, {2, 3}, relation)
            else:
                assert (count, relation) == (ncount, nrelation)
                moved = changed_colors if category == "color" else changed_shapes
                assert moved >= 1 and (changed_shapes if category == "color" else changed_colors) == 0
                if scene.kind == "spatial":  # one of the two objects, and the two stay distinguishable
                    assert moved == 1 and npairs[0] != npairs[1]
    assert seen == {"single", "count", "spatial"}


def test_shared_pairs_are_stratified_and_seeded():
    t, noise = shared_pairs(DiffusionSchedule(), 8, (3, 4, 4), seed=5)
    assert t.tolist() == [62, 187, 312, 437, 562, 687, 812, 937]
    again = shared_pairs(DiffusionSchedule(), 8, (3, 4, 4), seed=5)[1]
    assert torch.equal(noise, again) and not torch.equal(noise[0], noise[1])
    flow_t, _ = shared_pairs(DiffusionSchedule(objective="flow"), 4, (1,), seed=0)
    assert flow_t.tolist() == sorted(flow_t.tolist()) and abs(flow_t[:2].sum().item() + flow_t[2:].sum().item() - 2) < 1e-6


def test_the_score_is_deterministic_and_counts_every_image_and_category(tiny_llms, tmp_path):
    from lidit.models.generate import TextToImagePipeline

    pipeline = TextToImagePipeline.from_checkpoint(make_checkpoint(tmp_path / "ckpt", tiny_llms, image_size=16))
    bench = BenchmarkSpec(likelihood={"images": 10, "pairs": 3, "batch_size": 7})
    scores, rows = likelihood_score(pipeline, bench)
    assert scores == likelihood_score(pipeline, bench)[0]  # the same pairs, the same negatives: the same bits
    scenes = [s for _, s in samples("heldout", 10, bench.data_seed, bench.heldout_percent)]
    assert len(rows) == sum(len(negatives(s, random.Random(0))) for s in scenes)
    assert {r["prompt"] for r in rows} == {s.caption for s in scenes}
    for category in {r["category"] for r in rows}:
        mine = [r["correct"] for r in rows if r["category"] == category]
        assert scores[f"likelihood.{category}"] == pytest.approx(sum(mine) / len(mine))
    assert all(r["correct"] == (r["true_error"] < r["negative_error"]) for r in rows)
    other = likelihood_score(pipeline, BenchmarkSpec(likelihood={"images": 10, "pairs": 3, "seed": 1}))[1]
    assert [r["true_error"] for r in other] != [r["true_error"] for r in rows]  # the seed picks the noise
