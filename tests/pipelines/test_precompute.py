"""`lidit precompute` on real Ray, real Parquet and the tiny LLMs: the stored features are the encoder's,
two encoders run at once, bad samples are counted, another encoder spec lands in another folder."""

import dataclasses
import io
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lidit.models.encoders import EncoderConfig, LLMPromptEncoder
from lidit.pipelines import shards
from lidit.pipelines.embeddings import open_embeddings, read_batches
from lidit.pipelines.precompute import padded_tokens, run_precompute
from lidit.pipelines.shapes import encode_png
from lidit.pipelines.stages import CodecSpec, EncoderSpec

SMALL = dict(num_cpus=0.5)  # two encoder actors + the other stages fit the session's 2-CPU Ray


def encoder_specs(tiny_llms, llama_batch=1):
    return [EncoderSpec(name="llama", path=tiny_llms["tiny-llama"], batch_size=llama_batch, **SMALL),
            EncoderSpec(name="qwen", path=tiny_llms["tiny-qwen2"], batch_size=16, **SMALL)]


def run(inputs, output, encoders, **kwargs):
    kwargs = {"image_size": 32, "store_dtype": "float16", "window": 64, "commit_interval_s": 0,
              "read_num_cpus": 0.25, "write_num_cpus": 0.25,
              "codec": CodecSpec(num_cpus=0.25), **kwargs}
    return run_precompute(inputs, output, encoders, **kwargs)


@pytest.mark.slow
def test_two_encoders_store_what_the_encoder_computes(ray_local, tiny_llms, shapes_data, tmp_path):
    inputs = str(shapes_data / "train-{000000..000001}.tar")
    result = run(inputs, str(tmp_path), encoder_specs(tiny_llms))
    assert result.rows == 64 and result.skipped == {} and result.already_committed == 0
    data = open_embeddings(result.dataset_uri)
    assert [e.name for e in data.encoders] == ["llama", "qwen"]
    table = pq.read_table(data.files[0])  # plain pyarrow
    assert table.schema.field("llama.states").type.value_type.value_type == shards.pa.float16()
    assert table.schema.field("image").type.shape == [3, 32, 32]
    assert set(table.column_names) == {"key", "caption", "image", "llama.states", "llama.len", "qwen.states", "qwen.len"}

    rows = [row for f in data.files for row in pq.read_table(f).to_pylist()]
    assert len({r["key"] for r in rows}) == 64
    captions = [r["caption"] for r in rows]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors (Ray gives each one CPU): the same reduction order
    try:
        for spec, info, atol in zip(encoder_specs(tiny_llms), data.encoders, (0, 1e-3)):
            encoder = LLMPromptEncoder(EncoderConfig(spec.path))
            assert info.fingerprint == encoder.fingerprint and info.prefix_len == encoder.prefix_len
            assert torch.equal(data.prefixes[spec.name], encoder.encode_prefix().half())
            expected = encoder.encode_captions(captions, batch_size=spec.batch_size)
            stored = []
            for f in data.files:
                states, mask = shards.states_from_arrow(pq.read_table(f).column(f"{spec.name}.states"), "float16")
                stored.append(states[mask])
            stored = torch.cat(stored)
            reference = expected.states[expected.mask].half()
            if atol == 0:  # micro-batches of 1: the same computation, so float16 storage is bitwise equal
                differ = stored.view(torch.int16) != reference.view(torch.int16)
                assert not differ.any(), f"{int(differ.sum())} of {differ.numel()} values differ"
            else:  # length-sorted windows of 64 batch differently from one sorted call: float32 rounding only
                torch.testing.assert_close(stored.float(), reference.float(), atol=atol, rtol=1e-3)
            assert [r[f"{spec.name}.len"] for r in rows] == expected.lengths.tolist()
    finally:
        torch.set_num_threads(threads)
    # images: the identity codec of the decoded pixels, in float16
    with tarfile.open(shapes_data / "train-000000.tar") as tar:
        png = tar.extractfile(f"{rows[0]['key']}.png").read()
    pixels = torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))).unsqueeze(0)
    expected_image = (pixels.permute(0, 3, 1, 2).float() / 127.5 - 1).half()
    assert torch.equal(torch.tensor(np.asarray(rows[0]["image"], dtype=np.float16)).reshape(1, 3, 32, 32),
                       expected_image)
    stats = result.encoders["qwen"]
    assert stats["tokens"] == sum(r["qwen.len"] for r in rows) and 1.0 <= stats["padding_waste"] <= 1.5

    # the same spec again: everything is committed, nothing is rewritten
    again = run(inputs, str(tmp_path), encoder_specs(tiny_llms))
    assert again.dataset_uri == result.dataset_uri and again.rows == 0 and again.already_committed == 2
    # another encoder spec (another layer) never mixes with these features
    other = run(inputs, str(tmp_path), [dataclasses.replace(encoder_specs(tiny_llms)[0], layer=-2)])
    assert other.dataset_uri != result.dataset_uri and other.rows == 64
    assert open_embeddings(result.dataset_uri).num_rows == 64


def write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_bad_samples_are_skipped_and_counted(ray_local, tiny_llms, tmp_path):
    good = encode_png(np.full((40, 48, 3), 200, np.uint8))  # not square, not 32: cropped and resized
    samples = [("ok1.png", good), ("ok1.txt", b"a red circle"),
               ("broken.png", b"not a png"), ("broken.txt", b"a blue square"),
               ("nocap.png", good),
               ("empty.png", good), ("empty.txt", b"  \n"),
               ("latin.png", good), ("latin.txt", "caf\u00e9".encode("latin-1")),
               ("noimg.txt", b"a caption without image"),
               ("ok2.jpg", good), ("ok2.json", b'{"caption": "two green triangles"}')]
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_tar(inputs / "a.tar", samples)
    write_tar(tmp_path / "whole.tar", [(f"s{i}.{ext}", good if ext == "png" else b"a cat")
                                       for i in range(6) for ext in ("png", "txt")])
    whole = (tmp_path / "whole.tar").read_bytes()
    (inputs / "b.tar").write_bytes(whole[: len(whole) // 2 + 100])  # cut inside a member
    write_tar(inputs / "c.tar", [("x.png", b"garbage"), ("x.txt", b"a caption")])  # no valid sample at all
    result = run(str(inputs / "*.tar"), str(tmp_path / "out"), encoder_specs(tiny_llms)[:1])
    kept = open_embeddings(result.dataset_uri).manifest.shards[str(inputs / "b.tar")]["rows"]
    assert 0 < kept < 6 and result.rows == 2 + kept
    assert result.skipped == {"caption_empty": 1, "caption_missing": 1, "caption_not_utf8": 1, "image_missing": 1,
                              "image_undecodable": 2, "truncated_tar": 1}
    manifest = open_embeddings(result.dataset_uri).manifest
    assert manifest.shards[str(inputs / "c.tar")] == {"files": [], "rows": 0, "skipped": {"image_undecodable": 1}}
    assert manifest.totals()["skipped"] == result.skipped


@pytest.mark.slow
def test_s3_input_and_output(ray_local, tiny_llms, shapes_data, s3_server):
    from lidit.platform import storage as st

    bucket = s3_server.bucket("precompute-test")
    st.write_bytes_atomic(f"{bucket}/shapes/heldout-000000.tar", (shapes_data / "heldout-000000.tar").read_bytes())
    result = run(f"{bucket}/shapes/heldout-*.tar", f"{bucket}/embeddings", encoder_specs(tiny_llms)[1:])
    assert result.dataset_uri.startswith("s3://") and result.rows == 32
    (batch,) = list(read_batches(result.dataset_uri, batch_size=64))
    assert len(batch.keys) == 32 and batch.text[0].states.shape[0] == 32


def test_padded_tokens_matches_sorted_chunks():
    widths = padded_tokens(torch.tensor([5, 1, 4, 2, 9]), batch_size=2)
    assert widths.tolist() == [5, 2, 5, 2, 9]  # chunks (1, 2), (4, 5), (9)
