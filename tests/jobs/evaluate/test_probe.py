"""Positional-bias probe: a causal LLM's earlier tokens ignore later words; the bidirectional refiner does not."""

import pytest
import torch

from lidit.jobs.evaluate.probe import caption_pairs, format_rows, positional_bias
from lidit.models import EncoderConfig, LiDiT, LLMPromptEncoder, lidit_config


@pytest.fixture(scope="module")
def encoders(tiny_llms):
    return {"tiny_llama": LLMPromptEncoder(EncoderConfig(tiny_llms["tiny-llama"], use_chat_template=False)),
            "tiny_qwen2": LLMPromptEncoder(EncoderConfig(tiny_llms["tiny-qwen2"]))}


def test_caption_pairs_differ_only_in_the_last_word():
    for a, b in caption_pairs(20, seed=3):
        assert a.split()[:-1] == b.split()[:-1] and a.split()[-1] != b.split()[-1]


def test_raw_llm_features_do_not_see_later_words(encoders):
    rows = positional_bias(encoders, pairs=caption_pairs(6))
    assert [r["encoder"] for r in rows] == ["tiny_llama", "tiny_qwen2"]
    for row in rows:
        assert row["raw"] == 0.0 and row["tokens"] >= 5  # "a red circle to the left of a blue" at least
        assert "refined" not in row


def test_refiners_with_open_gates_mix_in_later_words(encoders):
    torch.manual_seed(0)
    model = LiDiT(lidit_config("tiny", encoder_dims=[64, 96])).eval()
    closed = positional_bias(encoders, model, caption_pairs(6))
    assert all(r["refined"] == pytest.approx(0, abs=1e-6) for r in closed)  # zero-init gates: per-token only
    for p in model.parameters():  # as after training: gates away from zero
        p.data.add_(0.05 * torch.randn_like(p))
    rows = positional_bias(encoders, model, caption_pairs(6))
    for row in rows:
        assert row["raw"] == 0.0 and row["refined"] > 1e-3 and row["fused"] > 1e-3
    table = format_rows(rows)
    assert "refined" in table and "tiny_qwen2" in table
