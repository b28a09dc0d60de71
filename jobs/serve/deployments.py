"""Ray Serve deployments of `lidit serve`, composed the way LI-DiT is (paper Sec. 3, Fig. 3):

    Ingress (HTTP, validation, auth, version pinning)
      -> PromptEncoder, one deployment per frozen LLM (@serve.batch over prompts)
      -> Denoiser: token refiners + collaborative refiner + LI-DiT + DDIM sampler + codec
         (@serve.batch over images; one forward per group with the same version, steps, size, guidance)

Promotion without downtime: the ingress looks where the alias points every `poll_interval_s`; on a new
version it has the downstream deployments load it, then swaps its current `ModelRef` atomically. Every
request is pinned to the ref current when it arrived and carries it downstream, where models are kept
per version (the previous one stays loaded), so requests in flight finish on the old weights.
"""

import asyncio
import base64
import dataclasses
import io
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException

from lidit.jobs.serve import ModelRef, ModelSource, ServeSpec, checkpoint_folder, current_version, describe
from lidit.jobs.serve_api import MAX_SEED, ApiError, Generation, Limits, check_bearer, parse_json, validate_request
from lidit.models import DiffusionSchedule, EncoderConfig, LLMPromptEncoder, PromptFeatures, codec_from_config, sample
from lidit.models.checkpoint import load_checkpoint
from lidit.models.codecs import IdentityCodec
from lidit.models.encoders import DTYPES, folder_revision
from lidit.platform import config as platform_config
from lidit.platform.storage import local_copy

log = logging.getLogger("lidit.serve")
PLAYGROUND = Path(platform_config.__file__).parent / "static" / "playground.html"  # package data of lidit.platform
KEEP_VERSIONS = 2  # the serving version and the one before it (requests in flight)
INGRESS_CONCURRENT_BATCHES = 4  # batches past the ingress at once: while one is denoised, the next ones encode and
# queue at the denoiser, where they merge (2: 17.3 vs 21.4 req/s at 16 clients, means of each run, docs/serving.md)


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _use_cpus(num_cpus: float) -> None:
    """Torch intra-op threads = the CPUs the replica reserved (at least one). Torch's default, every core
    of the machine in every replica, oversubscribes the CPU: replicas and the proxy then wait on each
    other's spinning OpenMP threads (a tiny forward does not split usefully over threads anyway)."""
    torch.set_num_threads(max(1, int(num_cpus)))


class _Versions:
    """Loaded models by key (version or encoder fingerprint), `KEEP_VERSIONS` at most. Each is loaded once,
    in a thread; a load never blocks requests for models already loaded (the old version keeps serving)."""

    def __init__(self, load: Callable[..., Any]) -> None:
        self.load = load
        self.models: OrderedDict[str, Any] = OrderedDict()
        self.loading: dict[str, asyncio.Task] = {}

    async def get(self, key: str, *args: Any) -> Any:
        if key not in self.models:
            task = self.loading.get(key)
            if task is None:
                task = self.loading[key] = asyncio.create_task(asyncio.to_thread(self.load, *args))
                task.add_done_callback(lambda _: self.loading.pop(key, None))
            value = await asyncio.shield(task)
            if key not in self.models:
                self.models[key] = value
                while len(self.models) > KEEP_VERSIONS:  # requests still using an evicted one hold a reference
                    self.models.popitem(last=False)
        self.models.move_to_end(key)
        return self.models[key]


class EncodedText(NamedTuple):
    """One prompt through one LLM: instruction prefix + caption states, unpadded."""

    states: torch.Tensor  # [P + L, D]
    caption_start: int
    truncated: int  # caption tokens cut to fit max_tokens


@serve.deployment
class PromptEncoder:
    """A frozen LLM prompt encoder (Sec. 3.2), batched over prompts of concurrent requests."""

    def __init__(self, name: str, device: str, max_batch_size: int, batch_wait_timeout_s: float,
                 num_cpus: float = 1.0) -> None:
        self.name, self.device = name, _device(device)
        _use_cpus(num_cpus)
        self.encoders = _Versions(self._load)  # fingerprint -> LLMPromptEncoder
        self.encode_batch.set_max_batch_size(max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def _encoder(self, config: EncoderConfig) -> LLMPromptEncoder:
        return await self.encoders.get(config.fingerprint(), config)

    def _load(self, config: EncoderConfig) -> LLMPromptEncoder:
        """The LLM from the path the checkpoint recorded (s3:// copied once), checked to be the same files."""
        path = local_copy(config.path)
        if config.revision is not None and folder_revision(path) != config.revision:
            raise RuntimeError(f"encoder {self.name}: {config.path} does not hold the LLM the model was trained "
                               f"with (revision {config.revision})")
        log.info("encoder %s: loading %s (fingerprint %s)", self.name, config.path, config.fingerprint())
        return LLMPromptEncoder(dataclasses.replace(config, path=path), device=self.device)

    async def prepare(self, config: EncoderConfig) -> dict:
        """Load the encoder a model version needs (before that version takes traffic)."""
        encoder = await self._encoder(config)
        return {"name": self.name, "fingerprint": encoder.fingerprint, "max_tokens": config.max_tokens}

    async def __call__(self, config: EncoderConfig, stored_dtype: str | None, text: str) -> EncodedText:
        return await self.encode_batch((config, stored_dtype, text))

    async def encode_many(self, config: EncoderConfig, stored_dtype: str | None, texts: list[str]) -> list[EncodedText]:
        """The prompts of a batch of requests (the ingress batches them): one call, one Ray hop; they join
        this replica's batch queue together, so they share LLM forwards with each other and with other callers."""
        return list(await asyncio.gather(*(self.encode_batch((config, stored_dtype, text)) for text in texts)))

    @serve.batch
    async def encode_batch(self, items: list[tuple[EncoderConfig, str | None, str]]) -> list[EncodedText]:
        out: list[EncodedText | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, (config, stored, _) in enumerate(items):
            groups.setdefault((config.fingerprint(), stored), []).append(i)
        for (_, stored), rows in groups.items():
            encoder = await self._encoder(items[rows[0]][0])
            encoded = await asyncio.to_thread(self._encode, encoder, stored, [items[i][2] for i in rows])
            for i, result in zip(rows, encoded):
                out[i] = result
        return out  # type: ignore[return-value]

    @staticmethod
    def _encode(encoder: LLMPromptEncoder, stored_dtype: str | None, texts: list[str]) -> list[EncodedText]:
        """As `TextToImagePipeline.encode`: features rounded to the dtype training stored them in."""
        captions = encoder.encode_captions(texts, batch_size=len(texts))
        prefix = None if encoder.config.cut_instruction else encoder.encode_prefix().cpu()
        out = []
        for i, cut in enumerate(captions.truncated):
            states = captions.states[i, : int(captions.lengths[i])].cpu()
            if prefix is not None:
                states = torch.cat([prefix.to(states.dtype), states])
            if stored_dtype in DTYPES:
                states = states.to(DTYPES[stored_dtype])
            out.append(EncodedText(states.float(), 0 if prefix is None else prefix.shape[0], cut))
        return out


class DenoiseJob(NamedTuple):
    """The images of one request: text per encoder, optional negative text, seeds, sampler settings."""

    text: list[EncodedText]
    negative: list[EncodedText] | None
    seeds: list[int]
    steps: int
    height: int
    width: int
    guidance: float


class DenoiseResult(NamedTuple):
    images: np.ndarray  # uint8 [n, H, W, 3]
    batch_images: int  # images in the forward pass this request shared
    batch_requests: int


@dataclass
class _Model:
    model: torch.nn.Module
    codec: Any
    schedule: DiffusionSchedule
    clip_x0: float | None
    facts: dict


def _collate(rows: list[tuple[torch.Tensor, torch.Tensor]], start: int, device, dtype) -> PromptFeatures:
    """Right-pad rows of (states [L, D], mask [L]) into one PromptFeatures."""
    length = max(states.shape[0] for states, _ in rows)
    states = torch.stack([F.pad(s.to(dtype), (0, 0, 0, length - s.shape[0])) for s, _ in rows])
    mask = torch.stack([F.pad(m.bool(), (0, length - m.shape[0])) for _, m in rows])
    return PromptFeatures(states.to(device), mask.to(device), start)


def _full(encoded: EncodedText) -> tuple[torch.Tensor, torch.Tensor]:
    return encoded.states, torch.ones(encoded.states.shape[0], dtype=torch.bool)


def _images_in(items: list[tuple[ModelRef, DenoiseJob]]) -> int:
    return sum(len(job.seeds) for _, job in items)


@serve.deployment
class Denoiser:
    """Refiners + LI-DiT + DDIM + codec (Sec. 3.3-3.4), batched over the images of concurrent requests."""

    def __init__(self, tracking_uri: str | None, device: str, dtype: str, max_batch_size: int,
                 batch_wait_timeout_s: float, num_cpus: float = 1.0) -> None:
        self.tracking_uri, self.device = tracking_uri, _device(device)
        _use_cpus(num_cpus)
        self.dtype = getattr(torch, dtype)
        self.models = _Versions(self._load)  # version uri -> _Model
        self.denoise_batch.set_max_batch_size(max_batch_size)
        self.denoise_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def _model(self, ref: ModelRef) -> _Model:
        return await self.models.get(ref.uri, ref)

    def _load(self, ref: ModelRef) -> _Model:
        folder = checkpoint_folder(ref, self.tracking_uri)
        log.info("denoiser: loading %s version %s from %s", ref.name, ref.version, folder)
        model, config = load_checkpoint(folder, use_ema=True, device=self.device)
        model = model.to(self.dtype)
        codec = codec_from_config(config["codec"], device=self.device)
        schedule = DiffusionSchedule(**config["schedule"]) if config.get("schedule") else DiffusionSchedule()
        size = config.get("image_size") or 32
        height, width = (size, size) if isinstance(size, int) else (int(size[-2]), int(size[-1]))
        facts = {"patch_size": model.config.patch_size, "downsample": codec.downsample, "channels": codec.channels,
                 "height": height, "width": width, "parameters": model.num_params()}
        return _Model(model, codec, schedule, 1.0 if isinstance(codec, IdentityCodec) else None, facts)

    async def prepare(self, ref: ModelRef) -> dict:
        """Load a version before it takes traffic; returns what the ingress needs for its limits."""
        return (await self._model(ref)).facts

    async def __call__(self, ref: ModelRef, job: DenoiseJob) -> DenoiseResult:
        return await self.denoise_batch((ref, job))

    async def denoise_many(self, ref: ModelRef, jobs: list[DenoiseJob]) -> list[DenoiseResult]:
        """The jobs of a batch of requests (the ingress batches them): one call, one Ray hop; they join this
        replica's batch queue together (`max_batch_size` images per sampling run)."""
        return list(await asyncio.gather(*(self.denoise_batch((ref, job)) for job in jobs)))

    @serve.batch(batch_size_fn=_images_in)
    async def denoise_batch(self, items: list[tuple[ModelRef, DenoiseJob]]) -> list[DenoiseResult]:
        out: list[DenoiseResult | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, (ref, job) in enumerate(items):
            groups.setdefault((ref.uri, job.steps, job.height, job.width, job.guidance), []).append(i)
        for rows in groups.values():
            loaded = await self._model(items[rows[0]][0])
            jobs = [items[i][1] for i in rows]
            images = await asyncio.to_thread(self._generate, loaded, jobs)
            first = 0
            for i, job in zip(rows, jobs):
                out[i] = DenoiseResult(images[first : first + len(job.seeds)], len(images), len(rows))
                first += len(job.seeds)
        return out  # type: ignore[return-value]

    def _generate(self, loaded: _Model, jobs: list[DenoiseJob]) -> np.ndarray:
        """One DDIM run for every image of `jobs` (same steps, size, guidance)."""
        head = jobs[0]
        model, device, dtype = loaded.model, self.device, self.dtype
        per_row = [job for job in jobs for _ in job.seeds]
        text = [_collate([_full(job.text[e]) for job in per_row], head.text[e].caption_start, device, dtype)
                for e in range(len(head.text))]
        negative = None
        if head.guidance != 1.0 and any(job.negative for job in jobs):
            null = model.null_prompts(text)
            negative = [
                _collate([_full(job.negative[e]) if job.negative else (null[e].states[r], null[e].mask[r])
                          for r, job in enumerate(per_row)], null[e].caption_start, device, dtype)
                for e in range(len(text))
            ]
        down = loaded.facts["downsample"]
        shape = (len(per_row), loaded.facts["channels"], head.height // down, head.width // down)
        seeds = [seed for job in jobs for seed in job.seeds]
        with torch.inference_mode():
            latents = sample(model, text, loaded.schedule, shape, steps=head.steps, guidance=head.guidance,
                             seed=seeds, negative_text=negative, clip_x0=loaded.clip_x0)
            return loaded.codec.decode(latents.float()).cpu().numpy()


# ---- ingress -------------------------------------------------------------------------------------------

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
    limits: Limits
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
        names = [name for name, _, _ in ref.encoders()]
        if sorted(names) != sorted(self.encoders):
            raise RuntimeError(f"version {ref.version} needs encoders {names}, this application serves "
                               f"{sorted(self.encoders)}: deploy it anew")
        facts, *encoders = await asyncio.gather(
            self.denoiser.prepare.remote(ref), *(self.encoders[n].prepare.remote(c) for n, c, _ in ref.encoders()))
        names = {field.name for field in dataclasses.fields(Limits)}
        limits = Limits(**{k: v for k, v in self.settings["limits"].items() if k in names},
                        size_multiple=facts["patch_size"] * facts["downsample"], default_width=facts["width"],
                        default_height=facts["height"])
        previous = self.current.ref.version if self.current else None
        self.current = _Serving(ref, limits, encoders, facts, time.time())
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
        return JSONResponse({"object": "list", "data": [model], "limits": serving.limits.to_dict(),
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
        limits, ref = serving.limits, serving.ref
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limits.max_body_bytes:
            raise ApiError(413, f"body: {length} bytes is over the limit of {limits.max_body_bytes}", "body", "too_large")
        data = parse_json(await request.body(), limits.max_body_bytes)
        gen = validate_request(data, limits, random.randrange(MAX_SEED - limits.max_n))
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
        encoders = ref.encoders()
        texts: list[str] = []
        spans: list[tuple[int, bool]] = []  # (index of the prompt in texts, has a negative prompt)
        for i in rows:
            gen = items[i][1]
            spans.append((len(texts), bool(gen.negative_prompt)))
            texts += [gen.prompt] + ([gen.negative_prompt] if gen.negative_prompt else [])
        per_encoder: list[list[EncodedText]] = await asyncio.gather(
            *(self.encoders[name].encode_many.remote(config, stored, texts) for name, config, stored in encoders))
        jobs, targets = [], []
        for i, (first, has_negative) in zip(rows, spans):
            gen = items[i][1]
            positive = [encoded[first] for encoded in per_encoder]
            negative = [encoded[first + 1] for encoded in per_encoder] if has_negative else None
            truncated = max(e.truncated for e in positive + (negative or []))
            if truncated and self.settings["limits"]["long_prompt"] == "reject":
                field = "prompt" if max(e.truncated for e in positive) else "negative_prompt"
                limit = min(config.max_tokens for _, config, _ in encoders)
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
        for name, _, _ in ref.encoders()
    }
    denoiser = Denoiser.options(**spec.denoiser.options()).bind(
        source.tracking_uri, spec.device, spec.dtype, spec.denoiser.max_batch_size, spec.denoiser.batch_wait_timeout_s,
        spec.denoiser.num_cpus)
    settings = {"limits": spec.limits.model_dump(), "poll_interval_s": spec.poll_interval_s,
                "auth_digest": auth_digest, "ready_timeout_s": spec.ready_timeout_s,
                "max_batch_size": spec.ingress.max_batch_size, "batch_wait_timeout_s": spec.ingress.batch_wait_timeout_s}
    return Ingress.options(**spec.ingress.options()).bind(encoders, denoiser, source, ref, settings)
