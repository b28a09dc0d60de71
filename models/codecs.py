"""Image codecs: what the denoiser sees instead of pixels.

`IdentityCodec` for the tiny synthetic data (pixels in [-1, 1]); `VAECodec` wraps a diffusers
`AutoencoderKL` saved in a local folder (the paper: an 8x VAE with 16 latent channels). Encoding
uses the posterior mean, so latents are deterministic and can be precomputed once.
"""

from __future__ import annotations

import json
import os
from typing import Literal, Protocol, get_args

import torch

from lidit.models.encoders import DTYPES, folder_revision

CodecKind = Literal["identity", "vae"]


class ImageCodec(Protocol):
    channels: int
    downsample: int

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def config(self) -> dict: ...


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class IdentityCodec:
    """Pixels as latents: [-1, 1], 3 channels, no downsampling."""

    channels = 3
    downsample = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return _to_unit(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return _to_uint8(latents)

    def config(self) -> dict:
        return {"kind": "identity"}


class VAECodec:
    """diffusers `AutoencoderKL.from_pretrained(path)`; latents = (mean - shift) * scale."""

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: str = "float32") -> None:
        from diffusers import AutoencoderKL

        if dtype not in DTYPES:
            raise ValueError(f"codec.dtype: {dtype!r} is not one of {sorted(DTYPES)}")
        self.path, self.dtype, self.revision = path, dtype, folder_revision(path)
        self.vae = AutoencoderKL.from_pretrained(path, torch_dtype=DTYPES[dtype]).to(device).eval()
        self.vae.requires_grad_(False)
        cfg = self.vae.config
        self.channels = cfg.latent_channels
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.scale = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = _to_unit(images).to(device=self.vae.device, dtype=self.vae.dtype)
        mean = self.vae.encode(x).latent_dist.mean
        return ((mean - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = (latents.to(device=self.vae.device, dtype=self.vae.dtype) / self.scale) + self.shift
        return _to_uint8(self.vae.decode(z).sample).cpu()

    def config(self) -> dict:
        return {"kind": "vae", "path": self.path, "revision": self.revision, "dtype": self.dtype}


def codec_geometry(config: dict) -> tuple[int, int]:
    """(latent channels, downsampling factor) of a codec config, without loading any weights: as the config
    states them (latents made without a decoder, e.g. a benchmark's random ones), else by kind (a VAE's come
    from its folder's config.json, as `AutoencoderKL` reads them)."""
    if "channels" in config and "downsample" in config:
        return int(config["channels"]), int(config["downsample"])
    kind = config.get("kind")
    if kind == "identity":
        return IdentityCodec.channels, IdentityCodec.downsample
    if kind == "vae":
        path = os.path.join(config.get("path") or "", "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"codec.path: no config.json in {config.get('path')!r}")
        with open(path) as f:
            vae = json.load(f)
        return int(vae["latent_channels"]), 2 ** (len(vae["block_out_channels"]) - 1)
    raise ValueError(f"codec.kind: {kind!r} is not one of {list(get_args(CodecKind))}")


def codec_from_config(config: dict, device: str | torch.device = "cpu") -> ImageCodec:
    """Rebuild a codec from `codec.config()` (a checkpoint's `codec` entry)."""
    kind = config.get("kind")
    if kind == "identity":
        return IdentityCodec()
    if kind == "vae":
        if "path" not in config:
            raise ValueError("codec.path: missing for a vae codec")
        codec = VAECodec(config["path"], device=device, dtype=config.get("dtype", "float32"))
        expected = config.get("revision")
        if expected is not None and expected != codec.revision:
            raise ValueError(f"codec.revision: folder {config['path']!r} has {codec.revision}, expected {expected}")
        return codec
    raise ValueError(f"codec.kind: {kind!r} is not one of {list(get_args(CodecKind))}")
