"""The model deployments of `lidit serve` (they run inside Ray Serve replicas), composed the way LI-DiT is
(paper Sec. 3, Fig. 3); the ingress in front of them is `lidit.jobs.serve.ingress`:

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
import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from ray import serve

from lidit.jobs.serve.source import ModelRef, checkpoint_folder
from lidit.models import EncoderConfig, LLMPromptEncoder, PromptFeatures, codec_from_config, sample
from lidit.models.checkpoint import load_checkpoint
from lidit.models.codecs import IdentityCodec
from lidit.models.cpu_kernels import apply_cpu_kernels
from lidit.models.diffusion import DiffusionSchedule
from lidit.models.encoders import DTYPES, folder_revision
from lidit.platform.storage import local_copy

log = logging.getLogger("lidit.serve")
KEEP_VERSIONS = 2  # the serving version and the one before it (requests in flight)


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
        model, info = load_checkpoint(folder, use_ema=True, device=self.device)
        model = apply_cpu_kernels(model.to(self.dtype))  # CPU float32: oneDNN GEMMs, GELU fused (docs/models.md)
        codec = codec_from_config(info.codec, device=self.device)
        height, width = info.image_size
        facts = {"patch_size": model.config.patch_size, "downsample": codec.downsample, "channels": codec.channels,
                 "height": height, "width": width, "parameters": model.num_params()}
        return _Model(model, codec, info.diffusion_schedule(), 1.0 if isinstance(codec, IdentityCodec) else None, facts)

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
        negative = null_rows = None
        if head.guidance != 1.0 and any(job.negative for job in jobs):
            # rows without a negative prompt take the null caption (their own text row stands in for it)
            negative = [_collate([_full((job.negative or job.text)[e]) for job in per_row],
                                 head.text[e].caption_start, device, dtype) for e in range(len(text))]
            null_rows = torch.tensor([not job.negative for job in per_row])
        down = loaded.facts["downsample"]
        shape = (len(per_row), loaded.facts["channels"], head.height // down, head.width // down)
        seeds = [seed for job in jobs for seed in job.seeds]
        with torch.inference_mode():
            latents = sample(model, text, loaded.schedule, shape, steps=head.steps, guidance=head.guidance,
                             seed=seeds, negative_text=negative, null_negative=null_rows, clip_x0=loaded.clip_x0)
            return loaded.codec.decode(latents.float()).cpu().numpy()
