"""`lidit precompute SPEC.yaml`: WebDataset shards -> frozen-LLM hidden states + image latents (Parquet).

Runs `lidit.pipelines.precompute.run_precompute` on Ray (a private local Ray unless `ray.address` says
otherwise), prints a summary (rows, skipped by reason, tokens/s and padding waste per encoder, bytes), and
with `--json` one JSON object as the last line. Rerunning the same spec resumes: committed input shards
are skipped.
"""

from __future__ import annotations

import argparse
import json
from typing import Literal

from pydantic import Field, field_validator

from lidit.platform.cli import add_spec_arguments
from lidit.platform.config import EncoderSpec, LiditError, RaySpec, Spec, StorageSpec, load_spec


class CodecSpec(Spec):
    """The image codec (`lidit.models.codecs`) and its stage's resources."""

    kind: Literal["identity", "vae"] = "identity"
    path: str | None = Field(None, description="diffusers AutoencoderKL folder (kind: vae)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = Field(64, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    actors: int = Field(1, gt=0)

    def config(self) -> dict:
        if self.kind == "identity":
            return {"kind": "identity"}
        if not self.path:
            raise LiditError("codec.path: required for kind 'vae'")
        return {"kind": "vae", "path": self.path, "dtype": self.dtype}


class PrecomputeSpec(Spec):
    """What `lidit precompute` reads, runs and writes."""

    input: str = Field(..., description="WebDataset tar shards: local or s3:// path, brace pattern or glob")
    output: str = Field(..., description="root folder or s3:// prefix; data lands in <output>/<fingerprint>/")
    image_size: int = Field(32, ge=8, description="images are centre-cropped and resized to this square side")
    encoders: list[EncoderSpec] = Field(..., min_length=1)
    codec: CodecSpec = CodecSpec()
    store_dtype: Literal["float16", "bfloat16"] = Field(
        "bfloat16", description="stored dtype of the hidden states (float16 overflows on large LLM activations)")
    window: int = Field(1024, gt=0, description="rows per encoder batch window, sorted by token length")
    read_num_cpus: float = Field(1.0, gt=0)
    write_num_cpus: float = Field(1.0, gt=0)
    commit_interval_s: float = Field(2.0, ge=0, description="at most one manifest rewrite per interval")
    storage: StorageSpec = StorageSpec()
    ray: RaySpec = RaySpec()

    @field_validator("encoders")
    @classmethod
    def _unique_names(cls, encoders: list[EncoderSpec]) -> list[EncoderSpec]:
        names = [e.name for e in encoders]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise ValueError(f"encoder name {duplicate!r} is used twice")
        return encoders


SPEC = PrecomputeSpec  # the spec class `lidit submit` validates against


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object (last line)")


def precompute(spec: PrecomputeSpec):
    """Run the pipeline for a validated spec (Ray is started or attached here)."""
    from lidit.pipelines.webdataset_io import list_shards
    from lidit.platform import storage as st

    # fail fast, before torch, Ray or a model loads: a missing input or an unreachable endpoint is one line
    if not list_shards(spec.input, spec.storage):
        raise LiditError(f"{spec.input}: no input shards found")
    st.exists(spec.output, spec.storage)

    from lidit.pipelines.precompute import StageResources, run_precompute
    from lidit.platform.cluster import init_ray

    init_ray(spec.ray.address, spec.ray.num_cpus)
    codec = spec.codec
    return run_precompute(
        spec.input, spec.output, spec.encoders, codec.config(), image_size=spec.image_size,
        store_dtype=spec.store_dtype, window=spec.window,
        codec_resources=StageResources(codec.actors, codec.num_cpus, codec.num_gpus, codec.batch_size),
        read_num_cpus=spec.read_num_cpus, write_num_cpus=spec.write_num_cpus, storage=spec.storage,
        commit_interval_s=spec.commit_interval_s)


def format_summary(result) -> str:
    lines = [f"dataset   {result.dataset_uri}",
             f"inputs    {result.inputs} shards ({result.already_committed} already committed, skipped)",
             f"rows      {result.rows} written, {result.bytes / 1e6:.2f} MB in {result.wall_s:.1f} s"
             + (f" (encoders ready after {result.startup_s:.1f} s)" if result.startup_s is not None else ""),
             "skipped   " + (", ".join(f"{k}={v}" for k, v in result.skipped.items()) or "none")]
    for name, stats in result.encoders.items():
        lines.append(f"encoder   {name}: {stats['tokens']} tokens, {stats['tokens_per_s']} tokens/s, "
                     f"padding waste {stats['padding_waste']}")
    total = result.manifest_totals
    lines.append(f"manifest  {total['shards']} shards, {total['rows']} rows, {total['bytes'] / 1e6:.2f} MB")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    spec = load_spec(PrecomputeSpec, args.spec, args.overrides)
    result = precompute(spec)
    print(format_summary(result))
    if args.json:
        print(json.dumps(result.to_dict()))
    return 0
