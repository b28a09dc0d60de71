"""Tiny offline causal LMs for tests and the quick demo.

`make_tiny_llms(out_dir)` trains a byte-level BPE tokenizer on a small built-in corpus and saves two
randomly initialised decoder-only LMs with `save_pretrained`: one Llama-architecture (plain prompt, no
chat template) and one Qwen2-architecture (ChatML chat template). Everything downstream loads them with
the same `from_pretrained(path)` as any Hugging Face checkpoint. Deterministic: same files every time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "pink"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "heart", "diamond", "ring"]
WORDS = ["a", "an", "the", "one", "two", "three", "four", "small", "big", "large", "tiny", "to", "of", "left",
         "right", "above", "below", "on", "top", "next", "and", "with", "image", "picture", "photo", "objects"]
CORPUS_SENTENCES = [
    "Describe the image by detailing the color, shape, size, texture, quantity, text, and spatial "
    "relationships of the objects:",
    "You are a helpful assistant.",
    "a red circle to the left of a blue square",
    "two green triangles above a yellow star",
    "a photo of a cat sitting on a wooden table next to a window",
    "The quick brown fox jumps over the lazy dog.",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# name -> (architecture, width, layers, heads, kv heads, chat template)
TINY_LLMS: dict[str, tuple[str, int, int, int, int, bool]] = {
    "tiny-llama": ("llama", 64, 4, 4, 2, False),
    "tiny-qwen2": ("qwen2", 96, 4, 4, 2, True),
}


def _corpus() -> list[str]:
    lines = list(CORPUS_SENTENCES)
    for color in COLORS:
        for shape in SHAPES:
            lines.append(f"a {color} {shape}")
            lines.append(f"two {color} {shape}s to the right of a {shape}")
    lines.append(" ".join(WORDS))
    return lines


def train_tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer (the GPT-2/Llama-3/Qwen family) trained on the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", unk_token=None, padding_side="right")


def _config(arch: str, width: int, layers: int, heads: int, kv_heads: int, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 2, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)


def make_tiny_llms(out_dir: str | Path, seed: int = 0) -> dict[str, str]:
    """Build (or reuse) the tiny LLMs under `out_dir`; returns {name: folder}."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    paths: dict[str, str] = {}
    tokenizer = None
    for index, (name, (arch, width, layers, heads, kv_heads, chat)) in enumerate(TINY_LLMS.items()):
        folder = out / name
        paths[name] = str(folder)
        if (folder / ".complete").exists():
            continue
        tokenizer = tokenizer or train_tokenizer()
        tokenizer.chat_template = CHATML_TEMPLATE if chat else None
        torch.manual_seed(seed + index)
        model = AutoModelForCausalLM.from_config(_config(arch, width, layers, heads, kv_heads, tokenizer))
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / ".complete").write_text(json.dumps({"architecture": arch, "seed": seed + index}))
    return paths
