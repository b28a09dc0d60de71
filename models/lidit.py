"""The LI-DiT denoiser (Sec. 3.4): token refiners + collaborative refiner + DiT backbone.

Backbone block: self-attention over image tokens -> cross-attention to the fused text -> FFN, each
with adaLN-Zero modulation from timestep + pooled text, QK RMSNorm. No sin-cos or RoPE: a
convolutional ResBlock right after patchify gives positions, so any H, W (multiples of the patch
size) work. Predicts epsilon.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lidit.models.encoders import PromptFeatures
from lidit.models.layers import MLP, Attention, Linear, TimestepEmbedder, attention_mask, init_weights, masked_mean, modulate, zero_init
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

    def __init__(self, width: int, heads: int, text_dim: int, mlp_ratio: float, qk_norm: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(width, heads, context_dim=text_dim, qk_norm=qk_norm)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, mlp_ratio)
        self.adaLN_modulation = zero_init(Linear(width, 9 * width))

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
        self.adaLN_modulation = zero_init(Linear(width, 2 * width))
        self.linear = zero_init(Linear(width, patch_size * patch_size * channels))

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
            LinguisticTokenRefiner(dim, cfg.text_dim, cfg.text_heads, depth, cfg.mlp_ratio, cfg.refiner_causal, cfg.qk_norm)
            for dim in cfg.encoder_dims
        ])
        self.collaborative_refiner = (
            CollaborativeRefiner(cfg.text_dim, cfg.text_heads, len(cfg.encoder_dims), cfg.mlp_ratio, cfg.qk_norm)
            if cfg.use_collaborative else None
        )
        self.text_pool = (
            nn.Sequential(Linear(cfg.text_dim, cfg.width), nn.SiLU(), Linear(cfg.width, cfg.width))
            if cfg.pooled_text == "refined" else None
        )
        # Learned null caption per encoder (one token in LLM-feature space) for CFG and text dropout.
        self.null_text = nn.ParameterList([nn.Parameter(torch.randn(dim)) for dim in cfg.encoder_dims])
        self.blocks = nn.ModuleList(
            [LiDiTBlock(cfg.width, cfg.heads, cfg.text_dim, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth)]
        )
        self.final_layer = FinalLayer(cfg.width, cfg.patch_size, cfg.in_channels)
        for module in self.modules():  # refiners' and blocks' MLPs alike
            if isinstance(module, MLP):
                module.approximate = cfg.gelu
        init_weights(self)
        nn.init.xavier_uniform_(self.x_embedder.weight.view(cfg.width, -1))
        nn.init.zeros_(self.x_embedder.bias)

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

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: list[PromptFeatures]) -> torch.Tensor:
        """Noisy latents [B, C, H, W], timesteps [B], per-encoder text -> predicted noise [B, C, H, W]."""
        batch, _, height, width = x.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"x: height/width {height}x{width} are not multiples of patch_size {p}")
        # contiguous tokens: a transposed view would make every LayerNorm of every block copy its input
        x = self.pos_block(self.x_embedder(x)).flatten(2).transpose(1, 2).contiguous()
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

    def drop_text(self, text: list[PromptFeatures], drop: torch.Tensor) -> list[PromptFeatures]:
        """Replace the caption of rows where `drop` is true by the learned null caption; the
        instruction prefix stays (it does not depend on the caption)."""
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

    def null_prompts(self, text: list[PromptFeatures]) -> list[PromptFeatures]:
        """The unconditional text for classifier-free guidance, shaped like `text`."""
        drop = torch.ones(text[0].states.shape[0], dtype=torch.bool, device=text[0].states.device)
        return self.drop_text(text, drop)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(
        self, height: int, width: int, text_len: int | list[int], instruction_len: int | list[int] = 0
    ) -> int:
        """Forward matmul/conv/attention FLOPs for one image (x3 for forward + backward).

        `text_len`: tokens per encoder (instruction included); `instruction_len`: the tokens of
        each dropped at fusion. Counts what `torch.utils.flop_counter` counts."""
        cfg = self.config
        n_enc = len(cfg.encoder_dims)
        lens = [text_len] * n_enc if isinstance(text_len, int) else list(text_len)
        starts = [instruction_len] * n_enc if isinstance(instruction_len, int) else list(instruction_len)
        w, td, p, ch = cfg.width, cfg.text_dim, cfg.patch_size, cfg.in_channels
        hidden, text_hidden = int(w * cfg.mlp_ratio), int(td * cfg.mlp_ratio)
        n = (height // p) * (width // p)
        m = sum(s - st for s, st in zip(lens, starts))
        flops = 2 * n * w * ch * p * p + 2 * 2 * n * w * w * 9  # patchify + position ResBlock
        flops += 2 * (256 * w + w * w) + 2 * (256 * td + td * td)  # timestep embedders
        depth = cfg.refiner_depth if cfg.use_refiner else 0
        for dim, s in zip(cfg.encoder_dims, lens):
            flops += 2 * (dim * td + td * td) + 2 * s * dim * td
            flops += depth * (2 * td * 2 * td + 8 * s * td * td + 4 * s * s * td + 4 * s * td * text_hidden)
        if cfg.use_collaborative:  # caption tokens are the queries; every token of the others is a key
            for s, st in zip(lens, starts):
                others, queries = sum(lens) - s, s - st
                cross = n_enc > 1
                flops += 2 * td * (6 if cross else 3) * td + 4 * queries * td * text_hidden
                if cross:
                    flops += 4 * queries * td * td + 4 * others * td * td + 4 * queries * others * td
        if cfg.pooled_text == "refined":
            flops += 2 * (td * w + w * w)
        block = 2 * w * 9 * w + 8 * n * w * w + 4 * n * n * w  # adaLN + self-attention
        block += 4 * n * w * w + 4 * m * td * w + 4 * n * m * w  # cross-attention
        block += 4 * n * w * hidden  # FFN
        flops += cfg.depth * block + 2 * w * 2 * w + 2 * n * w * p * p * ch
        return int(flops)
