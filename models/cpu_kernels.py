"""CPU float32 kernels for a built model, applied from outside as parallelisms are (torchtitan style).

`apply_cpu_kernels(model)` turns every `nn.Linear` into a `OneDNNLinear` and every `MLP` into a
`OneDNNMLP`, in place (the same modules, parameters and state-dict keys; like
`torch.nn.utils.parametrize`, only the class changes). They compute eager CPU float32 GEMMs with
oneDNN's JIT GEMM instead of the BLAS sgemm `F.linear` calls, which takes its AVX2 path on AMD CPUs
even where they have AVX-512, and without autograd run the MLP's GELU as a post-op of that GEMM, since
PyTorch's CPU tanh is not vectorised. Where they pay and where not (CPUs without AVX-512): docs/models.md
("CPU kernels"). Everything else (autocast, other dtypes and devices, torch.compile, small GEMMs) takes
`F.linear`, the same arithmetic either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lidit.models.layers import MLP

_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
_MIN_MACS = 1 << 18  # below this a GEMM is too small for the switch to pay


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where oneDNN computes x @ weight.T: eager CPU float32, no autocast, a GEMM big enough."""
    return (
        _ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
        and x.numel() * weight.shape[0] >= _MIN_MACS
        and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
    )


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias for strided CPU float32 tensors (no copies for transposed views)."""
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _matmul(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _matmul(grad, weight.t())
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            # oneDNN copies a transposed first operand: transpose the cheaper side
            inputs = x.reshape(-1, x.shape[-1])
            (count, features), outputs = inputs.shape, rows.shape[1]
            if count * outputs <= count * features + features * outputs:
                grad_weight = _matmul(rows.t(), inputs.t())
            else:
                grad_weight = _matmul(inputs.t(), rows.t()).t().contiguous()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, computed by oneDNN where `use_onednn` says so."""
    if not use_onednn(x, weight):
        return F.linear(x, weight, bias)
    if _needs_grad(x, weight, bias):
        return _LinearFunction.apply(x, weight, bias)
    return _matmul(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """`nn.Linear` computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class OneDNNMLP(MLP):
    """`MLP` whose GELU is fused into fc1's oneDNN GEMM when nothing needs gradients.

    Training keeps the separate GELU: a fused forward needs the pre-activation again for the
    backward (one more GEMM), which measured slower (docs/models.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.fc1.weight, self.fc1.bias
        if use_onednn(x, weight) and not _needs_grad(x, weight, bias):
            return self.fc2(_ONEDNN_LINEAR(x, weight, bias, "gelu", [], self.act.approximate))
        return super().forward(x)


def kernels_pay() -> bool:
    """Whether oneDNN's GEMM beats the BLAS float32 GEMM here: on AVX-512 CPUs; without AVX-512 it was
    slower for training (docs/models.md, "CPU kernels")."""
    return _ONEDNN_LINEAR is not None and torch.backends.cpu.get_cpu_capability() == "AVX512"


def apply_cpu_kernels(model: nn.Module, force: bool = False) -> nn.Module:
    """Switch `model`'s linears and MLPs to the oneDNN kernels above, in place, where they pay
    (`kernels_pay`, or `force` wherever PyTorch has oneDNN); returns `model`. Idempotent; subclasses of
    `nn.Linear` other than these are left alone."""
    if _ONEDNN_LINEAR is None or not (force or kernels_pay()):
        return model
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
        elif type(module) is MLP:
            module.__class__ = OneDNNMLP
    return model
