"""Per-channel standardisation of LLM features, fitted on the training data before step 0.

Pretrained decoder-only LLMs carry "massive activations": a few channels hold most of a hidden state's
energy. A per-token RMSNorm keeps those channels dominant, so every caption token looks alike and the
denoiser learns to ignore the text. Subtracting each channel's mean and dividing by its standard
deviation over the caption tokens gives the refiners features in which the caption is visible (the
measurements: docs/real_llms.md, "Massive activations"). The paper leaves
the input projection OPEN; this is the choice here. The statistics are buffers of the model (saved in
the checkpoint); a fresh model has the identity (mean 0, std 1), which is also what checkpoints written
before this module load as.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from lidit.models.encoders import PromptFeatures


class FeatureStandardizer(nn.Module):
    """x -> (x - mean) / std per channel, with the statistics as buffers."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("inv_std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) * self.inv_std.to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 (torch's signature)
        for name in ("mean", "inv_std"):  # checkpoints from before standardisation: identity
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def caption_statistics(batches: Iterable[list[PromptFeatures]], max_tokens: int = 65536) -> list[dict[str, list[float]]]:
    """Per encoder, the mean and standard deviation of every channel over the caption tokens (instruction
    and padding left out) of `batches` (lists of per-encoder features), up to `max_tokens` tokens each."""
    sums: list[torch.Tensor] = []
    squares: list[torch.Tensor] = []
    counts: list[int] = []
    for text in batches:
        if not sums:
            sums = [torch.zeros(f.states.shape[-1], dtype=torch.float64) for f in text]
            squares = [torch.zeros_like(s) for s in sums]
            counts = [0] * len(text)
        for i, features in enumerate(text):
            if counts[i] >= max_tokens:
                continue
            start = features.caption_start
            tokens = features.states[:, start:][features.mask[:, start:].bool()].double()
            sums[i] += tokens.sum(0)
            squares[i] += tokens.square().sum(0)
            counts[i] += tokens.shape[0]
        if counts and min(counts) >= max_tokens:
            break
    if not counts or min(counts) < 2:
        raise ValueError("text statistics: need at least two caption tokens per encoder")
    out = []
    for total, square, count in zip(sums, squares, counts):
        mean = total / count
        std = (square / count - mean.square()).clamp(min=0).sqrt()
        out.append({"mean": mean.tolist(), "std": std.tolist(), "tokens": count})
    return out


@torch.no_grad()
def apply_text_statistics(model: nn.Module, statistics: list[dict[str, list[float]]]) -> None:
    """Set each token refiner's standardiser from `caption_statistics`, and start each learned null
    caption at a typical standardised token (N(0, 1) per channel)."""
    refiners = model.token_refiners
    if len(statistics) != len(refiners):
        raise ValueError(f"text statistics: {len(statistics)} encoder(s), the model has {len(refiners)}")
    for refiner, null, stats in zip(refiners, model.null_text, statistics):
        mean = torch.tensor(stats["mean"], dtype=torch.float32)
        std = torch.tensor(stats["std"], dtype=torch.float32)
        if mean.shape[0] != refiner.standardize.mean.shape[0]:
            raise ValueError(f"text statistics: width {mean.shape[0]} != the refiner's {refiner.standardize.mean.shape[0]}")
        # channels that never vary (std ~ 0) are left unscaled rather than blown up
        floor = 1e-3 * float(std.square().mean().sqrt()) + 1e-6
        std = torch.where(std > floor, std, torch.ones_like(std))
        refiner.standardize.mean.copy_(mean)
        refiner.standardize.inv_std.copy_(1.0 / std)
        null.copy_(mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0)))
