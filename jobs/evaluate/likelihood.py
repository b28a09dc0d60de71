"""A prompt-following score without sampling: does the model denoise a held-out image better under its
true caption than under a hard negative that changes exactly one attribute?

For each held-out shapes image and each category that applies (colour, shape, count, spatial relation),
the denoising error of the true caption and of one negative is averaged over one fixed set of (t, noise)
pairs shared by every candidate and every image (stratified timesteps from the training distribution,
seeded noise); the caption wins when its error is lower. The idea is the diffusion classifier of Li et
al. 2023 ("Your Diffusion Model is Secretly a Zero-Shot Classifier"). Deterministic for a given model
and spec, and cheap: (1 + categories) x pairs forward passes per image, no sampler (docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import random
from statistics import NormalDist

import numpy as np
import torch

from lidit.jobs.evaluate.spec import CATEGORIES, BenchmarkSpec
from lidit.pipelines.shapes import PALETTE, SHAPES, Scene, caption_of, render, samples

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _recaption(scene: Scene, **changes) -> Scene:
    changed = dataclasses.replace(scene, **changes)
    return dataclasses.replace(changed, caption=caption_of(changed))


def _other(options, taken, rng: random.Random) -> str:
    return rng.choice([o for o in options if o not in taken])


def negatives(scene: Scene, rng: random.Random) -> dict[str, Scene]:
    """One hard negative per category that applies to the scene, each changing exactly one attribute of
    the caption: a colour, a shape, the count (2 <-> 3) or the relation (to its opposite)."""
    objects = scene.objects
    out = {}
    if scene.kind == "spatial":
        which = rng.randrange(2)  # the object whose colour, then shape, changes; the pair stays distinct
        other = objects[1 - which]
        color = _other(PALETTE, {objects[which].color, other.color}, rng)
        shape = _other(SHAPES, {objects[which].shape, other.shape}, rng)
        for category, change in (("color", {"color": color}), ("shape", {"shape": shape})):
            changed = list(objects)
            changed[which] = dataclasses.replace(objects[which], **change)
            out[category] = _recaption(scene, objects=tuple(changed))
        out["spatial"] = _recaption(scene, relation=OPPOSITE[scene.relation])
        return out
    # single and count scenes state one colour and one shape, shared by every object
    color, shape = _other(PALETTE, {objects[0].color}, rng), _other(SHAPES, {objects[0].shape}, rng)
    out["color"] = _recaption(scene, objects=tuple(dataclasses.replace(o, color=color) for o in objects))
    out["shape"] = _recaption(scene, objects=tuple(dataclasses.replace(o, shape=shape) for o in objects))
    if scene.kind == "count":
        out["count"] = _recaption(scene, count=5 - scene.count)  # two <-> three
    return out


def shared_pairs(schedule, pairs: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`pairs` timesteps at the midpoints of equal-probability strata of the training distribution
    (uniform steps for eps, logit-normal for flow), each with its own seeded noise of `shape`."""
    quantiles = [(k + 0.5) / pairs for k in range(pairs)]
    if schedule.objective == "flow":
        t = torch.sigmoid(torch.tensor([NormalDist().inv_cdf(q) for q in quantiles]))
    else:
        t = torch.tensor([min(int(q * schedule.num_steps), schedule.num_steps - 1) for q in quantiles])
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + k)) for k in range(pairs)])
    return t, noise


@torch.inference_mode()
def likelihood_score(pipeline, bench: BenchmarkSpec) -> tuple[dict[str, float], list[dict]]:
    """Pairwise accuracy per category ('likelihood.<category>') and their mean ('likelihood.overall'),
    and one row per (image, negative) with both errors, for paired comparisons between models."""
    from lidit.models import denoising_error

    spec = bench.likelihood
    scenes = [scene for _, scene in samples("heldout", spec.images, bench.data_seed, bench.heldout_percent)]
    height, width = pipeline.image_size
    if height != width:
        raise ValueError(f"likelihood: the shapes renderer draws squares; the model's size is {height}x{width}")
    rng = random.Random(spec.seed)
    candidates = [(scene, negatives(scene, rng)) for scene in scenes]
    latent = pipeline.latent_shape(1, height, width)[1:]
    t, noise = shared_pairs(pipeline.schedule, spec.pairs, latent, spec.seed)
    device = pipeline.device
    rows = []
    per_batch = max(1, spec.batch_size // spec.pairs)  # captions scored per forward batch
    jobs = [(i, None) for i in range(len(scenes))] + [(i, c) for i, (_, neg) in enumerate(candidates) for c in neg]
    errors: dict[tuple[int, str | None], float] = {}
    images = pipeline.codec.encode(torch.from_numpy(np.stack([render(scene, height) for scene in scenes]))).to(device)
    for first in range(0, len(jobs), per_batch):
        chunk = jobs[first : first + per_batch]
        captions = [scenes[i].caption if c is None else candidates[i][1][c].caption for i, c in chunk]
        text = [_repeat(f, spec.pairs) for f in pipeline.encode(captions)]
        x0 = images[[i for i, _ in chunk]].repeat_interleave(spec.pairs, 0)
        err = denoising_error(pipeline.model, x0, text, pipeline.schedule, t.repeat(len(chunk)).to(device),
                              noise.repeat(len(chunk), 1, 1, 1).to(device=device, dtype=x0.dtype))
        for job, value in zip(chunk, err.view(len(chunk), spec.pairs).mean(1).tolist()):
            errors[job] = value
    for i, (scene, negs) in enumerate(candidates):
        for category, negative in negs.items():
            true, wrong = errors[(i, None)], errors[(i, category)]
            rows.append({"image": i, "prompt": scene.caption, "negative": negative.caption, "category": category,
                         "true_error": true, "negative_error": wrong, "correct": true < wrong})
    return summarize(rows), rows


def summarize(rows: list[dict]) -> dict[str, float]:
    scores = {}
    for category in CATEGORIES:
        hits = [r["correct"] for r in rows if r["category"] == category]
        if hits:
            scores[f"likelihood.{category}"] = sum(hits) / len(hits)
    scores["likelihood.overall"] = sum(scores.values()) / max(1, len(scores))
    return scores


def _repeat(features, times: int):
    from lidit.models import PromptFeatures

    return PromptFeatures(features.states.repeat_interleave(times, 0), features.mask.repeat_interleave(times, 0),
                          features.caption_start)
