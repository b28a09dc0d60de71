"""Typed job specs: pydantic models loaded from YAML with `--set key.sub=value` overrides.

Every job spec derives from `Spec` (extra fields forbidden) and is composed from the shared pieces
below. A bad spec raises `SpecError` with a one-line message naming the field; the CLI turns it into
exit code 2 before any work starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

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


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _field_path(loc: tuple) -> str:
    """A pydantic error location as a dotted field path; union branches add type tags (`str`,
    `list[...]`, a class name), which are left out (field names here are lower case)."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS or p[:1].isupper()))]
    return ".".join(parts)


def _format_error(err: ValidationError) -> str:
    # the deepest error is the most specific one (a union reports one error per branch)
    first = max(err.errors(), key=lambda e: len(e["loc"]))
    field = _field_path(first["loc"])
    message = first["msg"]
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        message = "unknown field"
    elif first["type"] == "value_error":  # our validators' messages, which may name the field themselves
        message = str(first["ctx"]["error"])
    more = len(err.errors()) - 1
    text = f"{field}: {message}" if field else message
    return text + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def parse_spec(cls: type[S], data: dict[str, Any], source: str = "spec") -> S:
    """Validate a dict into `cls` (a spec, or a pydantic dataclass such as an encoder spec), turning
    pydantic's report into a one-line `SpecError`."""
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as err:
        raise SpecError(f"{source}: {_format_error(err)}") from None


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid on `base`, mapping by mapping (a YAML section that changes a few fields of a larger spec)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def embedded_spec(cls: type[S], section: dict[str, Any], filled: dict[str, Any], where: str) -> S:
    """A job spec embedded as a section of another job's spec (e.g. the demo's `train:` is a TrainSpec): the
    section may set any field of `cls` except those the embedding job fills in itself (`filled`: paths it
    chose, encoders it resolved). Errors name the field as `where.field`."""
    taken = _paths(filled) & _paths(section)
    if taken:
        raise SpecError(f"{where}.{sorted(taken)[0]}: set by the job itself; leave it out")
    try:
        return TypeAdapter(cls).validate_python(merge(section, filled))
    except ValidationError as err:
        raise SpecError(f"{where}.{_format_error(err)}") from None


def _paths(data: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted paths of the leaves of nested mappings."""
    out: set[str] = set()
    for key, value in data.items():
        out |= _paths(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}"}
    return out


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
