"""Building blocks shared by the refiners and the LI-DiT backbone (DiT style, fused projections)."""

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
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """x [B, N, dim]; context [B, M, context_dim] (cross) ; mask [B, M] bool over the keys."""
        batch, tokens, dim = x.shape
        if self.cross:
            q = self.q(x).view(batch, tokens, self.heads, self.head_dim)
            k, v = self.kv(context).view(batch, context.shape[1], 2, self.heads, self.head_dim).unbind(2)
        else:
            q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, self.head_dim).unbind(2)
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        attn_mask = None
        if mask is not None:
            # a row with no valid key would give NaN: let it see everything (its output is unused)
            mask = mask | ~mask.any(-1, keepdim=True)
            attn_mask = mask[:, None, None, :]
            if causal:
                attn_mask = attn_mask & torch.ones(tokens, tokens, dtype=torch.bool, device=x.device).tril()
            causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


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


def zero_init(linear: nn.Linear) -> nn.Linear:
    """Mark a gate/modulation/output layer to start at zero (adaLN-Zero); see `init_weights`."""
    linear.zero_init = True
    return linear


def init_weights(module: nn.Module) -> None:
    """DiT initialisation: Xavier-uniform linears with zero bias; marked layers all zero."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            if getattr(layer, "zero_init", False):
                nn.init.zeros_(layer.weight)
            else:
                nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
