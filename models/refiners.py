"""Linguistic token refiner and collaborative refiner (LI-DiT, Sec. 3.2 and 3.3).

Both run inside the denoiser and are timestep-aware: their gates and modulation come from
c = MLP(token-mean of the LLM features) + timestep embedding. Input projection, width, heads and
norms are OPEN in the paper; here: RMSNorm + Linear from the LLM width, LayerNorm pre-norms,
the backbone's head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lidit.models.layers import MLP, Attention, attention_mask, masked_mean, modulate
from lidit.models.text_stats import FeatureStandardizer


class RefinerBlock(nn.Module):
    """Bidirectional masked self-attention + FFN, each scaled by a gate from c (zero at init)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, gelu: str, qk_norm: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_ratio, gelu)
        self.gate = nn.Linear(dim, 2 * dim)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, c: torch.Tensor, causal: bool = False
    ) -> torch.Tensor:
        """x [B, S, dim]; attn_mask from `attention_mask`; c [B, dim] (or [B, S, dim] when causal)."""
        gates = self.gate(F.silu(c))
        gate_attn, gate_mlp = (gates.unsqueeze(1) if gates.dim() == 2 else gates).chunk(2, dim=-1)
        x = x + gate_attn * self.attn(self.norm1(x), attn_mask=attn_mask, causal=causal)
        return x + gate_mlp * self.mlp(self.norm2(x))


class LinguisticTokenRefiner(nn.Module):
    """Per LLM: input projection + `depth` gated bidirectional blocks (paper: N = 2).

    Removing the causal mask lets every caption token see the whole prompt, which undoes the
    decoder-only positional bias; `causal=True` keeps it (the paper's ablation, 45.84 vs 54.02).
    `gelu`: the MLPs' GELU approximation (`LiDiTConfig.gelu`). Weights are initialised by `LiDiT`."""

    def __init__(
        self, in_dim: int, dim: int, heads: int, depth: int = 2, mlp_ratio: float = 4.0,
        causal: bool = False, qk_norm: bool = True, *, gelu: str,
    ) -> None:
        super().__init__()
        self.causal = causal
        self.standardize = FeatureStandardizer(in_dim)  # per-channel, fitted on the training data (text_stats)
        self.input_norm = nn.RMSNorm(in_dim, eps=1e-6)
        self.input_proj = nn.Linear(in_dim, dim)
        self.pool_proj = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([RefinerBlock(dim, heads, mlp_ratio, gelu, qk_norm) for _ in range(depth)])

    def forward(
        self, states: torch.Tensor, mask: torch.Tensor, t_emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM states [B, S, in_dim], mask [B, S], timestep embedding [B, dim] -> tokens [B, S, dim],
        c [B, dim] = MLP(token-mean) + timestep embedding."""
        states = self.input_norm(self.standardize(states.to(self.input_proj.weight.dtype)))
        c = self.pool_proj(masked_mean(states, mask)) + t_emb
        gate_c = c
        if self.causal:  # the gates of token i see the mean of tokens <= i only: nothing leaks back
            weight = mask.to(states.dtype).unsqueeze(-1)
            running = (states * weight).cumsum(1) / weight.cumsum(1).clamp(min=1.0)
            gate_c = self.pool_proj(running) + t_emb.unsqueeze(1)
        x = self.input_proj(states)
        attn_mask = attention_mask(mask, self.causal)
        for block in self.blocks:
            x = block(x, attn_mask, gate_c, self.causal)
        return x, c


class CollaborativeBlock(nn.Module):
    """One LLM branch: cross-attention to the other branches + FFN, adaLN-Zero from c."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, gelu: str, cross: bool, qk_norm: bool = True) -> None:
        super().__init__()
        self.cross = cross
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) if cross else None
        self.attn = Attention(dim, heads, context_dim=dim, qk_norm=qk_norm) if cross else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, mlp_ratio, gelu)
        self.modulation = nn.Linear(dim, (6 if cross else 3) * dim)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, others: torch.Tensor | None, others_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x [B, L, dim] (queries); c [B, dim]; others [B, M, dim] with its mask from `attention_mask`."""
        chunks = self.modulation(F.silu(c)).chunk(6 if self.cross else 3, dim=-1)
        if self.cross:
            shift, scale, gate = chunks[:3]
            attended = self.attn(modulate(self.norm1(x), shift, scale), context=others, attn_mask=others_mask)
            x = x + gate.unsqueeze(1) * attended
        shift, scale, gate = chunks[-3:]
        return x + gate.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift, scale))


class CollaborativeRefiner(nn.Module):
    """Fuses N refined LLM streams (Sec. 3.3): each branch attends to the others' tokens (all
    branches updated from the same inputs), then instruction tokens are dropped and the streams
    are concatenated along the sequence (the axis is OPEN; sequence works across tokenizers).
    `gelu`: the MLPs' GELU approximation (`LiDiTConfig.gelu`). Weights are initialised by `LiDiT`."""

    def __init__(
        self, dim: int, heads: int, branches: int, mlp_ratio: float = 4.0, qk_norm: bool = True, *, gelu: str,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [CollaborativeBlock(dim, heads, mlp_ratio, gelu, branches > 1, qk_norm) for _ in range(branches)]
        )

    def forward(
        self, tokens: list[torch.Tensor], masks: list[torch.Tensor], conds: list[torch.Tensor],
        caption_starts: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        refined = []
        for i, block in enumerate(self.blocks):
            others = others_mask = None
            if len(tokens) > 1:
                others = torch.cat([x for j, x in enumerate(tokens) if j != i], dim=1)
                others_mask = attention_mask(torch.cat([m for j, m in enumerate(masks) if j != i], dim=1))
            # Every token is updated on its own (FFN, and attention whose keys are the other
            # branches), and the instruction tokens are dropped right after: only the caption
            # tokens are computed as queries; the instruction tokens still serve as keys.
            refined.append(block(tokens[i][:, caption_starts[i]:], conds[i], others, others_mask))
        return concat_captions(refined, masks, [0] * len(refined), caption_starts)


def concat_captions(
    tokens: list[torch.Tensor], masks: list[torch.Tensor], caption_starts: list[int],
    mask_starts: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop each stream's instruction tokens and concatenate the rest: [B, sum L_i, dim].

    `mask_starts` (default `caption_starts`): where the captions begin in `masks`, for tokens
    that come already cut."""
    mask_starts = caption_starts if mask_starts is None else mask_starts
    text = torch.cat([x[:, start:] for x, start in zip(tokens, caption_starts)], dim=1)
    mask = torch.cat([m[:, start:] for m, start in zip(masks, mask_starts)], dim=1)
    return text, mask
