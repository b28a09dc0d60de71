"""The LI-DiT denoiser (Sec. 3.4): token refiners + collaborative refiner + DiT backbone.

Backbone block: self-attention over image tokens -> cross-attention to the fused text -> FFN, each
with adaLN-Zero modulation from timestep + pooled text, QK RMSNorm. No sin-cos or RoPE: a
convolutional ResBlock right after patchify gives positions, so any H, W (multiples of the patch
size) work. Predicts epsilon.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lidit.models.encoders import PromptFeatures
from lidit.models.layers import MLP, Attention, TimestepEmbedder, attention_mask, masked_mean, modulate
from lidit.models.presets import LiDiTConfig
from lidit.models.refiners import CollaborativeRefiner, LinguisticTokenRefiner, concat_captions


class ConvPositionBlock(nn.Module):
    """Convolutional ResBlock on the patch grid: zero-padded 3x3 convs encode position."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        groups = math.gcd(32, dim)
        self.norm1 = nn.GroupNorm(groups, dim, eps=1e-6)
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, dim, eps=1e-6)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


class LiDiTBlock(nn.Module):
    """Self-attention -> cross-attention to text -> FFN, each with adaLN-Zero (shift, scale, gate)."""

    def __init__(
        self, width: int, heads: int, text_dim: int, mlp_ratio: float, gelu: str, qk_norm: bool = True
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(width, heads, context_dim=text_dim, qk_norm=qk_norm)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, mlp_ratio, gelu)
        self.adaLN_modulation = nn.Linear(width, 9 * width)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x [B, N, width]; c = SiLU(conditioning) [B, width]; text [B, M, text_dim] with its
        mask from `attention_mask` (None: every token valid)."""
        shift1, scale1, gate1, shift2, scale2, gate2, shift3, scale3, gate3 = self.adaLN_modulation(c).chunk(9, -1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.cross_attn(modulate(self.norm2(x), shift2, scale2), text, text_mask)
        return x + gate3.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift3, scale3))


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch_size: int, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, patch_size * patch_size * channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class LiDiT(nn.Module):
    """The whole trainable model; the frozen LLMs stay outside (their features come in as `text`)."""

    def __init__(self, config: LiDiTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.x_embedder = nn.Conv2d(cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.pos_block = ConvPositionBlock(cfg.width)
        self.t_embedder = TimestepEmbedder(cfg.width)
        self.text_t_embedder = TimestepEmbedder(cfg.text_dim)
        depth = cfg.refiner_depth if cfg.use_refiner else 0
        self.token_refiners = nn.ModuleList([
            LinguisticTokenRefiner(dim, cfg.text_dim, cfg.text_heads, depth, cfg.mlp_ratio, cfg.refiner_causal,
                                   cfg.qk_norm, gelu=cfg.gelu)
            for dim in cfg.encoder_dims
        ])
        self.collaborative_refiner = (
            CollaborativeRefiner(cfg.text_dim, cfg.text_heads, len(cfg.encoder_dims), cfg.mlp_ratio, cfg.qk_norm,
                                 gelu=cfg.gelu)
            if cfg.use_collaborative else None
        )
        self.text_pool = (
            nn.Sequential(nn.Linear(cfg.text_dim, cfg.width), nn.SiLU(), nn.Linear(cfg.width, cfg.width))
            if cfg.pooled_text == "refined" else None
        )
        # Learned null caption per encoder (one token in LLM-feature space) for CFG and text dropout.
        self.null_text = nn.ParameterList([nn.Parameter(torch.empty(dim)) for dim in cfg.encoder_dims])
        self.blocks = nn.ModuleList(
            [LiDiTBlock(cfg.width, cfg.heads, cfg.text_dim, cfg.mlp_ratio, cfg.gelu, cfg.qk_norm)
             for _ in range(cfg.depth)]
        )
        self.final_layer = FinalLayer(cfg.width, cfg.patch_size, cfg.in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT initialisation: Xavier-uniform linears (and patch embedding) with zero bias, a unit-normal
        null caption, and adaLN-Zero: every gate, modulation and the output layer start at zero, so a
        fresh model is the identity in each residual branch and predicts zero noise."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.config.width, -1))
        nn.init.zeros_(self.x_embedder.bias)
        for null in self.null_text:
            nn.init.normal_(null)
        for layer in self.adaln_zero_layers():
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def adaln_zero_layers(self) -> Iterator[nn.Linear]:
        """The layers adaLN-Zero starts at zero: refiner gates, modulations, the output layer."""
        for refiner in self.token_refiners:
            yield from (block.gate for block in refiner.blocks)
        if self.collaborative_refiner is not None:
            yield from (block.modulation for block in self.collaborative_refiner.blocks)
        yield from (block.adaLN_modulation for block in self.blocks)
        yield from (self.final_layer.adaLN_modulation, self.final_layer.linear)

    def encode_text(
        self, text: list[PromptFeatures], t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Refine each LLM's features, fuse the streams: fused caption tokens [B, M, text_dim], mask."""
        if len(text) != len(self.token_refiners):
            raise ValueError(f"text: expected features of {len(self.token_refiners)} encoder(s), got {len(text)}")
        text_t = self.text_t_embedder(t)
        tokens, masks, conds = [], [], []
        for i, (refiner, features) in enumerate(zip(self.token_refiners, text)):
            if features.states.shape[-1] != self.config.encoder_dims[i]:
                raise ValueError(f"text[{i}]: width {features.states.shape[-1]} != encoder_dims[{i}]")
            refined, c = refiner(features.states, features.mask, text_t)
            tokens.append(refined)
            masks.append(features.mask.bool())
            conds.append(c)
        starts = [features.caption_start for features in text]
        if self.collaborative_refiner is not None:
            return self.collaborative_refiner(tokens, masks, conds, starts)
        return concat_captions(tokens, masks, starts)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, text: list[PromptFeatures], drop_caption: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noisy latents [B, C, H, W], timesteps [B], per-encoder text -> predicted noise [B, C, H, W].

        `drop_caption` [B] bool: rows whose caption is replaced by the learned null caption (text dropout
        in training, the unconditional branch of CFG). Done here, not by the caller, so that DDP and FSDP
        see the null caption used inside `forward`."""
        batch, _, height, width = x.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"x: height/width {height}x{width} are not multiples of patch_size {p}")
        # contiguous tokens: a transposed view would make every LayerNorm of every block copy its input
        x = self.pos_block(self.x_embedder(x)).flatten(2).transpose(1, 2).contiguous()
        if drop_caption is not None:
            text = self._null_captions(text, drop_caption)
        text_tokens, text_mask = self.encode_text(text, t)
        c = self.t_embedder(t)
        if self.text_pool is not None:
            c = c + self.text_pool(masked_mean(text_tokens, text_mask))
        c = F.silu(c)
        text_attn_mask = attention_mask(text_mask)
        for block in self.blocks:
            x = block(x, c, text_tokens, text_attn_mask)
        x = self.final_layer(x, c)
        x = x.view(batch, height // p, width // p, p, p, self.config.in_channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, self.config.in_channels, height, width)

    def _null_captions(self, text: list[PromptFeatures], drop: torch.Tensor) -> list[PromptFeatures]:
        """`text` with the caption of rows where `drop` is true replaced by the learned null caption
        (one token, the rest masked); the instruction prefix stays (it does not depend on the caption)."""
        out = []
        for null, features in zip(self.null_text, text):
            states, mask, start = features.states.to(null.dtype), features.mask.bool(), features.caption_start
            if states.shape[1] == start:
                states, mask = F.pad(states, (0, 0, 0, 1)), F.pad(mask, (0, 1))
            batch, length = states.shape[0], states.shape[1] - start
            null_states = torch.cat([null.expand(batch, 1, -1), states.new_zeros(batch, length - 1, null.shape[0])], 1)
            null_mask = torch.arange(length, device=mask.device).expand(batch, -1) == 0
            caption = torch.where(drop.view(-1, 1, 1), null_states, states[:, start:])
            caption_mask = torch.where(drop.view(-1, 1), null_mask, mask[:, start:])
            out.append(PromptFeatures(
                torch.cat([states[:, :start], caption], 1), torch.cat([mask[:, :start], caption_mask], 1), start
            ))
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
