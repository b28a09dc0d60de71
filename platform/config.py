"""Typed job specs: pydantic models loaded from YAML with `--set key.sub=value` overrides.

Every job spec derives from `Spec` (extra fields forbidden) and is composed from the shared pieces
below. A bad spec raises `SpecError` with a one-line message naming the field; the CLI turns it into
exit code 2 before any work starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PAPER_INSTRUCTION = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "and spatial relationships of the objects:"
)

S = TypeVar("S", bound="Spec")


class LiditError(RuntimeError):
    """A failure the user can fix (missing input, unreachable endpoint...): the CLI prints the one-line
    message and exits 1 instead of showing a stack trace."""


class SpecError(ValueError):
    """A spec that cannot be used; the message is one line and names the offending field (exit code 2)."""


class Spec(BaseModel):
    """Base of every spec: unknown fields are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class StorageSpec(Spec):
    """Where s3:// URIs go. Unset fields fall back to the standard AWS variables."""

    endpoint_url: str | None = Field(None, description="S3 endpoint; default $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL")
    region: str | None = Field(None, description="default $AWS_REGION / $AWS_DEFAULT_REGION")
    key: str | None = Field(None, description="access key id; default $AWS_ACCESS_KEY_ID")
    secret: str | None = Field(None, description="secret key; default $AWS_SECRET_ACCESS_KEY", repr=False)
    anon: bool = False


class EncoderSpec(Spec):
    """One frozen LLM prompt encoder (paper Sec. 3): which model, which layer, which instruction."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_]+$", description="short column-safe name, e.g. 'llama'")
    path: str = Field(..., description="Hugging Face model folder: local path or s3:// prefix")
    revision: str | None = Field(None, description="content hash; computed from the files when unset")
    instruction: str = PAPER_INSTRUCTION
    use_chat_template: bool = True
    system_prompt: str | None = None
    layer: int = -3
    max_tokens: int = Field(128, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    cut_instruction: bool = False
    # execution settings: they do not change the features, so they are not part of the fingerprint
    batch_size: int = Field(32, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    actors: int = Field(1, gt=0)

    def model_fields_for_fingerprint(self) -> dict[str, Any]:
        """The fields that change the features an encoder produces."""
        return self.model_dump(include={"path", "revision", "instruction", "use_chat_template", "system_prompt",
                                        "layer", "max_tokens", "dtype", "cut_instruction"})


class ScalingSpec(Spec):
    """Ray Train / Ray Data resources."""

    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)


class TrackingSpec(Spec):
    """MLflow tracking + registry. `tracking_uri` None means a local sqlite store under the workdir."""

    tracking_uri: str | None = None
    experiment: str = "lidit"
    registered_model: str = "lidit"


class RaySpec(Spec):
    """Which Ray to use: None starts a local one (embedded default), else an address such as 'auto'."""

    address: str | None = None
    num_cpus: int | None = None


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `key.sub=value` overrides; values are parsed as YAML scalars/lists (`3`, `true`, `[a, b]`)."""
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_path(data, key.strip(), value)
    return data


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "<root>"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    more = len(err.errors()) - 1
    return f"{field}: {message}" + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def parse_spec(cls: type[S], data: dict[str, Any], source: str = "spec") -> S:
    """Validate a dict into `cls`, turning pydantic's report into a one-line `SpecError`."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{source}: {_format_error(err)}") from None


def load_spec(cls: type[S], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> S:
    """Load a YAML spec (or start from defaults when `path` is None) and apply `--set` overrides."""
    data: dict[str, Any] = {}
    source = "spec"
    if path is not None:
        source = str(path)
        file = Path(path)
        if not file.is_file():
            raise SpecError(f"{source}: no such spec file")
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise SpecError(f"{source}:{where} not valid YAML") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise SpecError(f"{source}: top level must be a mapping of fields")
        data = loaded or {}
    apply_overrides(data, overrides)
    return parse_spec(cls, data, source)


def dump_spec(spec: Spec) -> str:
    """The resolved spec as YAML, secrets left out (for logs and MLflow params)."""
    return yaml.safe_dump(redact(spec.model_dump(mode="json")), sort_keys=False)


_SECRET_KEYS = {"secret", "key", "token", "password"}


def redact(value: Any) -> Any:
    """Replace credential-like fields with '***' so they never reach logs, params or tags."""
    if isinstance(value, dict):
        return {k: ("***" if k in _SECRET_KEYS and v else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value
