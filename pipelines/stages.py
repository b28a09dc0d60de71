"""What the precompute stages run, and with which Ray resources: the encoder and codec specs.

An `EncoderSpec` is a `lidit.models.EncoderConfig` (the fields that fix an LLM's features, declared
once there) plus a column-safe name and execution settings that never change the features, so they are
left out of the fingerprint. Specs are pydantic dataclasses: a bad field fails validation naming it.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from lidit.models.codecs import CodecKind
from lidit.models.encoders import DtypeName, EncoderConfig

STRICT = ConfigDict(extra="forbid")


@dataclass(frozen=True, kw_only=True, config=STRICT)
class StageResources:
    """Ray resources of one actor stage: pool size and what each actor reserves."""

    actors: int = Field(1, gt=0)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)


@dataclass(frozen=True, kw_only=True, config=STRICT)
class EncoderSpec(EncoderConfig, StageResources):
    """One frozen LLM prompt encoder (paper Sec. 3): which model, which layer, which instruction, and
    its stage's resources. `batch_size` is the micro-batch inside a length-sorted window."""

    name: str = Field(pattern=r"^[A-Za-z0-9_]+$", description="short column-safe name, e.g. 'llama'")
    batch_size: int = Field(32, gt=0)


@dataclass(frozen=True, kw_only=True, config=STRICT)
class CodecSpec(StageResources):
    """The image codec (`lidit.models.codecs`): identity pixels, or a diffusers AutoencoderKL folder."""

    kind: CodecKind = "identity"
    path: str | None = Field(None, description="diffusers AutoencoderKL folder (kind: vae)")
    dtype: DtypeName = "float32"
    batch_size: int = Field(64, gt=0)

    def __post_init__(self) -> None:
        if self.kind == "vae" and not self.path:
            raise ValueError("codec.path: required for kind 'vae'")

    def config(self) -> dict:
        """What `lidit.models.codec_from_config` takes (and a checkpoint records)."""
        if self.kind == "identity":
            return {"kind": "identity"}
        return {"kind": "vae", "path": self.path, "dtype": self.dtype}
