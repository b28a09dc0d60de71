"""The fast paths of the model's layers give what the general paths give (float tolerance)."""

import pytest
import torch
import torch.nn.functional as F

from lidit.models import CollaborativeRefiner
from lidit.models import layers
from lidit.models.layers import MLP, Attention, Linear, attention_mask, linear_gelu

needs_onednn = pytest.mark.skipif(layers._ONEDNN_LINEAR is None, reason="PyTorch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("features, outputs", [(48, 160), (160, 48)])  # both weight-gradient layouts
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_f_linear_forward_and_backward(features, outputs, bias):
    torch.manual_seed(0)
    linear = Linear(features, outputs, bias=bias)
    x = torch.randn(3, features, 70).transpose(1, 2)  # a strided input, [3, 70, features]
    assert layers.use_onednn_linear(x, linear.weight)
    grad = torch.randn(3, 70, outputs)
    results = []
    for fast in (True, False):
        linear.zero_grad()
        inputs = x.detach().requires_grad_()
        out = linear(inputs) if fast else F.linear(inputs, linear.weight, linear.bias)
        out.backward(grad)
        results.append([out, inputs.grad, linear.weight.grad] + ([linear.bias.grad] if bias else []))
    for fast, general in zip(*results):
        torch.testing.assert_close(fast, general, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), F.linear(x, linear.weight, linear.bias), atol=1e-4, rtol=1e-4)


def test_linear_keeps_f_linear_where_onednn_does_not_apply():
    linear = Linear(8, 8)
    assert not layers.use_onednn_linear(torch.randn(2, 8), linear.weight)  # too small to pay
    big = torch.randn(64, 64, 8)
    assert not layers.use_onednn_linear(big.bfloat16(), linear.weight.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layers.use_onednn_linear(big, linear.weight)
        assert linear(big).dtype == torch.bfloat16  # autocast still applies


def test_all_true_mask_is_dropped_and_gives_the_masked_output():
    torch.manual_seed(0)
    keys = torch.ones(2, 9, dtype=torch.bool)
    assert attention_mask(keys) is None and attention_mask(None) is None
    general = keys[:, None, None, :]  # what an all-true mask gives SDPA
    x, context = torch.randn(2, 5, 32), torch.randn(2, 9, 24)
    cross = Attention(32, 4, context_dim=24)
    torch.testing.assert_close(cross(x, context, None), cross(x, context, general), atol=1e-5, rtol=1e-5)
    self_attn = Attention(32, 4)
    tokens = torch.randn(2, 9, 32)
    causal = general & torch.ones(9, 9, dtype=torch.bool).tril()
    torch.testing.assert_close(self_attn(tokens, attn_mask=attention_mask(keys, causal=True), causal=True),
                               self_attn(tokens, attn_mask=causal, causal=True), atol=1e-5, rtol=1e-5)


def test_padding_mask_matches_a_padded_free_run():
    torch.manual_seed(0)
    keys = torch.tensor([[True] * 6 + [False] * 3, [False] * 9])  # the second row has no valid key
    mask = attention_mask(keys)
    assert mask.shape == (2, 1, 1, 9) and mask[1].all()
    cross = Attention(32, 4, context_dim=24)
    x, context = torch.randn(2, 5, 32), torch.randn(2, 9, 24)
    torch.testing.assert_close(cross(x, context, mask)[:1], cross(x[:1], context[:1, :6], None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_collaborative_refiner_computes_only_caption_queries_exactly(padded):
    """Instruction tokens are keys only: computing every token and cutting afterwards is the same."""
    torch.manual_seed(0)
    fuse = CollaborativeRefiner(32, 4, 3)
    for layer in fuse.modules():
        if getattr(layer, "zero_init", False):
            torch.nn.init.normal_(layer.weight, std=0.5)
    lengths, starts = [6, 9, 4], [2, 3, 1]
    tokens = [torch.randn(2, n, 32) for n in lengths]
    masks = [torch.ones(2, n, dtype=torch.bool) for n in lengths]
    if padded:
        masks[1][0, 7:] = False
    conds = [torch.randn(2, 32) for _ in lengths]
    text, mask = fuse(tokens, masks, conds, starts)
    reference = []
    for i, block in enumerate(fuse.blocks):
        others = torch.cat([x for j, x in enumerate(tokens) if j != i], 1)
        others_mask = torch.cat([m for j, m in enumerate(masks) if j != i], 1)[:, None, None, :]
        reference.append(block(tokens[i], conds[i], others, others_mask)[:, starts[i]:])
    torch.testing.assert_close(text, torch.cat(reference, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mask, torch.cat([m[:, s:] for m, s in zip(masks, starts)], 1))


@needs_onednn
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_fused_linear_gelu_equals_the_unfused_mlp(approximate):
    """Without autograd the MLP's GELU is a oneDNN GEMM post-op; with it, the separate GELU: both give
    `F.gelu(F.linear(...), approximate=...)` (tanh or exact erf), and the MLP gives one output in either mode."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(4, 300, 64) * 3, torch.randn(256, 64), torch.randn(256)
    reference = F.gelu(F.linear(x, weight, bias), approximate=approximate)
    with torch.no_grad():
        fused = linear_gelu(x, weight, bias, approximate)
    assert torch.allclose(fused, reference, rtol=1e-5, atol=1e-5)
    other = F.gelu(F.linear(x, weight, bias), approximate="none" if approximate == "tanh" else "tanh")
    assert not torch.allclose(fused, other, rtol=1e-5, atol=1e-5)  # the post-op follows `approximate`
    mlp = MLP(64, 4.0, approximate)
    with torch.no_grad():
        inference = mlp(x)
    training = mlp(x)
    assert training.requires_grad
    assert torch.allclose(inference, training.detach(), rtol=1e-5, atol=1e-5)


def test_lidit_config_sets_every_mlp_gelu():
    """Presets take the exact GELU; a config without the field (saved before it existed) keeps tanh."""
    from lidit.models import LiDiT, lidit_config
    from lidit.models.presets import LiDiTConfig

    config = lidit_config("tiny")
    assert config.gelu == "none"
    assert {m.approximate for m in LiDiT(config).modules() if isinstance(m, MLP)} == {"none"}
    old = {k: v for k, v in config.to_dict().items() if k != "gelu"}
    assert {m.approximate for m in LiDiT(LiDiTConfig.from_dict(old)).modules() if isinstance(m, MLP)} == {"tanh"}
    with pytest.raises(ValueError, match="LiDiTConfig.gelu"):
        lidit_config("tiny", gelu="relu")
