"""Where served model versions come from: the MLflow registry (an alias or a version) or a local folder.

The ingress asks `current_version` where the source points now, and `describe` gives a version's
`ModelRef` (its checkpoint's `CheckpointInfo`, no weights), which requests are pinned to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from lidit.jobs.serve.spec import ServeSpec
from lidit.models.checkpoint import CheckpointInfo
from lidit.platform import registry, tracking
from lidit.platform.config import LiditError
from lidit.platform.registry import parse_model_uri


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
    info: CheckpointInfo  # what its config.yaml says (model, encoders, codec, schedule, image size)

    @property
    def local(self) -> bool:
        return not self.uri.startswith("models:/")


def _info(uri: str, config: dict) -> CheckpointInfo:
    try:
        return CheckpointInfo.from_config(config)
    except ValueError as err:
        raise LiditError(f"{uri}: {err}") from None


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
        raise LiditError(f"model {root}: no checkpoint (config.yaml + model.safetensors) there or below")
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
            raise LiditError(f"model {source.uri}: checkpoint {version} is gone")
        return ModelRef("local", version, None, str(folder),
                        _info(str(folder), yaml.safe_load((folder / "config.yaml").read_text())))
    import mlflow

    name = parse_model_uri(source.uri)[0]
    # the version's own source: MLflow would resolve models:/ URIs against the global registry URI
    root = registry.client(source.tracking_uri).get_model_version_download_uri(name, version)
    path = mlflow.artifacts.download_artifacts(f"{root.rstrip('/')}/config.yaml", tracking_uri=source.tracking_uri)
    uri = f"models:/{name}/{version}"
    return ModelRef(name, version, source.alias, uri, _info(uri, yaml.safe_load(Path(path).read_text())))


def checkpoint_folder(ref: ModelRef, tracking_uri: str | None) -> str:
    """A local folder with the version's weights: the folder itself, or a once-per-version download."""
    return ref.uri if ref.local else registry.resolve(ref.uri, tracking_uri).folder


def model_source(spec: ServeSpec) -> ModelSource:
    """A registry URI (`models:/...`) is followed through the registry; anything else is a local folder."""
    if not spec.model.startswith("models:/"):
        return ModelSource(str(Path(spec.model).resolve()), local=True)
    registry.parse_model_uri(spec.model)
    return ModelSource(spec.model, tracking.tracking_uri(spec.tracking, spec.workdir))
