"""DDPM epsilon-prediction objective and a deterministic DDIM sampler with classifier-free guidance.

The paper states DDPM epsilon-prediction; schedule, sampler, steps, CFG scale and text dropout are
OPEN. Defaults here: the DDPM linear schedule (T = 1000, 1e-4 .. 0.02), DDIM with eta = 0 and
trailing timesteps, guidance 4.0, text dropout 0.1 (`LiDiTConfig.text_dropout`).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from lidit.models.encoders import PromptFeatures

ScheduleKind = Literal["linear", "scaled_linear", "cosine"]
SCHEDULES = get_args(ScheduleKind)


class DiffusionSchedule:
    """DDPM betas and cumulative alphas (float64 for the arithmetic, float32 when applied)."""

    def __init__(
        self, num_steps: int = 1000, kind: ScheduleKind = "linear", beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"schedule.kind: {kind!r} is not one of {SCHEDULES}")
        if num_steps < 2:
            raise ValueError(f"schedule.num_steps: must be >= 2, got {num_steps}")
        self.num_steps, self.kind, self.beta_start, self.beta_end = num_steps, kind, beta_start, beta_end
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
        else:  # Nichol & Dhariwal cosine schedule
            steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
            alpha_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)

    def config(self) -> dict:
        return {"num_steps": self.num_steps, "kind": self.kind, "beta_start": self.beta_start, "beta_end": self.beta_end}

    def alpha_bar(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.alphas_cumprod[t.cpu()].to(device=device, dtype=torch.float32)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(t, x0.device).view(-1, *[1] * (x0.dim() - 1))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def diffusion_loss(
    model, x0: torch.Tensor, text: list[PromptFeatures], schedule: DiffusionSchedule, *, text_dropout: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MSE between the true and predicted noise at uniform random timesteps (DDPM, LI-DiT Sec. 3).

    The model replaces each caption by its learned null caption with probability `text_dropout`, so one
    model serves the conditional and unconditional branches of CFG. Pass `config.text_dropout`: the rate
    is an argument because `model` may be a DDP or FSDP wrapper. At 0 the null caption stays out of the
    forward (DDP then needs `find_unused_parameters`)."""
    batch = x0.shape[0]
    device = x0.device
    t = torch.randint(0, schedule.num_steps, (batch,), generator=generator, device="cpu").to(device)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device=device, dtype=x0.dtype)
    drop = (torch.rand(batch, generator=generator) < text_dropout).to(device) if text_dropout > 0 else None
    prediction = model(schedule.add_noise(x0, noise, t), t, text, drop_caption=drop)
    return F.mse_loss(prediction.float(), noise.float())


def _pad_to(features: PromptFeatures, length: int) -> PromptFeatures:
    extra = length - features.states.shape[1]
    if extra == 0:
        return features
    return PromptFeatures(F.pad(features.states, (0, 0, 0, extra)), F.pad(features.mask, (0, extra)),
                          features.caption_start)


def _cat_prompts(a: list[PromptFeatures], b: list[PromptFeatures]) -> list[PromptFeatures]:
    out = []
    for i, (x, y) in enumerate(zip(a, b)):
        if x.caption_start != y.caption_start:
            raise ValueError(f"negative_text[{i}]: caption_start {y.caption_start} != {x.caption_start}")
        length = max(x.states.shape[1], y.states.shape[1])
        x, y = _pad_to(x, length), _pad_to(y, length)
        out.append(PromptFeatures(torch.cat([x.states, y.states.to(x.states.dtype)]),
                                  torch.cat([x.mask.bool(), y.mask.bool()]), x.caption_start))
    return out


def timesteps(schedule: DiffusionSchedule, steps: int) -> list[int]:
    """`steps` timesteps from T-1 down to 0, evenly spaced (trailing spacing)."""
    if not 1 <= steps <= schedule.num_steps:
        raise ValueError(f"steps: must be in [1, {schedule.num_steps}], got {steps}")
    return torch.linspace(schedule.num_steps - 1, 0, steps).round().long().tolist()


@torch.no_grad()
def sample(
    model, text: list[PromptFeatures], schedule: DiffusionSchedule, shape: tuple[int, int, int, int],
    steps: int = 20, guidance: float = 4.0, seed: int | list[int] = 0,
    negative_text: list[PromptFeatures] | None = None, null_negative: torch.Tensor | None = None,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) with classifier-free guidance. Sample i starts from noise seeded
    by seeds[i] (seed + i for an int), so an image does not depend on the rest of the batch and the
    same seed gives the same bits.

    The unconditional branch is the learned null caption for every row, or `negative_text` (one row
    per sample, same `caption_start`s); with `null_negative` [B] bool, rows where it is true take the
    null caption instead, after their `text` row's instruction (their `negative_text` row is ignored:
    a batch that mixes requests with and without a negative prompt). `clip_x0` clamps each step's
    clean estimate to [-clip_x0, clip_x0] (1.0 for pixel codecs, as DDPM does) and re-derives the
    noise from it."""
    batch = shape[0]
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    seeds = [seed + i for i in range(batch)] if isinstance(seed, int) else list(seed)
    if len(seeds) != batch:
        raise ValueError(f"seed: {len(seeds)} seeds for a batch of {batch}")
    noise = [torch.randn(shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]
    x = torch.stack(noise).to(device=device, dtype=dtype)
    guided, drop = guidance != 1.0, None
    if guided:
        if negative_text is None:
            negative_text, null_negative = text, torch.ones(batch, dtype=torch.bool)
        if negative_text[0].states.shape[0] != batch:
            raise ValueError(f"negative_text: {negative_text[0].states.shape[0]} rows for a batch of {batch}")
        text = _cat_prompts(text, negative_text)
        if null_negative is not None:
            if null_negative.shape != (batch,):
                raise ValueError(f"null_negative: shape {tuple(null_negative.shape)}, expected ({batch},)")
            null_negative = null_negative.to(device=device, dtype=torch.bool)
            # a null row takes its own text row (that instruction prefix), whose caption the model replaces
            rows = torch.arange(batch, device=device)
            rows = torch.cat([rows, torch.where(null_negative, rows, rows + batch)])
            text = [PromptFeatures(f.states[rows], f.mask[rows], f.caption_start) for f in text]
            drop = torch.cat([torch.zeros_like(null_negative), null_negative])
    plan = timesteps(schedule, steps)
    for i, t in enumerate(plan):
        t_batch = torch.full((x.shape[0] * (2 if guided else 1),), t, device=device, dtype=torch.long)
        eps = model(torch.cat([x, x]) if guided else x, t_batch, text, drop_caption=drop).to(dtype)
        if guided:
            cond, uncond_eps = eps.chunk(2)
            eps = uncond_eps + guidance * (cond - uncond_eps)
        a_t = float(schedule.alphas_cumprod[t])
        a_prev = float(schedule.alphas_cumprod[plan[i + 1]]) if i + 1 < len(plan) else 1.0
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x
