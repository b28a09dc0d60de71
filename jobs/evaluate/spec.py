"""The `lidit evaluate` and `lidit promote` specs: one set of evaluation settings, composed into both."""

from __future__ import annotations

import hashlib
import json
from typing import Literal, get_args

from pydantic import Field

from lidit.platform.config import Spec, StorageSpec, TrackingSpec

Category = Literal["color", "shape", "count", "spatial"]  # the checker's categories (lidit.jobs.evaluate.checker)
Metric = Literal["color", "shape", "count", "spatial", "overall", "all_correct", "likelihood.color",
                 "likelihood.shape", "likelihood.count", "likelihood.spatial", "likelihood.overall"]
CATEGORIES: tuple[str, ...] = get_args(Category)
METRICS: tuple[str, ...] = get_args(Metric)  # overall: mean of the categories; all_correct: every check passed


class LikelihoodSpec(Spec):
    """The sampling-free prompt-following score (lidit.jobs.evaluate.likelihood): held-out images scored
    by denoising error under their caption against one-attribute negatives."""

    enabled: bool = True
    images: int = Field(96, gt=0, description="held-out images (of the benchmark's data seed and split)")
    pairs: int = Field(8, gt=0, description="(t, noise) pairs shared by every candidate caption")
    seed: int = Field(0, description="seed of the negatives and the noise")
    batch_size: int = Field(64, gt=0, description="forward rows per batch (captions x pairs)")


class BenchmarkSpec(Spec):
    """The shapes prompt-following benchmark; everything but `batch_size` defines its identity (`key`)."""

    prompts: int = Field(200, gt=0, description="held-out prompts for the sampled checker")
    data_seed: int = Field(0, description="seed of the shapes data whose held-out split is used")
    heldout_percent: int = Field(10, gt=0, lt=100)
    samples_per_prompt: int = Field(1, gt=0, description="images per prompt (seeds seed, seed+1, ...)")
    seed: int = 0
    steps: int = Field(20, gt=0)
    guidance: float = Field(4.0, ge=1.0)
    image_size: int | None = Field(None, gt=0, description="None: the checkpoint's")
    batch_size: int = Field(16, gt=0)
    likelihood: LikelihoodSpec = Field(default_factory=LikelihoodSpec)

    def key(self) -> str:
        fields = self.model_dump(exclude={"batch_size": True, "likelihood": {"batch_size"}})
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


class EvaluationSettings(Spec):
    """How a model is evaluated: shared by `lidit evaluate` and `lidit promote` (which evaluates what it gates)."""

    output: str = Field(".lidit/evaluate", description="where image grids and tables go (local or s3://)")
    workdir: str = Field(".lidit", description="local folder for the default sqlite MLflow store")
    device: str = "cpu"
    encoder_paths: dict[str, str] = Field(default_factory=dict, description="encoder name -> local model folder")
    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec)
    probe: ProbeSpec = Field(default_factory=ProbeSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)


class EvaluateSpec(EvaluationSettings):
    """`lidit evaluate` (jobs/configs/evaluate.yaml)."""

    model: str = Field(..., description="checkpoint folder (local or s3://) or models:/NAME@ALIAS|/VERSION")
    public: list[PublicPromptsSpec] = Field(default_factory=list)
    log_to_mlflow: bool = True


class PromoteSpec(EvaluationSettings):
    """`lidit promote` (jobs/configs/promote.yaml): register (optional), evaluate, gate."""

    checkpoint: str | None = Field(None, description="register this checkpoint folder first (local or s3://)")
    version: int | None = Field(None, gt=0, description="the version to gate; default: the new one, else @candidate")
    margin: float = Field(0.0, ge=0, description="promote when candidate > champion + margin")
    metric: Metric = "overall"
    force: bool = False
    training_run: str | None = None
    dataset: str | None = None
    rollback: bool = Field(False, description="move champion back to the version it replaced (or to `version`)")
    probe: ProbeSpec = Field(default_factory=lambda: ProbeSpec(enabled=False),
                             description="off by default: the gate reads the benchmark only")

    def settings(self) -> EvaluationSettings:
        return EvaluationSettings.model_validate(self.model_dump(include=set(EvaluationSettings.model_fields)))
