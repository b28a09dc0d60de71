"""The tiny offline LLMs reload through the real from_pretrained(path) path and give hidden states."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_reload_offline_and_hidden_states(tiny_llms):
    assert set(tiny_llms) == {"tiny-llama", "tiny-qwen2"}
    widths = {}
    for name, path in tiny_llms.items():
        config = json.loads((Path(path) / "config.json").read_text())
        assert config["model_type"] == {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}[name]
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        batch = tokenizer(["a red circle to the left of a blue square", "two stars"], return_tensors="pt",
                          padding=True)
        with torch.inference_mode():
            hidden = model(**batch, output_hidden_states=True).hidden_states
        assert len(hidden) == config["num_hidden_layers"] + 1
        assert hidden[-3].shape[:2] == batch["input_ids"].shape and torch.isfinite(hidden[-3]).all()
        widths[name] = hidden[-3].shape[-1]
    assert widths["tiny-llama"] != widths["tiny-qwen2"]  # per-encoder projections get exercised


def test_token_ids_match_the_raw_tokenizer_and_chat_template(tiny_llms):
    from tokenizers import Tokenizer

    text = "a big purple triangle above a cyan square"
    for name, path in tiny_llms.items():
        raw = Tokenizer.from_file(str(Path(path) / "tokenizer.json")).encode(text).ids
        assert AutoTokenizer.from_pretrained(path)(text)["input_ids"] == raw
    qwen = AutoTokenizer.from_pretrained(tiny_llms["tiny-qwen2"])
    prompt = qwen.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert AutoTokenizer.from_pretrained(tiny_llms["tiny-llama"]).chat_template is None


def test_cli_builds_the_same_files(tmp_path, tiny_llms):
    lidit = Path(sys.executable).with_name("lidit")
    out = subprocess.run([str(lidit), "models", "make-tiny", str(tmp_path)], capture_output=True, text=True,
                         check=True)
    paths = json.loads(out.stdout)
    for name, path in paths.items():
        assert (Path(path) / "model.safetensors").read_bytes() == (Path(tiny_llms[name]) / "model.safetensors").read_bytes()
