"""Text-to-image generation from a checkpoint: frozen LLM encoders -> LI-DiT -> DDIM -> codec decode.

Pure PyTorch + transformers (no Ray, no MLflow), so evaluation, serving and notebooks share it. The two
halves stay separately callable: `encode(prompts)` runs the LLMs (LI-DiT Sec. 3.2), `denoise(text, ...)`
runs the refiners + backbone inside the sampler (Sec. 3.3-3.4); `generate` is both plus decoding.
Sample i starts from noise seeded by seeds[i] alone, so the same seed and parameters give the same image.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from lidit.models.checkpoint import load_checkpoint
from lidit.models.codecs import IdentityCodec, ImageCodec, codec_from_config
from lidit.models.cpu_kernels import apply_cpu_kernels
from lidit.models.diffusion import DiffusionSchedule, sample
from lidit.models.encoders import DTYPES, LLMPromptEncoder, PromptFeatures, folder_revision
from lidit.models.lidit import LiDiT


class TextToImagePipeline:
    """Frozen `LLMPromptEncoder`s + a `LiDiT` + an image codec + a diffusion schedule."""

    def __init__(
        self, model: LiDiT, encoders: dict[str, LLMPromptEncoder], codec: ImageCodec,
        schedule: DiffusionSchedule | None = None, image_size: tuple[int, int] | None = None,
        feature_dtypes: dict[str, str | None] | None = None,
    ) -> None:
        if len(encoders) != len(model.config.encoder_dims):
            raise ValueError(f"encoders: {len(encoders)} given, the model takes {len(model.config.encoder_dims)}")
        for (name, encoder), dim in zip(encoders.items(), model.config.encoder_dims):
            if encoder.hidden_size != dim:
                raise ValueError(f"encoders.{name}: hidden size {encoder.hidden_size} != the model's {dim}")
        self.model = model.eval()
        self.encoders = encoders
        self.codec = codec
        self.schedule = schedule or DiffusionSchedule()
        self.image_size = image_size
        self.feature_dtypes = feature_dtypes or {}
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(
        cls, folder: str, device: str | torch.device = "cpu", encoder_paths: dict[str, str] | None = None,
        use_ema: bool = True,
    ) -> "TextToImagePipeline":
        """Load a checkpoint folder; each encoder comes from the path recorded in config.yaml, or from
        `encoder_paths[name]` (a local folder that must hold the same model files: same revision)."""
        model, info = load_checkpoint(folder, use_ema=use_ema, device=device)
        apply_cpu_kernels(model)  # CPU float32 inference: oneDNN GEMMs with the GELU fused (docs/models.md)
        unknown = sorted(set(encoder_paths or {}) - {e.name for e in info.encoders})
        if unknown:
            raise ValueError(f"encoder_paths.{unknown[0]}: the checkpoint has no encoder of that name")
        encoders = {}
        for entry in info.encoders:
            path = (encoder_paths or {}).get(entry.name, entry.config.path)
            if not os.path.isdir(path):
                raise ValueError(f"encoders.{entry.name}.path: {path!r} is not a local folder (pass encoder_paths)")
            recorded = entry.config.revision
            if recorded is not None and folder_revision(path) != recorded:
                raise ValueError(f"encoders.{entry.name}: {path!r} does not hold the model the checkpoint was "
                                 f"trained with (revision {folder_revision(path)} != {recorded})")
            encoders[entry.name] = LLMPromptEncoder(dataclasses.replace(entry.config, path=path), device=device)
        codec = codec_from_config(info.codec, device=device)
        return cls(model, encoders, codec, info.diffusion_schedule(), info.image_size,
                   {e.name: e.stored_dtype for e in info.encoders})

    @property
    def encoder_names(self) -> list[str]:
        return list(self.encoders)

    def encode(self, prompts: list[str]) -> list[PromptFeatures]:
        """Per encoder, the prompt features the denoiser takes (rounded to the dtype the training
        features were stored in, so inference sees what training saw)."""
        if not prompts:
            raise ValueError("prompts: empty list")
        out = []
        for name, encoder in self.encoders.items():
            features = encoder.encode(list(prompts))
            states = features.states
            stored = self.feature_dtypes.get(name)
            if stored in DTYPES:
                states = states.to(DTYPES[stored])
            out.append(PromptFeatures(states.float().to(self.device), features.mask.to(self.device),
                                      features.caption_start))
        return out

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        step = self.codec.downsample * self.model.config.patch_size
        if height <= 0 or width <= 0 or height % step or width % step:
            raise ValueError(f"height/width: {height}x{width} must be positive multiples of {step}")
        return batch, self.codec.channels, height // self.codec.downsample, width // self.codec.downsample

    @torch.inference_mode()
    def denoise(
        self, text: list[PromptFeatures], seeds: int | list[int], steps: int = 20, guidance: float = 4.0,
        height: int | None = None, width: int | None = None, negative_text: list[PromptFeatures] | None = None,
    ) -> torch.Tensor:
        """DDIM from seeded noise to latents [B, C, h, w] under classifier-free guidance."""
        height, width = self._size(height, width)
        shape = self.latent_shape(text[0].states.shape[0], height, width)
        clip = 1.0 if isinstance(self.codec, IdentityCodec) else None
        return sample(self.model, text, self.schedule, shape, steps=steps, guidance=guidance, seed=seeds,
                      negative_text=negative_text, clip_x0=clip)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> uint8 images [B, H, W, 3] on the CPU."""
        return self.codec.decode(latents).cpu()

    def generate(
        self, prompts: list[str], seeds: int | list[int] = 0, steps: int = 20, guidance: float = 4.0,
        height: int | None = None, width: int | None = None, negative_prompts: list[str] | None = None,
    ) -> torch.Tensor:
        """uint8 images [B, H, W, 3]; `seeds` is one seed per prompt (an int n means n, n+1, ...)."""
        seed_list = [seeds + i for i in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
        if len(seed_list) != len(prompts):
            raise ValueError(f"seeds: {len(seed_list)} seeds for {len(prompts)} prompts")
        if negative_prompts is not None and len(negative_prompts) != len(prompts):
            raise ValueError(f"negative_prompts: {len(negative_prompts)} for {len(prompts)} prompts")
        text = self.encode(prompts)
        negative = self.encode(negative_prompts) if negative_prompts is not None else None
        return self.decode(self.denoise(text, seed_list, steps, guidance, height, width, negative))

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = self.image_size
        if (height is None or width is None) and default is None:
            raise ValueError("height/width: not given and the checkpoint records no image_size")
        return (height if height is not None else default[0], width if width is not None else default[1])
