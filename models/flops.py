"""FLOP counting with `torch.utils.flop_counter`, CPU attention kernels included (same rules for
every model measured: matmuls, convolutions and attention, forward and backward)."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils import flop_counter



def _sdpa(query, key, value, *args, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)


def _sdpa_backward(grad_out, query, key, value, *args, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_sdpa._get_raw = _sdpa_backward._get_raw = True  # formulas take the tensors themselves
_CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
}


def count_flops(fn: Callable[[], object]) -> int:
    """Run `fn` once under a FLOP counter and return the total."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        fn()
    return counter.get_total_flops()
