"""The imported real LLMs as LI-DiT prompt encoders: the positional-bias probe and the prefix cache.

Sec. 3.1 of the paper: under the causal mask, a decoder-only LLM's features for a caption token never
depend on later words; the linguistic token refiner (bidirectional) removes that bias."""

import pytest
import torch

from lidit.models.encoders import EncoderConfig, LLMPromptEncoder
from lidit.models.refiners import LinguisticTokenRefiner

PRESET = {"smollm2": True, "gemma3": False}  # use_chat_template, as in the `real` preset
PAIR = ("a red cube on the left of a blue ball", "a red cube on the left of a blue dog")
CAPTIONS = ["a red circle to the left of a blue square", "two green triangles", "a photo of a cat on a table"]


@pytest.fixture(scope="module", params=list(PRESET))
def encoder(request, real_llms) -> LLMPromptEncoder:
    name = request.param
    return LLMPromptEncoder(EncoderConfig(real_llms[name], use_chat_template=PRESET[name], dtype="float32"))


def earlier_change(a: torch.Tensor, b: torch.Tensor, count: int) -> float:
    """Mean relative change of the first `count` token features between two encodings [L, D]."""
    return ((a[:count] - b[:count]).norm(dim=-1) / a[:count].norm(dim=-1)).mean().item()


def test_raw_probe_is_zero_and_refiner_is_not(encoder):
    """Change the last word: raw earlier-token features move by exactly 0, refined ones do not."""
    features = encoder.encode(list(PAIR))
    start = features.caption_start
    a, b = features.states[0], features.states[1]
    last = start + len(encoder.tokenizer(PAIR[0], add_special_tokens=False).input_ids) - 1
    assert torch.equal(a[:last], b[:last])  # prefix + earlier caption tokens: bitwise equal
    assert earlier_change(a[last:], b[last:], 1) > 0  # the changed word itself moves
    changes = {}
    for causal in (False, True):
        torch.manual_seed(0)
        refiner = LinguisticTokenRefiner(encoder.hidden_size, 64, heads=4, depth=2, causal=causal, gelu="none")
        for block in refiner.blocks:  # a trained refiner: gates open (they start at zero)
            torch.nn.init.normal_(block.gate.weight, std=0.1)
        with torch.no_grad():
            refined, _ = refiner(features.states, features.mask, torch.zeros(2, 64))
        changes[causal] = earlier_change(refined[0, start:last], refined[1, start:last], last - start)
    assert changes[False] > 1e-4  # bidirectional: earlier caption tokens now see the last word
    assert changes[True] < 1e-6  # the paper's causal-refiner ablation keeps the bias


def test_prefix_cached_features_equal_full_prompt(encoder):
    """Encoding the prefix once and reusing its KV cache gives the full prompt's features."""
    features = encoder.encode(CAPTIONS, batch_size=2)
    rows, _ = encoder.caption_ids(CAPTIONS)
    for index, row in enumerate(rows):
        ids = torch.tensor([encoder.prefix_ids + row])
        with torch.inference_mode():
            want = encoder.decoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        got = features.states[index][features.mask[index]]
        assert got.shape == want.shape
        assert ((got - want).norm() / want.norm()).item() < 1e-5  # seen: ~4e-7 (float32)
