"""LLMPromptEncoder on the tiny Llama/Qwen2 models: exact prefix caching, padding, truncation,
fingerprints. Uses the session fixture `tiny_llms` (name -> local HF folder)."""

import shutil
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from lidit.models.encoders import (
    PAPER_INSTRUCTION,
    EncoderConfig,
    LLMPromptEncoder,
    join_prefix,
)

CAPTIONS = ["a red cube on the left of a blue ball", "two cats", "a small green square above a big round dog"]
def reference_states(encoder: LLMPromptEncoder, path: str, caption: str, layer: int = -3) -> torch.Tensor:
    """The plain full-prompt computation: whole LLM, one prompt, no cache, no padding."""
    model = AutoModelForCausalLM.from_pretrained(path)
    rows, _ = encoder.caption_ids([caption])
    ids = torch.tensor([encoder.prefix_ids + rows[0]])
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[layer][0]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_cached_prefix_equals_full_prompt(tiny_llms, name):
    encoder = LLMPromptEncoder(EncoderConfig(tiny_llms[name]))
    features = encoder.encode(CAPTIONS)
    assert features.caption_start == encoder.prefix_len > 0
    assert features.states.shape[-1] == encoder.hidden_size
    for row, caption in enumerate(CAPTIONS):
        expected = reference_states(encoder, tiny_llms[name], caption)
        got = features.states[row][features.mask[row]]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # only the blocks up to hidden_states[-3] are kept (4 blocks -> 2), no LM head
    assert len(encoder.decoder.layers) == 2
    assert not hasattr(encoder.decoder, "lm_head")


def test_chat_template_prefix_and_suffix(tiny_llms):
    """tiny-qwen2 has a ChatML template: instruction and caption go in the user turn."""
    path = tiny_llms["tiny-qwen2"]
    encoder = LLMPromptEncoder(EncoderConfig(path, system_prompt="You describe images."))
    tokenizer = encoder.tokenizer
    prefix = tokenizer.decode(encoder.prefix_ids)
    assert prefix.startswith("<|im_start|>system\nYou describe images.<|im_end|>\n<|im_start|>user\n")
    assert prefix.endswith(PAPER_INSTRUCTION + "\n")
    assert tokenizer.decode(encoder.suffix_ids) == "<|im_end|>\n<|im_start|>assistant\n"
    # piecewise tokenisation equals tokenising the rendered prompt
    messages = [{"role": "system", "content": "You describe images."},
                {"role": "user", "content": PAPER_INSTRUCTION + "\n" + CAPTIONS[0]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    rows, _ = encoder.caption_ids(CAPTIONS[:1])
    assert tokenizer(rendered, add_special_tokens=False).input_ids == encoder.prefix_ids + rows[0]
    features = encoder.encode(CAPTIONS)
    torch.testing.assert_close(features.states[0][features.mask[0]],
                               reference_states(encoder, path, CAPTIONS[0]), atol=1e-5, rtol=1e-5)


def test_right_padding_never_changes_states(tiny_llms):
    encoder = LLMPromptEncoder(EncoderConfig(tiny_llms["tiny-qwen2"]))
    alone = encoder.encode_captions(["two cats"])
    batched = encoder.encode_captions(CAPTIONS, batch_size=2)
    n = int(alone.lengths[0])
    torch.testing.assert_close(batched.states[1, :n], alone.states[0, :n], atol=1e-6, rtol=1e-6)
    assert batched.lengths.tolist() == batched.mask.sum(1).tolist()
    assert batched.states[1, n:].abs().sum() == 0  # padding rows are zero
    # the prefix states are the same whatever the batch
    torch.testing.assert_close(encoder.encode_prefix(), encoder.encode(CAPTIONS).states[2, : encoder.prefix_len])


def test_causal_llm_has_positional_bias(tiny_llms):
    """Sec. 3.1: under the causal mask, an early token never sees a later word."""
    encoder = LLMPromptEncoder(EncoderConfig(tiny_llms["tiny-llama"]))
    a = encoder.encode_captions(["a red cube on the left of a blue ball"]).states
    b = encoder.encode_captions(["a red cube on the left of a blue dog"]).states
    assert torch.equal(a[0, 0], b[0, 0])
    assert not torch.allclose(a[0, -1], b[0, -1])


def test_truncation_warns_with_count(tiny_llms):
    encoder = LLMPromptEncoder(EncoderConfig(tiny_llms["tiny-llama"], max_tokens=3))
    counts = [len(encoder.tokenizer(c, add_special_tokens=False).input_ids) for c in CAPTIONS]
    cut = [max(n - 3, 0) for n in counts]
    with pytest.warns(UserWarning, match=rf"{sum(cut)} token\(s\) cut"):
        features = encoder.encode_captions(CAPTIONS)
    assert features.truncated == cut and sum(cut) > 0
    assert features.states.shape[1] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.encode_captions(["cat"])


def test_cut_instruction_and_join_prefix(tiny_llms):
    cut = LLMPromptEncoder(EncoderConfig(tiny_llms["tiny-llama"], cut_instruction=True)).encode(CAPTIONS)
    assert cut.caption_start == 0
    encoder = LLMPromptEncoder(EncoderConfig(tiny_llms["tiny-llama"]))
    caption = encoder.encode_captions(CAPTIONS)
    joined = join_prefix(encoder.encode_prefix(), caption.states, caption.mask)
    torch.testing.assert_close(joined.states, encoder.encode(CAPTIONS).states)
    torch.testing.assert_close(joined.states[:, joined.caption_start:], cut.states)
    assert joined.mask[:, : joined.caption_start].all()


def test_no_instruction_and_bfloat16(tiny_llms):
    encoder = LLMPromptEncoder(EncoderConfig(tiny_llms["tiny-qwen2"], instruction="", dtype="bfloat16", layer=-1))
    features = encoder.encode(CAPTIONS)
    assert features.states.dtype == torch.bfloat16
    assert len(encoder.decoder.layers) == 4  # layer -1 keeps every block and the final norm
    # the features can feed a trainable module (no inference tensors leak out)
    weight = torch.ones(encoder.hidden_size, requires_grad=True)
    (features.states.float() * weight).sum().backward()


def test_fingerprint_tracks_content_not_path(tiny_llms, tmp_path):
    base = EncoderConfig(tiny_llms["tiny-llama"])
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llms["tiny-llama"], copy)
    assert EncoderConfig(str(copy)).fingerprint() == base.fingerprint()
    assert EncoderConfig(tiny_llms["tiny-qwen2"]).fingerprint() != base.fingerprint()
    assert EncoderConfig(tiny_llms["tiny-llama"], layer=-2).fingerprint() != base.fingerprint()
    assert EncoderConfig(tiny_llms["tiny-llama"], instruction="").fingerprint() != base.fingerprint()
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    assert EncoderConfig(str(copy)).fingerprint() != base.fingerprint()
    data = base.to_dict()
    assert EncoderConfig.from_dict(data).fingerprint() == data["fingerprint"]


def test_bad_config_names_the_field(tiny_llms, tmp_path):
    with pytest.raises(ValueError, match="EncoderConfig.dtype"):
        EncoderConfig(tiny_llms["tiny-llama"], dtype="float8")
    with pytest.raises(ValueError, match="EncoderConfig.layer"):
        LLMPromptEncoder(EncoderConfig(tiny_llms["tiny-llama"], layer=-9))
    with pytest.raises(ValueError, match="EncoderConfig.path"):
        EncoderConfig(str(tmp_path / "missing")).fingerprint()
    with pytest.raises(ValueError, match="EncoderConfig.colour"):
        EncoderConfig.from_dict({"path": tiny_llms["tiny-llama"], "colour": 1})
