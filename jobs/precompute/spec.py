"""The `lidit precompute` spec (jobs/configs/precompute.yaml)."""

from __future__ import annotations

from pydantic import Field, field_validator

from lidit.pipelines.shards import StoredDtype
from lidit.pipelines.stages import CodecSpec, EncoderSpec
from lidit.platform.config import RaySpec, Spec, StorageSpec


def unique_names(encoders: list[EncoderSpec]) -> list[EncoderSpec]:
    """Encoder names are column names and keys: each once."""
    names = [e.name for e in encoders]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ValueError(f"encoder name {duplicate!r} is used twice")
    return encoders


class PrecomputeSpec(Spec):
    """What `lidit precompute` reads, runs and writes."""

    input: str = Field(..., description="WebDataset tar shards: local or s3:// path, brace pattern or glob")
    output: str = Field(..., description="root folder or s3:// prefix; data lands in <output>/<fingerprint>/")
    image_size: int = Field(32, ge=8, description="images are centre-cropped and resized to this square side")
    encoders: list[EncoderSpec] = Field(..., min_length=1)
    codec: CodecSpec = CodecSpec()
    store_dtype: StoredDtype = Field(
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
        return unique_names(encoders)
