"""The `lidit serve` spec (jobs/configs/serve.yaml): what is served, where, with which limits and resources."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from lidit.platform.config import LiditError, RaySpec, Spec, StorageSpec, TrackingSpec
from lidit.platform.registry import parse_model_uri

Device = Literal["auto", "cpu", "cuda"]  # auto: cuda when there is one


class AutoscalingSpec(Spec):
    """Ray Serve autoscaling: replicas follow the number of requests in flight per replica."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, gt=0)
    target_ongoing_requests: float = Field(8.0, gt=0)


class DeploymentSpec(Spec):
    """Resources and batching of one deployment. `max_batch_size` counts prompts for an encoder,
    images for the denoiser and requests for the ingress (it sends a batch's calls downstream together);
    `max_ongoing_requests` must be at least the batch size (it caps it)."""

    num_replicas: int = Field(1, gt=0)
    autoscaling: AutoscalingSpec | None = None
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_batch_size: int = Field(16, gt=0)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_ongoing_requests: int = Field(32, gt=0)
    max_queued_requests: int = Field(-1, ge=-1, description="-1: unbounded; above it Serve answers 503")

    @model_validator(mode="after")
    def _ongoing_covers_batch(self) -> "DeploymentSpec":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}): Serve never lets more requests into a replica")
        return self

    def options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options`."""
        out: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.autoscaling is not None:
            out["autoscaling_config"] = self.autoscaling.model_dump()
            out["num_replicas"] = "auto"
        else:
            out["num_replicas"] = self.num_replicas
        return out


class LimitsSpec(Spec):
    """What a request may ask for; sizes must also be multiples of the model's patch size x codec stride."""

    max_n: int = Field(4, gt=0)
    min_size: int = Field(16, gt=0)
    max_size: int = Field(512, gt=0)
    max_steps: int = Field(50, gt=0)
    default_steps: int = Field(20, gt=0)
    max_guidance: float = Field(20.0, ge=0)
    default_guidance: float = Field(4.0, ge=0)
    max_prompt_chars: int = Field(2000, gt=0)
    max_body_bytes: int = Field(65536, gt=0)
    long_prompt: Literal["reject", "truncate"] = Field(
        "reject", description="over an encoder's max_tokens: 422, or truncate and say so in X-Lidit-Truncated-Tokens")


class ServeSpec(Spec):
    """`lidit serve` spec (jobs/configs/serve.yaml)."""

    model: str = Field("models:/lidit@champion",
                       description="registry alias or version (models:/NAME@ALIAS, models:/NAME/VERSION), or a "
                                   "local folder holding checkpoints up to three levels down (newest wins)")
    tracking: TrackingSpec = TrackingSpec()
    workdir: str = Field(".lidit", description="local folder of the default sqlite MLflow store")
    storage: StorageSpec = StorageSpec()
    ray: RaySpec = RaySpec()
    app_name: str = Field("lidit", pattern=r"^[A-Za-z0-9_-]+$")
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, le=65535)
    route_prefix: str = Field("/", pattern=r"^/")
    auth_token_env: str | None = Field("LIDIT_SERVE_TOKEN", description="bearer auth on /v1/* when this "
                                                                        "environment variable is set")
    poll_interval_s: float = Field(10.0, ge=0, description="how often to look where the alias points; 0: never")
    ready_timeout_s: float = Field(600.0, gt=0, description="how long `serve` waits for the first version to load")
    device: Device = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    limits: LimitsSpec = LimitsSpec()
    encoder: DeploymentSpec = DeploymentSpec(num_cpus=0.25, max_batch_size=16, max_ongoing_requests=32)
    denoiser: DeploymentSpec = DeploymentSpec(num_cpus=1.0, max_batch_size=16, max_ongoing_requests=32)
    ingress: DeploymentSpec = DeploymentSpec(num_cpus=0.1, max_batch_size=16, max_ongoing_requests=64)

    @model_validator(mode="after")
    def _batch_holds_a_request(self) -> "ServeSpec":
        if self.limits.max_n > self.denoiser.max_batch_size:
            raise ValueError(f"limits.max_n ({self.limits.max_n}) must be <= denoiser.max_batch_size "
                             f"({self.denoiser.max_batch_size}): one request's images go in one batch")
        if self.model.startswith("models:"):
            try:
                parse_model_uri(self.model)
            except LiditError as err:
                raise ValueError(f"model: {err}") from None
        return self
