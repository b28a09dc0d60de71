"""The real pair through the Ray Data precompute pipeline: what the reader hands training (the stored
prefix states joined back to each caption's row) equals the full prompt's hidden states, run whole
through each real LLM without any cache, up to the bf16 rounding of storage."""

import dataclasses

import pytest
import torch

from lidit.jobs.precompute.presets import resolve_encoders
from lidit.models.encoders import LLMPromptEncoder
from lidit.pipelines.embeddings import open_embeddings
from lidit.pipelines.precompute import run_precompute
from lidit.pipelines.stages import CodecSpec


@pytest.mark.slow
def test_reader_rows_equal_full_prompt_features(ray_local, real_llms, shapes_data, tmp_path):
    from pathlib import Path

    # float32 compute so that the only difference left is the bf16 storage
    specs = [dataclasses.replace(s, dtype="float32", num_cpus=0.5, batch_size=8)
             for s in resolve_encoders("real", Path(real_llms["smollm2"]).parent)]
    result = run_precompute(str(shapes_data / "heldout-000000.tar"), str(tmp_path), specs, CodecSpec(num_cpus=0.25),
                            image_size=32, store_dtype="bfloat16", window=32, read_num_cpus=0.25, write_num_cpus=0.25,
                            commit_interval_s=0)
    assert result.rows == 32
    data = open_embeddings(result.dataset_uri)
    (batch,) = list(data.read_batches(batch_size=32))
    captions = [row["caption"] for table in data.iter_tables(32) for row in table.select(["caption"]).to_pylist()]
    for spec, joined in zip(specs, batch.text):
        encoder = LLMPromptEncoder(spec.features())
        assert joined.caption_start == encoder.prefix_len > 0
        rows, _ = encoder.caption_ids(captions)
        for index in (0, 13, 31):
            ids = torch.tensor([encoder.prefix_ids + rows[index]])
            with torch.inference_mode():
                want = encoder.decoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
            got = joined.states[index][joined.mask[index]]
            assert got.shape == want.shape, spec.name
            relative = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
            assert relative < 8e-3, (spec.name, relative)  # bf16 keeps 8 bits: ~2e-3 per token
