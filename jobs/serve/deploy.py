"""`lidit serve`: the registered model behind an alias as a Ray Serve text-to-image application.

`serve(spec)` deploys it and returns a `Served` (URL + handle); the CLI blocks until Ctrl-C and then
deletes the application. `--local` serves the newest checkpoint under a folder, no registry needed.
The deployments are in `serve_app`, the HTTP contract in `serve_api`, the design in docs/serving.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, model_validator

from lidit.platform import registry, tracking
from lidit.platform.config import LiditError, RaySpec, Spec, StorageSpec, TrackingSpec
from lidit.platform.registry import parse_model_uri

if TYPE_CHECKING:
    from lidit.models.encoders import EncoderConfig

log = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "serve.yaml"


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

    model_uri: str = Field("models:/lidit@champion", description="registry alias or version, models:/NAME@ALIAS")
    local: str | None = Field(None, description="checkpoint folder, or a folder with checkpoints up to three "
                                                "levels down (newest wins); no registry")
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
    device: Literal["auto", "cpu", "cuda"] = "auto"
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
        if not self.model_uri.startswith("models:/"):
            raise ValueError(f"model_uri: expected models:/NAME@ALIAS or models:/NAME/VERSION, got {self.model_uri!r}")
        return self


# ---- where model versions come from: the MLflow registry or a local folder -----------------------------

@dataclass(frozen=True)
class ModelSource:
    """What to serve: a registry URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`) or a local folder."""

    uri: str
    tracking_uri: str | None = None
    local: bool = False

    @property
    def alias(self) -> str | None:
        return None if self.local else parse_model_uri(self.uri)[1]


@dataclass(frozen=True)
class ModelRef:
    """One servable version: what requests are pinned to and what /v1/models reports."""

    name: str
    version: str
    alias: str | None
    uri: str  # models:/NAME/VERSION, or the checkpoint folder
    config: dict  # the checkpoint's config.yaml (model, encoders, codec, ...)

    @property
    def local(self) -> bool:
        return not self.uri.startswith("models:/")

    def encoders(self) -> list[tuple[str, EncoderConfig, str | None]]:
        """(name, encoder config, stored feature dtype) per LLM, in the model's order."""
        from lidit.models.generate import encoder_entries

        try:
            return encoder_entries(self.config)
        except ValueError as err:
            raise LiditError(f"{self.uri}: {err}") from None


def local_checkpoints(root: str) -> dict[str, Path]:
    """Checkpoint folders (config.yaml + model.safetensors) at `root` or up to three levels below it,
    e.g. a train `output` (<output>/<name>/checkpoint_<step>/), keyed by their path under `root`."""
    base = Path(root)
    found = {}
    for depth in range(4):
        for config in base.glob("/".join(["*"] * depth + ["config.yaml"])):
            folder = config.parent
            parts = folder.relative_to(base).parts
            if (folder / "model.safetensors").is_file() and not any(p.startswith(".") or p == "mlartifacts"
                                                                    for p in parts):
                found["/".join(parts) or base.name] = folder
    return found


def _newest(root: str) -> tuple[str, Path]:
    found = local_checkpoints(root)
    if not found:
        raise LiditError(f"--local {root}: no checkpoint (config.yaml + model.safetensors) there or below")
    return max(found.items(), key=lambda item: ((item[1] / "config.yaml").stat().st_mtime_ns, item[0]))


def current_version(source: ModelSource) -> str:
    """The version the source points at now (cheap: one registry call, or a folder listing)."""
    if source.local:
        return _newest(source.uri)[0]
    name, alias, version = parse_model_uri(source.uri)
    info = registry.alias_version(source.tracking_uri, name, alias) if alias else \
        registry.get_version(source.tracking_uri, name, version)
    if info is None:
        raise LiditError(f"{source.uri}: no such alias")
    return info.version


def describe(source: ModelSource, version: str) -> ModelRef:
    """The `ModelRef` of one version: its config.yaml only, no weights."""
    if source.local:
        folder = local_checkpoints(source.uri).get(version)
        if folder is None:
            raise LiditError(f"--local {source.uri}: checkpoint {version} is gone")
        return ModelRef("local", version, None, str(folder), yaml.safe_load((folder / "config.yaml").read_text()))
    import mlflow

    name = parse_model_uri(source.uri)[0]
    # the version's own source: MLflow would resolve models:/ URIs against the global registry URI
    root = registry.client(source.tracking_uri).get_model_version_download_uri(name, version)
    path = mlflow.artifacts.download_artifacts(f"{root.rstrip('/')}/config.yaml", tracking_uri=source.tracking_uri)
    config = yaml.safe_load(Path(path).read_text())
    return ModelRef(name, version, source.alias, f"models:/{name}/{version}", config)


def checkpoint_folder(ref: ModelRef, tracking_uri: str | None) -> str:
    """A local folder with the version's weights: the folder itself, or a once-per-version download."""
    return ref.uri if ref.local else registry.resolve(ref.uri, tracking_uri).folder


def model_source(spec: ServeSpec) -> ModelSource:
    if spec.local is not None:
        return ModelSource(str(Path(spec.local).resolve()), local=True)
    registry.parse_model_uri(spec.model_uri)
    return ModelSource(spec.model_uri, tracking.tracking_uri(spec.tracking, spec.workdir))


# ---- deploy --------------------------------------------------------------------------------------------

@dataclass
class Served:
    """A running application: where to send requests and how to stop it."""

    url: str
    app_name: str
    handle: Any  # ray.serve DeploymentHandle of the ingress
    ref: ModelRef

    def stop(self) -> None:
        from ray import serve

        serve.delete(self.app_name)


def serve(spec: ServeSpec) -> Served:
    """Deploy the application and wait until it answers; returns its URL and ingress handle."""
    return serve_many([spec])[0]


def serve_many(specs: list[ServeSpec]) -> list[Served]:
    """Deploy several applications at once behind the same HTTP proxy (same host and port, distinct
    `app_name` and `route_prefix`), so their replicas start together; wait until each answers."""
    from ray import serve as ray_serve

    from lidit.jobs.serve_app import build_app
    from lidit.jobs.serve_api import token_digest
    from lidit.platform.cluster import init_ray

    head = specs[0]
    for spec in specs[1:]:
        if (spec.host, spec.port) != (head.host, head.port):
            raise LiditError(f"{spec.app_name}: every application shares one proxy; host/port differ from {head.app_name}")
    targets, served = [], []
    for spec in specs:
        source = model_source(spec)
        ref = describe(source, current_version(source))
        token = os.environ.get(spec.auth_token_env) if spec.auth_token_env else None
        digest = token_digest(token) if token else None
        host = "127.0.0.1" if spec.host in ("0.0.0.0", "::") else spec.host
        served.append(Served(f"http://{host}:{spec.port}{spec.route_prefix.rstrip('/')}", spec.app_name, None, ref))
        targets.append(ray_serve.RunTarget(build_app(spec, source, ref, digest), name=spec.app_name,
                                           route_prefix=spec.route_prefix))
        log.info("%s: %s version %s, auth %s", spec.app_name, ref.name, ref.version, "on" if digest else "off")
    init_ray(head.ray.address, head.ray.num_cpus)
    ray_serve.start(http_options={"host": head.host, "port": head.port})
    start = time.monotonic()
    handles = ray_serve.run_many(targets)
    for spec, app, handle in zip(specs, served, handles):
        app.handle = handle
        _wait_ready(app.url, spec.ready_timeout_s)
        log.info("serving %s at %s (up in %.1fs)", app.app_name, app.url, time.monotonic() - start)
    return served


def _wait_ready(url: str, timeout_s: float) -> None:
    """Until /healthz says ok: the first version loads in the background after the replicas start."""
    import json
    import urllib.error
    import urllib.request

    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=10):
                return
        except urllib.error.HTTPError as err:
            last = json.loads(err.read() or b"{}").get("error") or f"HTTP {err.code}"
        except OSError as err:
            last = str(err)
        time.sleep(0.5)
    raise LiditError(f"{url}: not ready after {timeout_s:.0f}s ({last})")


def app_builder(args: dict[str, Any]):
    """Ray Serve application builder for `serve run` / `serve deploy` / KubeRay RayService
    (`import_path: lidit.jobs.serve:app_builder`): `args` are ServeSpec fields. Ray is already up there,
    so unlike `serve()` this neither starts Ray nor Serve's HTTP proxy."""
    from lidit.jobs.serve_api import token_digest
    from lidit.jobs.serve_app import build_app
    from lidit.platform.config import parse_spec

    spec = parse_spec(ServeSpec, dict(args or {}), "serve application args")
    source = model_source(spec)
    ref = describe(source, current_version(source))
    token = os.environ.get(spec.auth_token_env) if spec.auth_token_env else None
    return build_app(spec, source, ref, token_digest(token) if token else None)


# ---- CLI -----------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default=str(DEFAULT_CONFIG), help="YAML spec (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. --set port=8080 (repeatable)")
    parser.add_argument("--local", nargs="?", const=".lidit", default=None, metavar="FOLDER",
                        help="serve the newest checkpoint under FOLDER (default %(const)s) without a registry")
    parser.add_argument("--model", default=None, help="registry URI, e.g. models:/lidit@candidate")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None)


def load(args: argparse.Namespace) -> ServeSpec:
    from lidit.platform.config import load_spec

    overrides = list(args.overrides)
    for key in ("local", "model", "host", "port"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"{'model_uri' if key == 'model' else key}={value}")
    return load_spec(ServeSpec, args.spec, overrides)


def run(args: argparse.Namespace) -> int:
    spec = load(args)
    served = serve(spec)
    print(f"lidit serve: {served.ref.name} version {served.ref.version} at {served.url}/  "
          f"(playground at {served.url}/, API at {served.url}/v1/images; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("lidit serve: stopping", flush=True)
    finally:
        served.stop()
    return 0

