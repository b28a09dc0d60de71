"""FLOP counting with `torch.utils.flop_counter` (matmuls, convolutions and attention, forward and
backward; the same rules for every model measured).

PyTorch's counter has no formula for the CPU flash-attention kernels that SDPA takes on the CPU:
they are registered here, with the formulas of the CUDA ones."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils import flop_counter

from lidit.models.encoders import PromptFeatures
from lidit.models.lidit import LiDiT
from lidit.models.presets import LiDiTConfig


def _sdpa(query, key, value, *args, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)


def _sdpa_backward(grad_out, query, key, value, *args, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_sdpa._get_raw = _sdpa_backward._get_raw = True  # the formulas take the tensors, not their shapes
_CPU_KERNELS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
}


def count_flops(fn: Callable[[], object]) -> int:
    """Run `fn` once under a FLOP counter and return the total."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_KERNELS) as counter:
        fn()
    return counter.get_total_flops()


def flops_per_image(
    config: LiDiTConfig, height: int, width: int, text_len: int | list[int], instruction_len: int | list[int] = 0,
) -> int:
    """Forward FLOPs of one image (x3 for forward + backward), counted on a model on the meta device.

    `height`, `width`: the model's input (latent) size; `text_len`: tokens per encoder, instruction
    included; `instruction_len`: the tokens of each that are dropped at fusion."""
    encoders = len(config.encoder_dims)
    lengths = [text_len] * encoders if isinstance(text_len, int) else list(text_len)
    starts = [instruction_len] * encoders if isinstance(instruction_len, int) else list(instruction_len)
    with torch.device("meta"):
        model = LiDiT(config)
        x = torch.empty(1, config.in_channels, height, width)
        t = torch.zeros(1, dtype=torch.long)
        text = [PromptFeatures(torch.empty(1, length, dim), torch.ones(1, length, dtype=torch.bool), start)
                for dim, length, start in zip(config.encoder_dims, lengths, starts)]
        return count_flops(lambda: model(x, t, text))
