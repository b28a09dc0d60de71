"""Linguistic token refiner and collaborative refiner: positional bias, zero gates, padding."""

import pytest
import torch
from torch import nn

from lidit.models import EncoderConfig, LiDiT, LinguisticTokenRefiner, LLMPromptEncoder, lidit_config


def randomise_gates(module: nn.Module) -> nn.Module:
    """A trained refiner has open gates (LiDiT starts them at zero, adaLN-Zero)."""
    torch.manual_seed(1)
    for block in module.blocks:
        gate = block.gate if isinstance(module, LinguisticTokenRefiner) else block.modulation
        nn.init.normal_(gate.weight, std=0.5)
    return module


@pytest.fixture(scope="module")
def llama(tiny_llms):
    return LLMPromptEncoder(EncoderConfig(tiny_llms["tiny-llama"]))


def test_refiner_removes_positional_bias_unless_causal(llama):
    """Sec. 3.1/3.2: the raw causal LLM's first caption token ignores the last word; after the
    bidirectional refiner it does not; with the refiner's causal option it still does."""
    a = llama.encode(["a red square to the left of a blue circle"])
    b = llama.encode(["a red square to the left of a blue star"])
    first = a.caption_start
    assert torch.equal(a.states[0, first], b.states[0, first])
    t_emb = torch.zeros(1, 32)
    for causal, changes in [(False, True), (True, False)]:
        torch.manual_seed(0)
        refiner = randomise_gates(LinguisticTokenRefiner(llama.hidden_size, 32, 4, causal=causal, gelu="none"))
        out_a, _ = refiner(a.states, a.mask, t_emb)
        out_b, _ = refiner(b.states, b.mask, t_emb)
        assert (not torch.allclose(out_a[0, first], out_b[0, first], atol=1e-6)) == changes


def test_fresh_refiner_is_its_input_projection():
    """LiDiT initialises its refiners' gates to zero: each block starts as the identity."""
    torch.manual_seed(0)
    refiner = LiDiT(lidit_config("tiny", encoder_dims=[48])).token_refiners[0]
    assert len(refiner.blocks) == 2
    states, mask = torch.randn(2, 7, 48), torch.ones(2, 7, dtype=torch.bool)
    out, c = refiner(states, mask, torch.randn(2, 64))
    torch.testing.assert_close(out, refiner.input_proj(refiner.input_norm(states)))
    assert c.shape == (2, 64)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_never_changes_refined_tokens(causal):
    torch.manual_seed(0)
    refiner = randomise_gates(LinguisticTokenRefiner(48, 32, 4, causal=causal, gelu="none"))
    states = torch.randn(1, 5, 48)
    padded = torch.cat([states, torch.randn(1, 4, 48)], 1)  # garbage in the padding
    mask = torch.tensor([[True] * 5 + [False] * 4])
    t_emb = torch.randn(1, 32)
    out, c = refiner(states, torch.ones(1, 5, dtype=torch.bool), t_emb)
    out_padded, c_padded = refiner(padded, mask, t_emb)
    torch.testing.assert_close(out_padded[:, :5], out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_padded, c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("branches", [1, 2, 3])
def test_collaborative_refiner_drops_instructions_and_concatenates(branches):
    torch.manual_seed(0)
    fuse = LiDiT(lidit_config("tiny", encoder_dims=[16] * branches)).collaborative_refiner
    lengths, starts = [6, 9, 4][:branches], [2, 3, 0][:branches]
    tokens = [torch.randn(2, n, 64) for n in lengths]
    masks = [torch.ones(2, n, dtype=torch.bool) for n in lengths]
    conds = [torch.randn(2, 64) for _ in lengths]
    text, mask = fuse(tokens, masks, conds, starts)
    assert text.shape == (2, sum(lengths) - sum(starts), 64) and mask.all()
    # LiDiT zero-initialises the modulation: a fresh collaborative refiner passes the caption tokens through
    torch.testing.assert_close(text, torch.cat([x[:, s:] for x, s in zip(tokens, starts)], 1))
    assert (fuse.blocks[0].attn is not None) == (branches > 1)
    randomise_gates(fuse)
    text, _ = fuse(tokens, masks, conds, starts)
    if branches > 1:  # each branch now reads the others
        other = [x.clone() for x in tokens]
        other[1] = torch.randn_like(other[1])
        changed, _ = fuse(other, masks, conds, starts)
        assert not torch.allclose(changed[:, : lengths[0] - starts[0]], text[:, : lengths[0] - starts[0]])
