"""The held-out shapes prompt-following benchmark, image grids and public benchmarks' prompt files.

Benchmark: held-out compositional prompts of the synthetic shapes data (attribute combinations never in
training), generated from fixed seeds and graded by `lidit.jobs.evaluate.checker` per T2I-CompBench-style
category.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lidit.jobs.evaluate.spec import BenchmarkSpec, PublicPromptsSpec
from lidit.platform.config import LiditError, StorageSpec


def benchmark_scenes(bench: BenchmarkSpec):
    from lidit.pipelines.shapes import samples

    return [scene for _, scene in samples("heldout", bench.prompts, bench.data_seed, bench.heldout_percent)]


def run_benchmark(pipeline, bench: BenchmarkSpec) -> tuple[dict[str, float], list[dict], np.ndarray]:
    """Generate every held-out prompt's images and grade them. Returns scores, one row per image and the
    images [prompts, samples, H, W, 3]."""
    from lidit.jobs.evaluate.checker import check, summarize

    scenes = benchmark_scenes(bench)
    jobs = [(i, s) for i in range(len(scenes)) for s in range(bench.samples_per_prompt)]
    size = bench.image_size
    images, rows = [], []
    for first in range(0, len(jobs), bench.batch_size):
        chunk = jobs[first : first + bench.batch_size]
        prompts = [scenes[i].caption for i, _ in chunk]
        seeds = [bench.seed + s for _, s in chunk]
        batch = pipeline.generate(prompts, seeds, bench.steps, bench.guidance, size, size).numpy()
        for (i, s), image in zip(chunk, batch):
            verdict = check(image, scenes[i])
            rows.append({"prompt": scenes[i].caption, "kind": scenes[i].kind, "seed": bench.seed + s,
                         **{k: bool(v) for k, v in verdict.items()}, "all": all(verdict.values())})
            images.append(image)
    stacked = np.stack(images).reshape(len(scenes), bench.samples_per_prompt, *images[0].shape)
    return summarize([{k: r[k] for k in ("color", "shape", "count", "spatial") if k in r} for r in rows]), rows, stacked


def grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """[rows, cols, H, W, 3] -> one uint8 image with grey gutters."""
    rows, cols, h, w, _ = images.shape
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 64, np.uint8)
    for r in range(rows):
        for c in range(cols):
            out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = images[r, c]
    return out


def captioned_grid(images: np.ndarray, captions: list[str], verdicts: list[bool | None] | None = None,
                   columns: int = 8, cell: int = 128) -> np.ndarray:
    """Images [N, H, W, 3] in rows of `columns`, each scaled (nearest) to `cell` px wide with its caption
    wrapped under it; a verdict frames the image green (passed every check) or red (failed one)."""
    from PIL import Image, ImageDraw, ImageFont

    count, height, width, _ = images.shape
    scale = max(1, cell // width)
    w, h = width * scale, height * scale
    font = ImageFont.load_default()
    line = 11  # px per caption line of the default bitmap font
    chars = max(8, w // 6)
    wrapped = [_wrap(c, chars) for c in captions]
    text_h = line * max(len(lines) for lines in wrapped) + 4
    pad, rows = 4, -(-count // columns)
    cols = min(columns, count)
    canvas = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(count):
        x, y = pad + (i % columns) * (w + pad), pad + (i // columns) * (h + text_h + pad)
        canvas.paste(Image.fromarray(images[i]).resize((w, h), Image.NEAREST), (x, y))
        verdict = verdicts[i] if verdicts else None
        if verdict is not None:
            draw.rectangle([x - 2, y - 2, x + w + 1, y + h + 1], outline=(30, 160, 60) if verdict else (210, 40, 40),
                           width=2)
        for k, text in enumerate(wrapped[i]):
            draw.text((x, y + h + 2 + k * line), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def _wrap(text: str, chars: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > chars:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return [*lines, current] if current else lines or [""]


def read_prompts(spec: PublicPromptsSpec, storage_spec: StorageSpec | None = None) -> list[dict]:
    """Prompt records from a public benchmark file; each has at least `prompt`."""
    from lidit.platform import storage

    text = storage.read_text(spec.path, storage_spec)
    if spec.path.endswith(".jsonl"):
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif spec.path.endswith(".json"):
        records = json.loads(text)
    else:
        records = [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
    out = []
    for index, record in enumerate(records):
        record = {"prompt": record} if isinstance(record, str) else dict(record)
        if not isinstance(record.get("prompt", record.get("text")), str):
            raise LiditError(f"public.{spec.name}: record {index} of {spec.path} has no 'prompt' string")
        record.setdefault("prompt", record.get("text"))
        out.append(record)
    return out[: spec.limit] if spec.limit else out


def write_public(pipeline, spec: PublicPromptsSpec, bench: BenchmarkSpec, out_dir: Path, storage_spec=None) -> int:
    """GenEval's layout, which the other scorers' loaders adapt to: `<index:05d>/metadata.jsonl`,
    `<index:05d>/samples/<k:04d>.png`, `<index:05d>/grid.png`; plus `prompts.jsonl` for the set."""
    from lidit.pipelines.shapes import encode_png

    records = read_prompts(spec, storage_spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "prompts.jsonl", "w") as index_file:
        for index, record in enumerate(records):
            seeds = [bench.seed + k for k in range(spec.images_per_prompt)]
            images = pipeline.generate([record["prompt"]] * len(seeds), seeds, bench.steps, bench.guidance,
                                       bench.image_size, bench.image_size).numpy()
            folder = out_dir / f"{index:05d}"
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            (folder / "metadata.jsonl").write_text(json.dumps(record) + "\n")
            for k, image in enumerate(images):
                (folder / "samples" / f"{k:04d}.png").write_bytes(encode_png(image))
            cols = int(np.ceil(np.sqrt(len(images))))
            padded = np.concatenate([images, np.zeros((cols * cols - len(images), *images.shape[1:]), np.uint8)])
            (folder / "grid.png").write_bytes(encode_png(grid(padded.reshape(cols, cols, *images.shape[1:]), pad=0)))
            index_file.write(json.dumps({"index": index, "seeds": seeds, **record}) + "\n")
    return len(records)
