"""Test fixtures written through the project's own writers (never by hand in another format):
checkpoints through `lidit.models.save_checkpoint`, embedding data sets through
`lidit.pipelines.shards.write_dataset` with the tiny LLMs' real features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def tiny_encoder_entries(llms: dict[str, str]):
    """`EncoderEntry`s for the tiny LLMs built by the `tiny_llms` fixture (names `tiny_llama`, `tiny_qwen2`)."""
    from lidit.models import EncoderConfig, EncoderEntry

    return tuple(EncoderEntry(name.replace("-", "_"), EncoderConfig(path=path)) for name, path in llms.items())


def make_checkpoint(folder: str | Path, llms: dict[str, str], preset: str = "tiny", image_size: int = 32,
                    seed: int = 0, **overrides) -> str:
    """A freshly initialised LI-DiT over the tiny LLMs (identity codec: pixels), saved as a checkpoint."""
    from transformers import AutoConfig

    from lidit.models import CheckpointInfo, LiDiT, lidit_config, save_checkpoint

    entries = tiny_encoder_entries(llms)
    dims = [AutoConfig.from_pretrained(e.config.path).hidden_size for e in entries]
    torch.manual_seed(seed)
    model = LiDiT(lidit_config(preset, in_channels=3, encoder_dims=dims, **overrides))
    info = CheckpointInfo(model.config, entries, {"kind": "identity"}, (image_size, image_size))
    save_checkpoint(str(folder), model, model, info)
    return str(folder)


def make_tiny_embeddings(out: str, llms: dict[str, str], rows: int = 64, size: int = 32, files: int = 4) -> str:
    """Shapes captions through the tiny LLMs (names 'llama', 'qwen'), pixels as latents; returns the folder."""
    from lidit.models import EncoderConfig, IdentityCodec, LLMPromptEncoder
    from lidit.pipelines import shards
    from lidit.pipelines.shapes import render, samples

    scenes = [scene for _, scene in samples("train", rows)]
    captions = [scene.caption for scene in scenes]
    codec = IdentityCodec()
    images = codec.encode(torch.from_numpy(np.stack([render(s, size) for s in scenes])))
    encoders, states, prefixes = [], [], []
    for name, path in zip(("llama", "qwen"), (llms["tiny-llama"], llms["tiny-qwen2"])):
        encoder = LLMPromptEncoder(EncoderConfig(path=path))
        features = encoder.encode_captions(captions)
        encoders.append(shards.EncoderInfo(name, encoder.fingerprint, encoder.config.to_dict(), encoder.hidden_size,
                                           "float16", encoder.prefix_len))
        states.append((features.states, features.lengths))
        prefixes.append(encoder.encode_prefix().to(torch.float16))
    keys = [f"sample-{i:06d}" for i in range(rows)]
    return shards.write_dataset(out, keys, captions, images, encoders, states, prefixes, codec.config(), files)
