"""The HTTP contract of `lidit serve`: request schema, validation against the spec's limits and the served
model's image shape, JSON errors, bearer-token auth. No Ray here, so the rules can be read (and tested)
on their own.

Every bad input is answered with a 4xx and `{"error": {"message", "field", "type"}}` whose message is
one line naming the field; a 500 only ever means a server fault.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from lidit.jobs.serve.spec import LimitsSpec

MAX_SEED = 2**53 - 1  # exact in JavaScript numbers, so the playground can echo any seed back


class ApiError(Exception):
    """An error answered to the client: HTTP status, one-line message, the field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None, kind: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.kind = status, message, field, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "field": self.field, "type": self.kind}}


class ImageRequest(BaseModel):
    """`POST /v1/images` body. Strict types: `"4"` is not a number and `4.0` is not an integer."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    negative_prompt: str | None = None
    n: int = 1
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    response_format: Literal["png", "b64_json"] = "png"


@dataclass(frozen=True)
class ImageShape:
    """What the served model fixes about image sizes: multiples of its patch size x codec stride, and by
    default the size it was trained at."""

    size_multiple: int
    default_height: int
    default_width: int


def describe_limits(limits: LimitsSpec, shape: ImageShape) -> dict[str, Any]:
    """The bounds a request must keep, as /v1/models reports them."""
    return {**limits.model_dump(), **asdict(shape)}


@dataclass(frozen=True)
class Generation:
    """A validated request with every default filled in."""

    prompt: str
    negative_prompt: str | None
    n: int
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    response_format: str

    @property
    def seeds(self) -> list[int]:
        """Image i of the request starts from noise seeded with seed + i."""
        return [self.seed + i for i in range(self.n)]


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes, max_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object (400 if it is not one, 413 if it is too large)."""
    if len(body) > max_bytes:
        raise ApiError(413, f"body: {len(body)} bytes is over the limit of {max_bytes}", "body", "too_large")
    if not body.strip():
        raise ApiError(400, "body: empty; expected a JSON object", "body", "invalid_json")
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"body: not valid JSON ({str(err).splitlines()[0]})", "body", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(data).__name__}", "body", "invalid_json")
    return data


def _first_error(err: ValidationError) -> ApiError:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "body"
    message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
    if first["type"] == "missing":
        message = "required"
    elif "input" in first and first["type"] != "extra_forbidden":
        message += f", got {json.dumps(first['input'])[:60]}"
    return ApiError(422, f"{field}: {message}", field)


def _in_range(field: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ApiError(422, f"{field}: must be between {low} and {high}, got {value}", field)


def validate_request(data: dict[str, Any], limits: LimitsSpec, shape: ImageShape, random_seed: int) -> Generation:
    """Schema, then bounds. `random_seed` is used when the request names no seed."""
    try:
        request = ImageRequest.model_validate(data)
    except ValidationError as err:
        raise _first_error(err) from None
    for field in ("prompt", "negative_prompt"):
        text = getattr(request, field)
        if text is None:
            continue
        if field == "prompt" and not text.strip():
            raise ApiError(422, "prompt: must not be empty", field)
        if len(text) > limits.max_prompt_chars:
            raise ApiError(422, f"{field}: {len(text)} characters is over the limit of {limits.max_prompt_chars}", field)
    _in_range("n", request.n, 1, limits.max_n)
    if request.response_format == "png" and request.n != 1:
        raise ApiError(422, "n: response_format 'png' returns one image; use 'b64_json' for n > 1", "n")
    sizes = {}
    for field in ("width", "height"):
        value = getattr(request, field)
        value = getattr(shape, f"default_{field}") if value is None else value
        _in_range(field, value, limits.min_size, limits.max_size)
        if value % shape.size_multiple:
            raise ApiError(422, f"{field}: must be a multiple of {shape.size_multiple} (patch size x codec "
                                f"stride), got {value}", field)
        sizes[field] = value
    steps = limits.default_steps if request.steps is None else request.steps
    _in_range("steps", steps, 1, limits.max_steps)
    guidance = limits.default_guidance if request.guidance is None else float(request.guidance)
    if not math.isfinite(guidance):
        raise ApiError(422, f"guidance: must be a finite number, got {guidance}", "guidance")
    _in_range("guidance", guidance, 0.0, limits.max_guidance)
    seed = random_seed if request.seed is None else request.seed
    _in_range("seed", seed, 0, MAX_SEED - request.n)
    negative = request.negative_prompt if request.negative_prompt and request.negative_prompt.strip() else None
    return Generation(request.prompt.strip(), negative and negative.strip(), request.n, sizes["width"],
                      sizes["height"], steps, guidance, seed, request.response_format)


def token_digest(token: str) -> str:
    """What the server keeps of a bearer token: its SHA-256 (the token itself never leaves the driver)."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_bearer(authorization: str | None, digest: str | None) -> None:
    """401 unless auth is off (`digest` None) or the `Authorization: Bearer <token>` header matches."""
    if digest is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "authorization: missing bearer token", "authorization", "unauthorized")
    if not hmac.compare_digest(token_digest(token.strip()), digest):
        raise ApiError(401, "authorization: invalid bearer token", "authorization", "unauthorized")
