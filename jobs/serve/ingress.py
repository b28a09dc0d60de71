"""The HTTP ingress of `lidit serve` (runs inside a Ray Serve replica): validation, auth, batching of
requests, and the choice of the model version new requests are pinned to (docs/serving.md).

Promotion without downtime: the ingress looks where the alias points every `poll_interval_s`; on a new
version it has the downstream deployments (`lidit.jobs.serve.deployments`) load it, then swaps its current
`ModelRef` atomically. Every request is pinned to the ref current when it arrived.
"""

import asyncio
import base64
import io
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException

from lidit.jobs.serve.api import (
    MAX_SEED,
    ApiError,
    Generation,
    ImageShape,
    check_bearer,
    describe_limits,
    parse_json,
    validate_request,
)
from lidit.jobs.serve.deployments import DenoiseJob, DenoiseResult, Denoiser, EncodedText, PromptEncoder
from lidit.jobs.serve.source import ModelRef, ModelSource, current_version, describe
from lidit.jobs.serve.spec import LimitsSpec, ServeSpec

log = logging.getLogger("lidit.serve")
PLAYGROUND = Path(__file__).parent / "static" / "playground.html"
# batches past the ingress at once: while one is denoised, the next ones encode and queue at the denoiser,
# where they merge (docs/serving.md, "Ingress batches in flight")
INGRESS_CONCURRENT_BATCHES = 4

api = FastAPI(title="lidit", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    """404/405 from routing in the same JSON shape as every other error."""
    error = ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", None, "not_found"
                     if err.status_code == 404 else "invalid_request")
    return JSONResponse(error.body(), status_code=err.status_code, headers=getattr(err, "headers", None))


@dataclass(frozen=True)
class _Serving:
    ref: ModelRef
    shape: ImageShape
    encoders: list[dict]
    facts: dict
    since: float


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP API + playground; owns the choice of the version that new requests use."""

    def __init__(self, encoders: dict, denoiser: Any, source: ModelSource, ref: ModelRef, settings: dict) -> None:
        self.encoders, self.denoiser, self.source = encoders, denoiser, source
        self.settings = settings
        self.limits: LimitsSpec = settings["limits"]
        self.auth_digest: str | None = settings["auth_digest"]
        self.current: _Serving | None = None
        self.error: str | None = None
        self.ready = asyncio.Event()
        self.page = PLAYGROUND.read_text()
        self._generate_batch.set_max_batch_size(settings["max_batch_size"])
        self._generate_batch.set_batch_wait_timeout_s(settings["batch_wait_timeout_s"])
        self.poller = asyncio.get_running_loop().create_task(self._poll(ref))

    async def _activate(self, ref: ModelRef) -> None:
        """Load `ref` in every downstream deployment, then make it the version new requests get."""
        names = [e.name for e in ref.info.encoders]
        if sorted(names) != sorted(self.encoders):
            raise RuntimeError(f"version {ref.version} needs encoders {names}, this application serves "
                               f"{sorted(self.encoders)}: deploy it anew")
        facts, *encoders = await asyncio.gather(
            self.denoiser.prepare.remote(ref), *(self.encoders[e.name].prepare.remote(e.config) for e in ref.info.encoders))
        shape = ImageShape(facts["patch_size"] * facts["downsample"], facts["height"], facts["width"])
        previous = self.current.ref.version if self.current else None
        self.current = _Serving(ref, shape, encoders, facts, time.time())
        self.ready.set()
        log.info("serving %s version %s (was %s)", ref.name, ref.version, previous)

    async def _poll(self, ref: ModelRef) -> None:
        interval = self.settings["poll_interval_s"]
        while True:
            try:
                if self.current is None:
                    await self._activate(ref)
                elif interval > 0:
                    version = await asyncio.to_thread(current_version, self.source)
                    if version != self.current.ref.version:
                        await self._activate(await asyncio.to_thread(describe, self.source, version))
                self.error = None
            except Exception as err:  # keep serving the current version; /v1/models shows the error
                self.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                log.warning("model refresh failed: %s", self.error)
            if self.current is not None and interval <= 0:
                return
            await asyncio.sleep(interval if self.current is not None and interval > 0 else 1.0)

    async def _serving(self) -> _Serving:
        if self.current is None:
            try:
                await asyncio.wait_for(self.ready.wait(), timeout=self.settings["ready_timeout_s"])
            except asyncio.TimeoutError:
                raise ApiError(503, f"model: not loaded yet ({self.error or 'loading'})", None, "unavailable") from None
        return self.current  # type: ignore[return-value]

    def _error(self, err: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @api.get("/")
    async def playground(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        if self.current is None:
            return JSONResponse({"status": "loading", "error": self.error}, status_code=503)
        return JSONResponse({"status": "ok", "version": self.current.ref.version})

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            check_bearer(request.headers.get("authorization"), self.auth_digest)
            serving = await self._serving()
        except ApiError as err:
            return self._error(err)
        ref = serving.ref
        model = {"id": f"{ref.name}/{ref.version}", "name": ref.name, "version": ref.version, "alias": ref.alias,
                 "uri": ref.uri, "serving_since": serving.since, "encoders": serving.encoders,
                 "image_size": [serving.facts["height"], serving.facts["width"]],
                 "patch_size": serving.facts["patch_size"], "parameters": serving.facts["parameters"]}
        return JSONResponse({"object": "list", "data": [model], "limits": describe_limits(self.limits, serving.shape),
                             "source": self.source.uri, "refresh_error": self.error, "auth": self.auth_digest is not None})

    @api.post("/v1/images")
    async def images(self, request: Request) -> Response:
        try:
            return await self._images(request)
        except ApiError as err:
            return self._error(err)
        except Exception as err:  # a server fault, never bad input: one line out, traceback in the log
            log.exception("POST /v1/images failed")
            return JSONResponse(ApiError(500, f"internal error: {type(err).__name__}", None, "server_error").body(),
                                status_code=500)

    async def _images(self, request: Request) -> Response:
        check_bearer(request.headers.get("authorization"), self.auth_digest)
        serving = await self._serving()  # this request stays on this version to the end
        limits, ref = self.limits, serving.ref
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limits.max_body_bytes:
            raise ApiError(413, f"body: {length} bytes is over the limit of {limits.max_body_bytes}", "body", "too_large")
        data = parse_json(await request.body(), limits.max_body_bytes)
        gen = validate_request(data, limits, serving.shape, random.randrange(MAX_SEED - limits.max_n))
        outcome = await self._generate_batch((ref, gen))
        if isinstance(outcome, ApiError):
            raise outcome
        result, truncated = outcome
        return await asyncio.to_thread(self._respond, gen, ref, result, truncated)

    @serve.batch(max_concurrent_batches=INGRESS_CONCURRENT_BATCHES)
    async def _generate_batch(self, items: list[tuple[ModelRef, Generation]]) -> list[tuple[DenoiseResult, int] | ApiError]:
        """Validated requests that arrived together: one call per encoder with all their prompts and one
        denoiser call with all their jobs, per model version, instead of three Ray calls per request (the
        handle hops, serialisation and per-call replica work are most of a tiny model's request cost).
        A request whose prompt is over an encoder's limit gets its 422; its batch-mates go on."""
        out: list[tuple[DenoiseResult, int] | ApiError | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, (ref, _) in enumerate(items):
            groups.setdefault(ref.uri, []).append(i)
        await asyncio.gather(*(self._generate_group(items, rows, out) for rows in groups.values()))
        return out  # type: ignore[return-value]

    async def _generate_group(self, items: list[tuple[ModelRef, Generation]], rows: list[int], out: list) -> None:
        ref = items[rows[0]][0]
        encoders = ref.info.encoders
        texts: list[str] = []
        spans: list[tuple[int, bool]] = []  # (index of the prompt in texts, has a negative prompt)
        for i in rows:
            gen = items[i][1]
            spans.append((len(texts), bool(gen.negative_prompt)))
            texts += [gen.prompt] + ([gen.negative_prompt] if gen.negative_prompt else [])
        per_encoder: list[list[EncodedText]] = await asyncio.gather(
            *(self.encoders[e.name].encode_many.remote(e.config, e.stored_dtype, texts) for e in encoders))
        jobs, targets = [], []
        for i, (first, has_negative) in zip(rows, spans):
            gen = items[i][1]
            positive = [encoded[first] for encoded in per_encoder]
            negative = [encoded[first + 1] for encoded in per_encoder] if has_negative else None
            truncated = max(e.truncated for e in positive + (negative or []))
            if truncated and self.limits.long_prompt == "reject":
                field = "prompt" if max(e.truncated for e in positive) else "negative_prompt"
                limit = min(e.config.max_tokens for e in encoders)
                out[i] = ApiError(422, f"{field}: {truncated} token(s) over the encoder limit of {limit} tokens "
                                       f"(template included); shorten it", field)
                continue
            jobs.append(DenoiseJob(positive, negative, gen.seeds, gen.steps, gen.height, gen.width, gen.guidance))
            targets.append((i, truncated))
        if jobs:
            results = await self.denoiser.denoise_many.remote(ref, jobs)
            for (i, truncated), result in zip(targets, results):
                out[i] = (result, truncated)

    def _respond(self, gen: Generation, ref: ModelRef, result: DenoiseResult, truncated: int) -> Response:
        headers = {"X-Lidit-Model": ref.name, "X-Lidit-Model-Version": ref.version, "X-Lidit-Seed": str(gen.seed),
                   "X-Lidit-Batch-Images": str(result.batch_images)}
        if truncated:
            headers["X-Lidit-Truncated-Tokens"] = str(truncated)
        if gen.response_format == "png":
            return Response(_png(result.images[0]), media_type="image/png", headers=headers)
        data = [{"b64_json": base64.b64encode(_png(image)).decode(), "seed": seed}
                for image, seed in zip(result.images, gen.seeds)]
        body = {"created": int(time.time()), "model": ref.name, "version": ref.version, "seed": gen.seed,
                "width": gen.width, "height": gen.height, "steps": gen.steps, "guidance": gen.guidance, "data": data}
        return JSONResponse(body, headers=headers)


def build_app(spec: ServeSpec, source: ModelSource, ref: ModelRef, auth_digest: str | None) -> serve.Application:
    """The deployment graph for `ref`'s encoders; resources and batching from the spec."""
    encoders = {
        name: PromptEncoder.options(name=f"PromptEncoder_{name}", **spec.encoder.options()).bind(
            name, spec.device, spec.encoder.max_batch_size, spec.encoder.batch_wait_timeout_s, spec.encoder.num_cpus)
        for name in (e.name for e in ref.info.encoders)
    }
    denoiser = Denoiser.options(**spec.denoiser.options()).bind(
        source.tracking_uri, spec.device, spec.dtype, spec.denoiser.max_batch_size, spec.denoiser.batch_wait_timeout_s,
        spec.denoiser.num_cpus)
    settings = {"limits": spec.limits, "poll_interval_s": spec.poll_interval_s,
                "auth_digest": auth_digest, "ready_timeout_s": spec.ready_timeout_s,
                "max_batch_size": spec.ingress.max_batch_size, "batch_wait_timeout_s": spec.ingress.batch_wait_timeout_s}
    return Ingress.options(**spec.ingress.options()).bind(encoders, denoiser, source, ref, settings)
