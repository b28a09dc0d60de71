"""`lidit precompute`: WebDataset shards -> frozen-LLM hidden states + image latents (Parquet).

Runs `lidit.pipelines.precompute.run_precompute` on Ray (a private local Ray unless `ray.address` says
otherwise) and summarises it (rows, skipped by reason, tokens/s and padding waste per encoder, bytes).
Rerunning the same spec resumes: committed input shards are skipped.
"""

from __future__ import annotations

from lidit.jobs.precompute.spec import PrecomputeSpec
from lidit.platform.config import LiditError


def precompute(spec: PrecomputeSpec):
    """Run the pipeline for a validated spec (Ray is started or attached here)."""
    from lidit.pipelines.webdataset_io import list_shards
    from lidit.platform import storage as st

    # fail fast, before torch, Ray or a model loads: a missing input or an unreachable endpoint is one line
    if not list_shards(spec.input, spec.storage):
        raise LiditError(f"{spec.input}: no input shards found")
    st.exists(spec.output, spec.storage)

    from lidit.pipelines.precompute import run_precompute
    from lidit.platform.cluster import init_ray

    init_ray(spec.ray.address, spec.ray.num_cpus)
    return run_precompute(
        spec.input, spec.output, spec.encoders, spec.codec, image_size=spec.image_size,
        store_dtype=spec.store_dtype, window=spec.window, read_num_cpus=spec.read_num_cpus,
        write_num_cpus=spec.write_num_cpus, storage=spec.storage, commit_interval_s=spec.commit_interval_s)


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
