"""The shortcuts of the model's layers give what the general paths give (float tolerance)."""

import pytest
import torch

from lidit.models import CollaborativeRefiner, LiDiT, lidit_config
from lidit.models.layers import MLP, Attention, attention_mask


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


def test_meta_device_mask_is_always_built():
    """On the meta device (FLOP counting) values are unknown: the mask is built, never skipped."""
    keys = torch.ones(2, 9, dtype=torch.bool, device="meta")
    assert attention_mask(keys).shape == (2, 1, 1, 9)
    assert attention_mask(keys, causal=True).shape == (2, 1, 9, 9)


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
    fuse = CollaborativeRefiner(32, 4, 3, gelu="none")
    for block in fuse.blocks:  # trained-like modulation (LiDiT starts it at zero)
        torch.nn.init.normal_(block.modulation.weight, std=0.5)
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


def test_lidit_config_sets_every_mlp_gelu():
    """Presets take the exact GELU; a config without the field (saved before it existed) keeps tanh."""
    from lidit.models.presets import LiDiTConfig

    def approximations(model: LiDiT) -> set[str]:
        mlps = [m for m in model.modules() if isinstance(m, MLP)]
        assert len(mlps) == 2 * 2 + 2 + 2  # two refiners of depth 2, two collaborative branches, two blocks
        return {m.act.approximate for m in mlps}

    config = lidit_config("tiny")
    assert config.gelu == "none"
    assert approximations(LiDiT(config)) == {"none"}
    old = {k: v for k, v in config.to_dict().items() if k != "gelu"}
    assert approximations(LiDiT(LiDiTConfig.from_dict(old))) == {"tanh"}
    with pytest.raises(ValueError, match="LiDiTConfig.gelu"):
        lidit_config("tiny", gelu="relu")
