"""The `lidit train` spec (jobs/configs/train.yaml): one section per concern, each declared once.

Code defaults are DiT's where the paper follows DiT (AdamW, constant lr 1e-4, no weight decay, EMA 0.9999);
the shipped YAML files state where they differ and why.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import Field, model_validator

from lidit.jobs.precompute.spec import unique_names
from lidit.models.diffusion import DiffusionSchedule, Objective, SamplerKind, ScheduleKind
from lidit.models.presets import LiDiTConfig, PresetName
from lidit.pipelines.stages import EncoderSpec
from lidit.platform import storage
from lidit.platform.config import RaySpec, ScalingSpec, Spec, StorageSpec, TrackingSpec

Strategy = Literal["auto", "none", "ddp", "fsdp"]  # data parallelism (lidit.jobs.train.parallelize)
Precision = Literal["auto", "fp32", "bf16"]

FROM_SHARDS = ("in_channels", "encoder_dims")  # model fields the shards decide


class ModelSpec(Spec):
    """LI-DiT size preset plus field overrides; input channels and encoder widths come from the shards."""

    preset: PresetName = "tiny"
    overrides: dict[str, Any] = Field(default_factory=dict, description="LiDiTConfig fields, e.g. {depth: 4}")

    @model_validator(mode="after")
    def _known_fields(self) -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(LiDiTConfig)}
        for key in self.overrides:
            if key in FROM_SHARDS:
                raise ValueError(f"overrides.{key} is set by the shards (codec channels, encoder widths)")
            if key not in names:
                raise ValueError(f"overrides.{key} is not a LiDiTConfig field")
        return self


class OptimSpec(Spec):
    """AdamW with linear warmup, then constant or cosine (DiT: constant 1e-4, no weight decay), EMA."""

    lr: float = Field(1e-4, gt=0)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; None = no clipping")
    ema_decay: float = Field(0.9999, ge=0, lt=1)


class DataSpec(Spec):
    """Where the embeddings are and how workers stream them."""

    embeddings: str = Field(..., description="precompute data set folder (or its output root) local or s3://")
    batch_size: int = Field(32, gt=0, description="rows per worker per micro-batch")
    prefetch_batches: int = Field(2, ge=0)
    shuffle_files: bool = True
    local_shuffle_buffer: int = Field(0, ge=0, description="rows in the per-worker shuffle buffer; 0 = off")
    # Ray 2.60's default Parquet reader (datasource V2) lists the files of each read in a task that starts
    # footer-reader actors, each a new Python process, once per epoch in a pass: slow to start on a small
    # machine (docs/train.md, "Parquet reader"). V2 is for many files on a large cluster.
    parquet_reader: Literal["v1", "v2"] = Field("v1", description="Ray Data Parquet datasource version")
    # Ray Data hands out blocks as they finish, so two runs of one spec see the same rows in a different
    # order (and end with different weights). On: blocks in read order, so runs of one seed are comparable
    # (ablations compare variants this way) at the cost of head-of-line waits in the streaming read.
    preserve_order: bool = Field(False, description="deterministic row order across runs (Ray Data preserve_order)")


class DiffusionSpec(Spec):
    """The objective and its sampler (lidit.models.diffusion, docs/models.md "Objectives"); recorded in
    the checkpoint, so evaluation and serving sample the way the model was trained."""

    num_steps: int = Field(1000, ge=2)
    kind: ScheduleKind = "linear"
    objective: Objective = "eps"
    sampler: SamplerKind | None = Field(None, description="default: ddim for eps, euler for flow")
    min_snr_gamma: float | None = Field(None, gt=0, description="eps only: min-SNR-gamma loss weighting (5 in the paper)")

    @model_validator(mode="after")
    def _consistent(self):
        self.schedule()  # a sampler of another objective, or gamma for flow, fails here with its field name
        return self

    def schedule(self) -> DiffusionSchedule:
        return DiffusionSchedule(self.num_steps, self.kind, objective=self.objective, sampler=self.sampler,
                                 min_snr_gamma=self.min_snr_gamma)


class LoopSpec(Spec):
    """The optimisation loop and the parallelisms applied to the model (`lidit.jobs.parallel`)."""

    steps: int = Field(..., gt=0, description="optimizer steps in total (a rerun with more steps continues)")
    grad_accum: int = Field(1, gt=0)
    seed: int = 0
    strategy: Strategy = "auto"
    precision: Precision = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    compile: bool = False
    activation_checkpointing: bool = False
    log_every: int = Field(10, gt=0)
    max_failures: int = Field(3, ge=0, description="worker-group restarts from the last checkpoint")


class CheckpointSpec(Spec):
    every_steps: int = Field(1000, gt=0)
    num_to_keep: int = Field(2, gt=0)
    log_final_to_mlflow: bool = True


class SamplesSpec(Spec):
    """Image grids for fixed eval prompts (the first rows of the shards), logged to MLflow."""

    every_steps: int = Field(0, ge=0, description="0 = only at the end")
    prompts: int = Field(4, ge=0, description="0 = no sample grids")
    sampler_steps: int = Field(20, gt=0)
    guidance: float = Field(4.0, ge=1)
    seed: int = 0


class ChaosSpec(Spec):
    """Fault-tolerance drill: worker `rank` kills itself (SIGKILL) once when it reaches `at_step`, after
    Ray Train has registered the last checkpoint before it (the restart then resumes from that one)."""

    at_step: int = Field(..., gt=0)
    rank: int = Field(0, ge=0)


class TrainSpec(Spec):
    name: str = Field("lidit", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="run name: Ray Train folder under `output` and MLflow run name")
    output: str = Field(..., description="checkpoint storage: local folder or s3:// prefix")
    workdir: str = Field(".lidit", description="local folder for the default sqlite MLflow store")
    encoders: list[EncoderSpec] = Field(..., min_length=1, description="must match the shards' encoders")
    data: DataSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    train: LoopSpec
    diffusion: DiffusionSpec = Field(default_factory=DiffusionSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    samples: SamplesSpec = Field(default_factory=SamplesSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    chaos: ChaosSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSpec":
        unique_names(self.encoders)
        if self.chaos is not None and self.chaos.rank >= self.scaling.num_workers:
            raise ValueError(f"chaos.rank {self.chaos.rank} >= scaling.num_workers {self.scaling.num_workers}")
        return self

    @property
    def run_uri(self) -> str:
        """`<output>/<name>`: Ray Train's run folder, holding `checkpoint_<step>/` folders."""
        return storage.join(self.output, self.name)
