"""Building blocks shared by the refiners and the LI-DiT backbone (DiT style, fused projections)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# CPU float32 linears go through oneDNN's JIT GEMM (the kernel PyTorch already uses for bfloat16
# matmuls and for convolutions) rather than the BLAS sgemm that `F.linear` calls: on AMD EPYC,
# MKL's sgemm runs its AVX2 code path, and oneDNN's AVX-512 GEMM was 2.3x faster here (250 vs
# 110 GFLOP/s per core, `lidit bench model`, docs/models.md). Same float32 arithmetic.
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
_ONEDNN_MIN_MACS = 1 << 18  # below this a GEMM is too small for the switch to pay


def _onednn_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias for strided CPU float32 tensors (no copies for transposed views)."""
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_matmul(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        return _linear_grads(ctx, x, weight, grad)


def _linear_grads(ctx, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor):
    """Input, weight and bias gradients of x @ weight.T + bias for the output gradient `grad`."""
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _onednn_matmul(grad, weight.t())
    rows = grad.reshape(-1, grad.shape[-1])
    if ctx.needs_input_grad[1]:
        # oneDNN copies a transposed first operand: transpose the cheaper side
        inputs = x.reshape(-1, x.shape[-1])
        (count, features), outputs = inputs.shape, rows.shape[1]
        if count * outputs <= count * features + features * outputs:
            grad_weight = _onednn_matmul(rows.t(), inputs.t())
        else:
            grad_weight = _onednn_matmul(inputs.t(), rows.t()).t().contiguous()
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = rows.sum(0)
    return grad_x, grad_weight, grad_bias


def use_onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where `linear` takes the oneDNN path: eager CPU float32, no autocast, a GEMM big enough."""
    return (
        _ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
        and x.numel() * weight.shape[0] >= _ONEDNN_MIN_MACS
        and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, computed by oneDNN on CPU float32 (see above)."""
    if not use_onednn_linear(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn_matmul(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state-dict keys) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


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
            self.q = Linear(dim, dim)
            self.kv = Linear(context_dim, 2 * dim)
        else:
            self.qkv = Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = Linear(dim, dim)

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
    mask, or [B, 1, M, M] with `causal` (queries = keys)."""
    if mask is None or bool(mask.all()):
        return None
    # a row with no valid key would give NaN: let it see everything (its output is unused)
    mask = (mask | ~mask.any(-1, keepdim=True))[:, None, None, :]
    if causal:
        mask = mask & torch.ones(mask.shape[-1], mask.shape[-1], dtype=torch.bool, device=mask.device).tril()
    return mask


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                approximate: str = "tanh") -> torch.Tensor:
    """`F.gelu(linear(x, weight, bias), approximate=approximate)`; without autograd on CPU float32 the
    GELU is fused into oneDNN's GEMM as a post-op.

    PyTorch's CPU tanh (so the tanh GELU) is not vectorised in this build: 3.9 ms for a [8192, 256]
    GELU against 1.1 ms for the GEMM before it, single thread; fused, both take 1.6 ms, and the tiny
    LiDiT's batch-32 forward goes from 119 to 74 ms (sampling, evaluation, serving). Training keeps the
    separate GELU: a fused forward needs the pre-activation again for the backward, which cost more
    than it saved here."""
    if use_onednn_linear(x, weight) and not (torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))):
        return _ONEDNN_LINEAR(x, weight, bias, "gelu", [], approximate)
    return F.gelu(linear(x, weight, bias), approximate=approximate)


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, approximate: str = "tanh") -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)
        self.approximate = approximate  # F.gelu's: "tanh" or "none" (erf); LiDiT sets it from its config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(linear_gelu(x, self.fc1.weight, self.fc1.bias, self.approximate))


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features -> MLP (DiT)."""

    def __init__(self, dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(Linear(frequency_dim, dim), nn.SiLU(), Linear(dim, dim))

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
