"""`lidit evaluate SPEC.yaml`: the prompt-following benchmark, the positional-bias probe and public-benchmark
image grids for a checkpoint folder or a registered version (`models:/NAME@ALIAS`, `models:/NAME/VERSION`).

Benchmark: held-out compositional prompts of the synthetic shapes data (attribute combinations never in
training), generated from fixed seeds and graded by `lidit.jobs.checker` per T2I-CompBench-style category.
Results go to an MLflow run (metrics, `benchmark.json` table, image grids, probe table) and, for a
registered version, onto the version as `lidit.eval.*` tags (the promotion gate reads them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import Field

from lidit.platform.config import LiditError, Spec, StorageSpec, TrackingSpec

log = logging.getLogger(__name__)


class BenchmarkSpec(Spec):
    """The shapes prompt-following benchmark; everything but `batch_size` defines its identity (`key`)."""

    prompts: int = Field(48, gt=0, description="held-out prompts")
    data_seed: int = Field(0, description="seed of the shapes data whose held-out split is used")
    heldout_percent: int = Field(10, gt=0, lt=100)
    samples_per_prompt: int = Field(1, gt=0, description="images per prompt (seeds seed, seed+1, ...)")
    seed: int = 0
    steps: int = Field(20, gt=0)
    guidance: float = Field(4.0, ge=1.0)
    image_size: int | None = Field(None, gt=0, description="None: the checkpoint's")
    batch_size: int = Field(16, gt=0)

    def key(self) -> str:
        fields = self.model_dump(exclude={"batch_size"})
        return "shapes-" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


class PublicPromptsSpec(Spec):
    """A public benchmark's prompt list (GenEval metadata.jsonl, DPG-Bench / T2I-CompBench .txt, or .json)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(..., description="local or s3:// file: .txt (one prompt a line), .jsonl, .json")
    images_per_prompt: int = Field(4, gt=0)
    limit: int | None = Field(None, gt=0)


class ProbeSpec(Spec):
    enabled: bool = True
    pairs: int = Field(16, gt=0)
    timestep: int = Field(500, ge=0)


class EvaluateSpec(Spec):
    model: str = Field(..., description="checkpoint folder (local or s3://) or models:/NAME@ALIAS|/VERSION")
    output: str = Field(".lidit/evaluate", description="where image grids and tables go (local or s3://)")
    workdir: str = Field(".lidit", description="local folder for the default sqlite MLflow store")
    device: str = "cpu"
    encoder_paths: dict[str, str] = Field(default_factory=dict, description="encoder name -> local model folder")
    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec)
    public: list[PublicPromptsSpec] = Field(default_factory=list)
    probe: ProbeSpec = Field(default_factory=ProbeSpec)
    log_to_mlflow: bool = True
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)


@dataclass
class EvaluationResult:
    scores: dict[str, float]
    benchmark: str
    rows: list[dict]
    probe: list[dict] = field(default_factory=list)
    version: str | None = None
    run_id: str | None = None
    output: str | None = None


def benchmark_scenes(bench: BenchmarkSpec):
    from lidit.pipelines.shapes import samples

    return [scene for _, scene in samples("heldout", bench.prompts, bench.data_seed, bench.heldout_percent)]


def run_benchmark(pipeline, bench: BenchmarkSpec) -> tuple[dict[str, float], list[dict], np.ndarray]:
    """Generate every held-out prompt's images and grade them. Returns scores, one row per image and the
    images [prompts, samples, H, W, 3]."""
    from lidit.jobs.checker import check, summarize

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


def evaluate(spec: EvaluateSpec) -> EvaluationResult:
    """Run the benchmark (+ probe, + public grids) and record the results in MLflow."""
    from lidit.jobs.probe import caption_pairs, format_rows, positional_bias
    from lidit.models.generate import TextToImagePipeline
    from lidit.pipelines.shapes import encode_png
    from lidit.platform import registry, storage, tracking

    uri = tracking.tracking_uri(spec.tracking, spec.workdir) if spec.log_to_mlflow else spec.tracking.tracking_uri
    resolved = registry.resolve(spec.model, uri)
    try:
        pipeline = TextToImagePipeline.from_checkpoint(resolved.folder, spec.device, spec.encoder_paths or None)
    except (ValueError, FileNotFoundError) as err:
        raise LiditError(f"model {spec.model}: {err}") from None
    key = spec.benchmark.key()
    scores, rows, images = run_benchmark(pipeline, spec.benchmark)
    probe_rows = []
    if spec.probe.enabled:
        probe_rows = positional_bias(pipeline.encoders, pipeline.model, caption_pairs(spec.probe.pairs),
                                     spec.probe.timestep)
    version = resolved.version
    label = f"{version.name}-v{version.version}" if version else Path(resolved.folder).name
    result = EvaluationResult(scores, key, rows, probe_rows, version.version if version else None)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "benchmark.json").write_text(json.dumps({"benchmark": key, "scores": scores, "rows": rows}, indent=1))
        (out / "benchmark_grid.png").write_bytes(encode_png(grid(images)))
        (out / "probe.json").write_text(json.dumps(probe_rows, indent=1))
        for public in spec.public:
            count = write_public(pipeline, public, spec.benchmark, out / "public" / public.name, spec.storage)
            log.info("public %s: %d prompts written", public.name, count)
        result.output = storage.join(spec.output, label, key)
        storage.upload_dir(str(out), result.output, spec.storage)
        if spec.log_to_mlflow:
            run_id, _ = tracking.start_run(uri, spec.tracking.experiment, f"evaluate {label} {key}",
                                           tags={"lidit.job": "evaluate", "lidit.model": spec.model,
                                                 "lidit.benchmark": key, "lidit.model_version": label})
            tracking.log_spec(uri, run_id, spec)
            tracking.log_metrics(uri, run_id, {f"benchmark.{k}": v for k, v in scores.items()}, step=0)
            tracking.log_metrics(uri, run_id, {f"probe.{r['encoder']}.{k}": r[k] for r in probe_rows
                                               for k in ("raw", "refined", "fused") if k in r}, step=0)
            tracking.client(uri).log_table(run_id, {k: [r.get(k) for r in rows] for k in rows[0]}, "benchmark_table.json")
            tracking.log_artifact(uri, run_id, str(out))
            tracking.end_run(uri, run_id)
            result.run_id = run_id
            if version is not None:
                registry.record_evaluation(uri, version.name, version.version, key, scores, run_id)
    print(format_scores(scores, key, label))
    if probe_rows:
        print(format_rows(probe_rows))
    return result


def format_scores(scores: dict[str, float], key: str, label: str) -> str:
    names = [k for k in ("color", "shape", "count", "spatial", "overall", "all_correct") if k in scores]
    return "\n".join([f"benchmark {key} for {label}", "  ".join(f"{n:>11}" for n in names),
                      "  ".join(f"{scores[n]:>11.3f}" for n in names)])


def untrained_checkpoint(folder: str, encoders: dict, preset: str = "tiny", image_size: int = 32,
                         seed: int = 0, **overrides) -> str:
    """A checkpoint of a freshly initialised model (what training starts from): the benchmark's floor.
    `encoders`: name -> `EncoderConfig` (identity codec, pixels)."""
    import torch

    from lidit.models import IdentityCodec, LiDiT, lidit_config, save_checkpoint

    dims = [json.loads((Path(c.path) / "config.json").read_text())["hidden_size"] for c in encoders.values()]
    torch.manual_seed(seed)
    model = LiDiT(lidit_config(preset, in_channels=3, encoder_dims=dims, **overrides))
    entries = [{"name": name, **config.to_dict()} for name, config in encoders.items()]
    save_checkpoint(folder, model, model, {"encoders": entries, "codec": IdentityCodec().config(),
                                           "image_shape": [3, image_size, image_size]})
    return folder


SPEC = EvaluateSpec  # the spec class `lidit submit` validates against


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lidit.platform.cli import add_spec_arguments

    add_spec_arguments(parser, required=False)
    parser.add_argument("--model", help="checkpoint folder or models:/NAME@ALIAS (overrides the spec's)")


def run(args: argparse.Namespace) -> int:
    from lidit.platform.config import load_spec

    overrides = list(args.overrides) + ([f"model={args.model}"] if args.model else [])
    spec = load_spec(EvaluateSpec, args.spec or Path(__file__).parent / "configs" / "evaluate.yaml", overrides)
    result = evaluate(spec)
    print(f"lidit evaluate: results in {result.output}" + (f", MLflow run {result.run_id}" if result.run_id else ""))
    return 0
