"""Building blocks shared by the refiners and the LI-DiT backbone (DiT style, fused projections).

Plain `nn.Linear` and GELU; CPU kernels are applied to a built model by `cpu_kernels`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where `mask` is true: [B, N, D], [B, N] -> [B, D]."""
    weight = mask.to(x.dtype).unsqueeze(-1)
    return (x * weight).sum(1) / weight.sum(1).clamp(min=1.0)


class Attention(nn.Module):
    """Multi-head attention with QK RMSNorm and `scaled_dot_product_attention`.

    Self-attention uses one fused qkv projection; cross-attention (context_dim given) one q and
    one fused kv projection from the context width."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qk_norm: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.cross = context_dim is not None
        if self.cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(context_dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """x [B, N, dim]; context [B, M, context_dim] (cross); attn_mask from `attention_mask`."""
        batch, tokens, dim = x.shape
        if self.cross:
            q = self.q(x).view(batch, tokens, self.heads, self.head_dim)
            k, v = self.kv(context).view(batch, context.shape[1], 2, self.heads, self.head_dim).unbind(2)
        else:
            q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, self.head_dim).unbind(2)
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


def attention_mask(mask: torch.Tensor | None, causal: bool = False) -> torch.Tensor | None:
    """The SDPA mask for a [B, M] key mask, built once per forward and shared by the blocks.

    None when every key is valid: SDPA then takes its unmasked path (and `causal` its is_causal
    flag), which gives the same output as an all-true mask. Otherwise a boolean [B, 1, 1, M]
    mask, or [B, 1, M, M] with `causal` (queries = keys). On the meta device (FLOP counting, where
    values are unknown) the mask is always built."""
    if mask is None or (mask.device.type != "meta" and bool(mask.all())):
        return None
    # a row with no valid key would give NaN: let it see everything (its output is unused)
    mask = (mask | ~mask.any(-1, keepdim=True))[:, None, None, :]
    if causal:
        mask = mask & torch.ones(mask.shape[-1], mask.shape[-1], dtype=torch.bool, device=mask.device).tril()
    return mask


class MLP(nn.Module):
    """Linear -> GELU -> Linear; `approximate` is F.gelu's: "tanh" or "none" (exact erf)."""

    def __init__(self, dim: int, mlp_ratio: float, approximate: str) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features -> MLP (DiT)."""

    def __init__(self, dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))
