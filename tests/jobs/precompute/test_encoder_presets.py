"""Encoder presets in job specs: `real` (SmolLM2 + Gemma-3), `tiny`, single names, explicit specs,
and the `lidit models` commands that build them ahead of time."""

import json
from pathlib import Path

import pytest
import torch

from lidit.jobs.cli import main
from lidit.jobs.precompute.presets import default_models_dir, resolve_encoders
from lidit.models.encoders import PAPER_INSTRUCTION, LLMPromptEncoder
from lidit.pipelines.stages import EncoderSpec
from lidit.platform.config import SpecError


def test_tiny_preset_builds_once(tmp_path):
    specs = resolve_encoders("tiny", tmp_path)
    assert [(s.name, s.use_chat_template) for s in specs] == [("tiny_llama", False), ("tiny_qwen2", True)]
    assert all(Path(s.path).is_relative_to(tmp_path) for s in specs)
    first = [s.fingerprint() for s in specs]
    again = resolve_encoders("tiny", tmp_path)
    assert [s.fingerprint() for s in again] == first


def test_names_lists_and_explicit_specs(tmp_path):
    tiny = resolve_encoders("tiny", tmp_path)
    mixed = resolve_encoders(["tiny_qwen2", {"name": "mine", "path": tiny[0].path, "layer": -2}, tiny[0]],
                             tmp_path)
    assert [s.name for s in mixed] == ["tiny_qwen2", "mine", "tiny_llama"]
    assert mixed[1].layer == -2 and mixed[1].instruction == PAPER_INSTRUCTION
    assert isinstance(mixed[1], EncoderSpec)


@pytest.mark.parametrize("value, message", [
    ("huge", "encoders: unknown encoder preset 'huge'"),
    ([], "encoders: expected a preset name"),
    ([{"name": "x"}], "encoders.0: path: Field required"),
    (["tiny", {"name": "y", "path": "p", "layers": 3}], "encoders.1: layers: unknown field"),
    (["tiny", "tiny_llama"], "encoders: encoder name 'tiny_llama' appears twice"),
])
def test_bad_values_name_the_field(tmp_path, value, message):
    with pytest.raises(SpecError, match=message):
        resolve_encoders(value, tmp_path)


def test_real_preset_is_the_paper_pair(real_llms):
    """SmolLM2 (instruction-tuned): the paper's instruction in its chat template; Gemma-3 (base): as a
    plain prefix after BOS. bf16, hidden_states[-3]; the raw positional-bias probe is exactly 0."""
    specs = resolve_encoders("real", Path(real_llms["smollm2"]).parent)
    assert [(s.name, s.path, s.use_chat_template, s.dtype, s.layer) for s in specs] == [
        ("smollm2", real_llms["smollm2"], True, "bfloat16", -3),
        ("gemma3", real_llms["gemma3"], False, "bfloat16", -3),
    ]
    pair = ["a red cube on the left of a blue ball", "a red cube on the left of a blue dog"]
    for spec in specs:
        encoder = LLMPromptEncoder(spec.features())
        prefix = encoder.tokenizer.decode(encoder.prefix_ids)
        if spec.name == "smollm2":
            assert prefix.startswith("<|im_start|>system\n")
            assert prefix.endswith(f"<|im_start|>user\n{PAPER_INSTRUCTION}\n")
            assert encoder.tokenizer.decode(encoder.suffix_ids) == "<|im_end|>\n<|im_start|>assistant\n"
        else:
            assert prefix == f"<bos>{PAPER_INSTRUCTION}\n" and encoder.suffix_ids == []
        features = encoder.encode_captions(pair)
        assert features.states.dtype == torch.bfloat16
        earlier = int(features.lengths[0]) - len(encoder.suffix_ids) - 1  # caption tokens before "ball"/"dog"
        assert torch.equal(features.states[0, :earlier], features.states[1, :earlier])
        assert not torch.equal(features.states[0, earlier], features.states[1, earlier])


def test_models_commands(real_llms, tmp_path, capsys):
    root = Path(real_llms["smollm2"]).parent
    assert root == default_models_dir()
    assert main(["models", "import-bundled", str(root)]) == 0  # already there: returns at once
    out = json.loads(capsys.readouterr().out)
    assert (out["smollm2"], out["gemma3"]) == (real_llms["smollm2"], real_llms["gemma3"])
    (tmp_path / "x.gguf").write_text("not a gguf")
    assert main(["models", "import-gguf", str(tmp_path / "x.gguf"), str(tmp_path / "out")]) == 1
    assert "not a GGUF file" in capsys.readouterr().err
    assert main(["models", "import-gguf", str(tmp_path / "none.gguf"), str(tmp_path / "out")]) == 1
    assert "no such GGUF file" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["models", "import-bundled", str(tmp_path), "--only", "llama"]) == 1
    assert not (tmp_path / "out").exists()
