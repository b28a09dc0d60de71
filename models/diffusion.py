"""Diffusion objectives and samplers with classifier-free guidance (docs/models.md, "Objectives").

The paper states DDPM epsilon-prediction; schedule, sampler, steps, CFG scale and text dropout are
OPEN. Two objectives:
- `eps`: DDPM noise prediction on a beta schedule (linear T = 1000, 1e-4 .. 0.02 by default), uniform
  timesteps, optionally min-SNR-gamma weighted (Hang et al. 2023); sampled by DDIM (eta = 0, trailing
  timesteps) or DPM-Solver++ (2M) (Lu et al. 2022).
- `flow`: rectified flow, x_t = (1 - t) x0 + t noise, velocity target noise - x0, logit-normal timesteps
  (SD3, Esser et al. 2024); sampled by Euler. The network sees t * num_steps, the range eps uses.
Guidance 4.0 and text dropout 0.1 (`LiDiTConfig.text_dropout`) by default. The whole choice lives in one
`DiffusionSchedule`, whose `config()` the checkpoint records, so evaluation and serving sample as trained.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from lidit.models.encoders import PromptFeatures

ScheduleKind = Literal["linear", "scaled_linear", "cosine"]
SCHEDULES = get_args(ScheduleKind)
Objective = Literal["eps", "flow"]
OBJECTIVES = get_args(Objective)
SamplerKind = Literal["ddim", "dpm++2m", "euler"]
SAMPLERS: dict[str, tuple[str, ...]] = {"eps": ("ddim", "dpm++2m"), "flow": ("euler",)}  # the first is the default


class DiffusionSchedule:
    """The forward process, the training target and the sampler of one objective. The DDPM betas and
    cumulative alphas are float64 for the arithmetic, float32 when applied (eps only)."""

    def __init__(
        self, num_steps: int = 1000, kind: ScheduleKind = "linear", beta_start: float = 1e-4, beta_end: float = 0.02,
        objective: Objective = "eps", sampler: SamplerKind | None = None, min_snr_gamma: float | None = None,
    ) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"schedule.kind: {kind!r} is not one of {SCHEDULES}")
        if num_steps < 2:
            raise ValueError(f"schedule.num_steps: must be >= 2, got {num_steps}")
        if objective not in OBJECTIVES:
            raise ValueError(f"schedule.objective: {objective!r} is not one of {OBJECTIVES}")
        sampler = sampler or SAMPLERS[objective][0]
        if sampler not in SAMPLERS[objective]:
            raise ValueError(f"schedule.sampler: {sampler!r} does not sample {objective!r}; use one of {SAMPLERS[objective]}")
        if min_snr_gamma is not None and (objective != "eps" or min_snr_gamma <= 0):
            raise ValueError("schedule.min_snr_gamma: a positive gamma, for the eps objective only")
        self.num_steps, self.kind, self.beta_start, self.beta_end = num_steps, kind, beta_start, beta_end
        self.objective, self.sampler, self.min_snr_gamma = objective, sampler, min_snr_gamma
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
        return {"num_steps": self.num_steps, "kind": self.kind, "beta_start": self.beta_start, "beta_end": self.beta_end,
                "objective": self.objective, "sampler": self.sampler, "min_snr_gamma": self.min_snr_gamma}

    def alpha_bar(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.alphas_cumprod[t.cpu()].to(device=device, dtype=torch.float32)

    def draw_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps: integer DDPM steps, uniform (eps), or t in (0, 1), logit-normal (flow)."""
        if self.objective == "flow":
            return torch.sigmoid(torch.randn(batch, generator=generator))
        return torch.randint(0, self.num_steps, (batch,), generator=generator)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network's timestep embedder is given."""
        return t * self.num_steps if self.objective == "flow" else t

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        view = (-1, *[1] * (x0.dim() - 1))
        if self.objective == "flow":
            s = t.to(device=x0.device, dtype=torch.float32).view(view)
            return (1 - s) * x0 + s * noise
        a = self.alpha_bar(t, x0.device).view(view)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0 if self.objective == "flow" else noise

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """min-SNR-gamma for eps: min(SNR, gamma) / SNR per sample; None means equal weights."""
        if self.min_snr_gamma is None:
            return None
        a = self.alphas_cumprod[t.cpu()].float()
        snr = a / (1 - a)
        return snr.clamp(max=self.min_snr_gamma) / snr


def denoising_error(
    model, x0: torch.Tensor, text: list[PromptFeatures], schedule: DiffusionSchedule, t: torch.Tensor,
    noise: torch.Tensor, drop_caption: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample mean squared error of the model's prediction at given timesteps and noise [B]: the
    training loss before weighting, and the likelihood proxy the prompt-following score compares."""
    t = t.to(x0.device)
    noisy = schedule.add_noise(x0, noise, t)
    prediction = model(noisy, schedule.model_time(t), text, drop_caption=drop_caption)
    return (prediction.float() - schedule.target(x0, noise).float()).pow(2).flatten(1).mean(1)


def diffusion_loss(
    model, x0: torch.Tensor, text: list[PromptFeatures], schedule: DiffusionSchedule, *, text_dropout: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The objective's MSE at random timesteps (DDPM eps, LI-DiT Sec. 3, or flow velocity).

    The model replaces each caption by its learned null caption with probability `text_dropout`, so one
    model serves the conditional and unconditional branches of CFG. Pass `config.text_dropout`: the rate
    is an argument because `model` may be a DDP or FSDP wrapper. At 0 the null caption stays out of the
    forward (DDP then needs `find_unused_parameters`)."""
    batch = x0.shape[0]
    t = schedule.draw_timesteps(batch, generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device=x0.device, dtype=x0.dtype)
    drop = (torch.rand(batch, generator=generator) < text_dropout).to(x0.device) if text_dropout > 0 else None
    errors = denoising_error(model, x0, text, schedule, t, noise, drop)
    weight = schedule.loss_weight(t)
    return errors.mean() if weight is None else (errors * weight.to(errors.device)).mean()


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
    """`steps` DDPM timesteps from T-1 down to 0, evenly spaced (trailing spacing)."""
    if not 1 <= steps <= schedule.num_steps:
        raise ValueError(f"steps: must be in [1, {schedule.num_steps}], got {steps}")
    return torch.linspace(schedule.num_steps - 1, 0, steps).round().long().tolist()


def _guided_text(text, negative_text, null_negative, batch, device):
    """Conditional rows then unconditional rows, and which rows take the learned null caption."""
    if negative_text is None:
        negative_text, null_negative = text, torch.ones(batch, dtype=torch.bool)
    if negative_text[0].states.shape[0] != batch:
        raise ValueError(f"negative_text: {negative_text[0].states.shape[0]} rows for a batch of {batch}")
    text = _cat_prompts(text, negative_text)
    if null_negative is None:
        return text, None
    if null_negative.shape != (batch,):
        raise ValueError(f"null_negative: shape {tuple(null_negative.shape)}, expected ({batch},)")
    null_negative = null_negative.to(device=device, dtype=torch.bool)
    # a null row takes its own text row (that instruction prefix), whose caption the model replaces
    rows = torch.arange(batch, device=device)
    rows = torch.cat([rows, torch.where(null_negative, rows, rows + batch)])
    text = [PromptFeatures(f.states[rows], f.mask[rows], f.caption_start) for f in text]
    return text, torch.cat([torch.zeros_like(null_negative), null_negative])


@torch.no_grad()
def sample(
    model, text: list[PromptFeatures], schedule: DiffusionSchedule, shape: tuple[int, int, int, int],
    steps: int = 20, guidance: float = 4.0, seed: int | list[int] = 0,
    negative_text: list[PromptFeatures] | None = None, null_negative: torch.Tensor | None = None,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """Sample with the schedule's sampler under classifier-free guidance. Sample i starts from noise
    seeded by seeds[i] (seed + i for an int), so an image does not depend on the rest of the batch and
    the same seed gives the same bits.

    The unconditional branch is the learned null caption for every row, or `negative_text` (one row
    per sample, same `caption_start`s); with `null_negative` [B] bool, rows where it is true take the
    null caption instead, after their `text` row's instruction (their `negative_text` row is ignored:
    a batch that mixes requests with and without a negative prompt). `clip_x0` clamps each step's
    clean estimate to [-clip_x0, clip_x0] (1.0 for pixel codecs, as DDPM does)."""
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
        text, drop = _guided_text(text, negative_text, null_negative, batch, device)

    def predict(x: torch.Tensor, t: float) -> torch.Tensor:
        """The guided network output at (model) time t."""
        t_batch = torch.full((x.shape[0] * (2 if guided else 1),), t, device=device,
                             dtype=torch.float32 if schedule.objective == "flow" else torch.long)
        out = model(torch.cat([x, x]) if guided else x, t_batch, text, drop_caption=drop).to(dtype)
        if not guided:
            return out
        cond, uncond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    if schedule.sampler == "euler":
        return _euler(predict, x, schedule, steps, clip_x0)
    return _ddpm_solver(predict, x, schedule, steps, clip_x0, second_order=schedule.sampler == "dpm++2m")


def _euler(predict, x, schedule: DiffusionSchedule, steps: int, clip_x0: float | None) -> torch.Tensor:
    """Rectified flow from t = 1 to 0 in `steps` equal Euler steps on the predicted velocity."""
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    grid = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for t, t_next in itertools.pairwise(grid):
        v = predict(x, t * schedule.num_steps)
        if clip_x0 is not None:  # x0 = x_t - t v, clamped, and the velocity that reaches it
            x0 = (x - t * v).clamp(-clip_x0, clip_x0)
            v = (x - x0) / t
        x = x + (t_next - t) * v
    return x


def _ddpm_solver(predict, x, schedule: DiffusionSchedule, steps: int, clip_x0: float | None,
                 second_order: bool) -> torch.Tensor:
    """DDIM (eta = 0) or DPM-Solver++ (2M, data prediction, first order on the last two steps) on the
    trailing DDPM timesteps. Both step x0 estimates in log-SNR time; DDIM is the first-order case."""
    plan = timesteps(schedule, steps)
    previous_x0, previous_h = None, None
    for i, t in enumerate(plan):
        eps = predict(x, t)
        a_t = float(schedule.alphas_cumprod[t])
        a_next = float(schedule.alphas_cumprod[plan[i + 1]]) if i + 1 < len(plan) else 1.0
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        if a_next >= 1.0:  # the last step lands on the clean estimate
            return x0
        if not second_order:
            x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
            continue
        lam_t = 0.5 * math.log(a_t / (1 - a_t))
        lam_next = 0.5 * math.log(a_next / (1 - a_next))
        h = lam_next - lam_t
        d = x0
        if previous_x0 is not None and i + 2 < len(plan):  # first order into t = 0, where h jumps (docs/models.md)
            r = previous_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
        x = math.sqrt((1 - a_next) / (1 - a_t)) * x - math.sqrt(a_next) * math.expm1(-h) * d
        previous_x0, previous_h = x0, h
    return x
