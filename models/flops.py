"""FLOP counting with `torch.utils.flop_counter`, CPU attention and oneDNN linear kernels included (same rules for
every model measured: matmuls, convolutions and attention, forward and backward)."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils import flop_counter



def _sdpa(query, key, value, *args, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)


def _sdpa_backward(grad_out, query, key, value, *args, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


def _onednn_linear(x, weight, *args, **kwargs) -> int:
    """`lidit.models.layers.linear`'s CPU float32 GEMM: x [..., in] @ weight[out, in].T."""
    return 2 * x.numel() * weight.shape[0]


_sdpa._get_raw = _sdpa_backward._get_raw = _onednn_linear._get_raw = True  # formulas take the tensors
_CPU_KERNELS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
}
if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    _CPU_KERNELS[torch.ops.mkldnn._linear_pointwise] = _onednn_linear


def count_flops(fn: Callable[[], object]) -> int:
    """Run `fn` once under a FLOP counter and return the total."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_KERNELS) as counter:
        fn()
    return counter.get_total_flops()
