"""`apply_cpu_kernels`: oneDNN GEMMs (and the fused GELU) give what the plain layers give, on the same
parameters, and step aside wherever they do not apply."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lidit.models import LiDiT, PromptFeatures, apply_cpu_kernels, lidit_config
from lidit.models import cpu_kernels
from lidit.models.cpu_kernels import OneDNNLinear, OneDNNMLP, use_onednn
from lidit.models.layers import MLP

needs_onednn = pytest.mark.skipif(cpu_kernels._ONEDNN_LINEAR is None, reason="PyTorch built without oneDNN")


class OneDNNCalls(TorchDispatchMode):
    """Records the post-op ("none", "gelu") of every oneDNN linear call."""

    def __init__(self) -> None:
        super().__init__()
        self.post_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket is torch.ops.mkldnn._linear_pointwise:
            self.post_ops.append(args[3])
        return func(*args, **(kwargs or {}))


@needs_onednn
@pytest.mark.parametrize("features, outputs", [(48, 160), (160, 48)])  # both weight-gradient layouts
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_f_linear_forward_and_backward(features, outputs, bias):
    torch.manual_seed(0)
    linear = nn.Linear(features, outputs, bias=bias)
    plain = nn.Linear(features, outputs, bias=bias)
    plain.load_state_dict(linear.state_dict())
    assert apply_cpu_kernels(linear, force=True) is linear and type(linear) is OneDNNLinear
    x = torch.randn(3, features, 70).transpose(1, 2)  # a strided input, [3, 70, features]
    assert use_onednn(x, linear.weight)
    grad = torch.randn(3, 70, outputs)
    results = []
    for layer in (linear, plain):
        inputs = x.detach().requires_grad_()
        with OneDNNCalls() as calls:
            out = layer(inputs)
            out.backward(grad)
        assert len(calls.post_ops) == (3 if layer is linear else 0)  # forward, input and weight gradients
        results.append([out, inputs.grad, layer.weight.grad] + ([layer.bias.grad] if bias else []))
    for fast, general in zip(*results):
        torch.testing.assert_close(fast, general, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), plain(x), atol=1e-4, rtol=1e-4)


def test_f_linear_where_onednn_does_not_apply():
    linear = apply_cpu_kernels(nn.Linear(8, 8), force=True)
    assert not use_onednn(torch.randn(2, 8), linear.weight)  # too small to pay
    big = torch.randn(64, 64, 8)
    assert not use_onednn(big.bfloat16(), linear.weight.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16), OneDNNCalls() as calls:
        assert not use_onednn(big, linear.weight)
        assert linear(big).dtype == torch.bfloat16  # autocast still applies
    assert not calls.post_ops


@needs_onednn
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_fused_gelu_mlp_equals_the_plain_mlp(approximate):
    """Without autograd the MLP's GELU is a post-op of fc1's oneDNN GEMM; with it, the separate GELU:
    both give the plain MLP's output (tanh or exact erf GELU)."""
    torch.manual_seed(0)
    x = torch.randn(4, 300, 64) * 3
    plain = MLP(64, 4.0, approximate)
    fast = MLP(64, 4.0, approximate)
    fast.load_state_dict(plain.state_dict())
    apply_cpu_kernels(fast, force=True)
    assert type(fast) is OneDNNMLP and type(fast.fc1) is OneDNNLinear
    with torch.no_grad():
        reference = plain(x)
        with OneDNNCalls() as calls:
            inference = fast(x)
    assert calls.post_ops == ["gelu", "none"]
    torch.testing.assert_close(inference, reference, rtol=1e-5, atol=1e-5)
    other = MLP(64, 4.0, "none" if approximate == "tanh" else "tanh")
    other.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert not torch.allclose(inference, other(x), rtol=1e-5, atol=1e-5)  # the post-op follows `approximate`
    with OneDNNCalls() as calls:
        training = fast(x)
    assert training.requires_grad and calls.post_ops == ["none", "none"]
    torch.testing.assert_close(training.detach(), reference, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_lidit_keeps_its_parameters_and_outputs():
    """Same parameter objects and state-dict keys, idempotent, and the plain model's prediction and gradients."""
    torch.manual_seed(0)
    config = lidit_config("tiny", width=128, text_dim=128)  # GEMMs big enough for oneDNN
    plain = LiDiT(config)
    for layer in plain.adaln_zero_layers():
        nn.init.normal_(layer.weight, std=0.05)
    fast = LiDiT(config)
    fast.load_state_dict(plain.state_dict())
    params = dict(fast.named_parameters())
    assert apply_cpu_kernels(apply_cpu_kernels(fast, force=True), force=True) is fast
    assert dict(fast.named_parameters()) == params and fast.state_dict().keys() == plain.state_dict().keys()
    assert all(type(m) is not nn.Linear for m in fast.modules()) and any(type(m) is OneDNNMLP for m in fast.modules())
    x, t = torch.randn(8, 3, 16, 16), torch.tensor([1, 100, 200, 300, 400, 500, 600, 999])
    text = [PromptFeatures(torch.randn(8, 12, d), torch.ones(8, 12, dtype=torch.bool), 4) for d in (64, 96)]
    drop = torch.tensor([True, False] * 4)
    outputs = []
    for model in (fast, plain):
        with OneDNNCalls() as calls:
            out = model(x, t, text, drop_caption=drop)
            out.square().mean().backward()
        assert bool(calls.post_ops) == (model is fast)
        outputs.append([out] + [p.grad for p in model.parameters()])
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    with torch.no_grad(), OneDNNCalls() as calls:
        torch.testing.assert_close(fast(x, t, text), plain(x, t, text), atol=1e-4, rtol=1e-3)
    assert "gelu" in calls.post_ops


def test_no_op_without_onednn(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_ONEDNN_LINEAR", None)
    model = LiDiT(lidit_config("tiny"))
    assert apply_cpu_kernels(model, force=True) is model
    assert {type(m) for m in model.modules()}.isdisjoint({OneDNNLinear, OneDNNMLP})


@pytest.mark.parametrize("capability, switched", [("AVX512", True), ("AVX2", False)])
def test_applied_only_where_they_pay_unless_forced(monkeypatch, capability, switched):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    model = apply_cpu_kernels(LiDiT(lidit_config("tiny")))
    assert (OneDNNLinear in {type(m) for m in model.modules()}) is switched
    assert OneDNNLinear in {type(m) for m in apply_cpu_kernels(model, force=True).modules()}
