"""Embedding shards: what precompute writes is what training reads, bit for bit, with plain pyarrow and
with Ray Data; only committed files are ever seen."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from lidit.pipelines import embeddings, shards
from lidit.platform import storage as st


def padded(lengths, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    states = torch.randn(len(lengths), int(lengths.max()), dim, generator=gen).to(dtype)
    states[torch.arange(states.shape[1]) >= lengths.unsqueeze(1)] = 0
    return states, lengths


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_states_round_trip_bitwise_without_padding(dtype):
    torch_dtype = shards.STORED_DTYPES[dtype][0]
    states, lengths = padded([3, 1, 5], 8, torch_dtype)
    array = shards.states_to_arrow(states, lengths, dtype)
    assert len(array.flatten()) == 9  # 3 + 1 + 5 tokens: no padding stored
    back, mask = shards.states_from_arrow(array, dtype)
    assert back.dtype == torch_dtype and torch.equal(mask.sum(1), lengths)
    assert torch.equal(back.view(torch.int16), states.view(torch.int16))


def test_float16_overflow_is_refused():
    states = torch.full((1, 2, 4), 1e6)
    with pytest.raises(Exception, match="bfloat16"):
        shards.states_to_arrow(states, torch.tensor([2]), "float16")


def make_dataset(uri, storage=None, cut=False, rows=5):
    """Write a two-encoder data set the way precompute does: file first, then commit in the manifest."""
    encoders = [shards.EncoderInfo("llama", "f1-cut" if cut else "f1", {"cut_instruction": cut}, 8, "float16", 3),
                shards.EncoderInfo("qwen", "f2", {"cut_instruction": False}, 4, "bfloat16", 2)]
    image_shape = [3, 4, 4]
    head = shards.header(encoders, {"kind": "identity"}, image_shape)
    dataset = st.join(uri, head["fingerprint"])
    schema = shards.schema(encoders, {"kind": "identity"}, image_shape)
    lengths = list(range(1, rows + 1))
    s1, l1 = padded(lengths, 8, torch.float16, 1)
    s2, l2 = padded(lengths[::-1], 4, torch.bfloat16, 2)
    images = torch.rand(rows, *image_shape) * 2 - 1
    table = shards.build_table(schema, {
        "key": shards.pa.array([f"k{i}" for i in range(rows)]),
        "caption": shards.pa.array([f"caption {i}" for i in range(rows)]),
        "image": shards.images_to_arrow(images),
        "llama.states": shards.states_to_arrow(s1, l1, "float16"), "llama.len": shards.pa.array(lengths, "int32"),
        "qwen.states": shards.states_to_arrow(s2, l2, "bfloat16"), "qwen.len": shards.pa.array(lengths[::-1], "int32"),
    })
    for enc, dim in (("llama", 8), ("qwen", 4)):
        shards.save_prefix(dataset, enc, torch.randn(3 if enc == "llama" else 2, dim).half(), storage)
    manifest = shards.Manifest(head)
    path = shards.data_file_name("input-000000")
    size = shards.write_table(st.join(dataset, path), table, storage)
    manifest.commit("in/input-000000.tar", [{"path": path, "rows": rows, "bytes": size}], {"image_undecodable": 1})
    manifest.save(dataset, storage)
    return dataset, (s1, l1, s2, l2, images)


def test_plain_pyarrow_reader_joins_prefix_and_pads(tmp_path):
    dataset, (s1, l1, s2, l2, images) = make_dataset(str(tmp_path))
    data = embeddings.open_embeddings(str(tmp_path))  # the output root holding one data set also works
    assert data.uri == dataset and data.num_rows == 5
    assert [e.name for e in data.encoders] == ["llama", "qwen"]
    (file,) = data.files
    table = pq.read_table(file)  # plain pyarrow, no Ray
    assert table.schema.field("image").type.shape == [3, 4, 4]
    assert json.loads(table.schema.metadata[b"lidit"])["fingerprint"] == data.manifest.fingerprint
    assert table.schema.field("qwen.states").metadata[b"dtype"] == b"bfloat16"
    (batch,) = list(data.read_batches(batch_size=8))
    assert batch.keys == [f"k{i}" for i in range(5)]
    torch.testing.assert_close(batch.images, images.half().float())
    llama, qwen = batch.text
    assert llama.caption_start == 3 and qwen.caption_start == 2
    assert llama.states.shape == (5, 3 + 5, 8) and qwen.states.shape == (5, 2 + 5, 4)
    assert torch.equal(llama.states[:, :3], data.prefixes["llama"].float().expand(5, -1, -1))
    assert torch.equal(llama.states[:, 3:], s1.float()) and torch.equal(llama.mask[:, 3:].sum(1), l1)
    assert torch.equal(qwen.states[:, 2:], s2.float()) and bool(qwen.mask[:, :2].all())
    assert data.manifest.totals()["skipped"] == {"image_undecodable": 1}


def test_cut_instruction_and_uncommitted_leftovers(tmp_path):
    dataset, _ = make_dataset(str(tmp_path), cut=True)
    leftover = st.join(dataset, shards.data_file_name("input-000001"))
    pq.write_table(pq.read_table(embeddings.open_embeddings(dataset).files[0]), leftover)
    data = embeddings.open_embeddings(dataset)
    assert len(data.files) == 1 and leftover not in data.files  # written but never committed: invisible
    (batch,) = list(data.read_batches())
    assert batch.text[0].caption_start == 0 and batch.text[0].states.shape[1] == 5
    assert shards.remove_uncommitted(dataset, data.manifest) == 1
    assert not st.exists(leftover) and st.exists(data.files[0])


def test_two_data_sets_need_an_explicit_folder(tmp_path):
    make_dataset(str(tmp_path))
    make_dataset(str(tmp_path), cut=True)
    with pytest.raises(shards.LiditError, match="expected one embedding data set"):
        embeddings.open_embeddings(str(tmp_path))


def test_ray_training_path_reads_s3(ray_local, s3_server):
    """What training does: read_parquet from s3:// -> iter_torch_batches(collate_fn=make_collate_fn(info))."""
    import ray

    root = s3_server.bucket("shards-test") + "/embeddings"
    dataset, (s1, l1, _, _, _) = make_dataset(root)
    data = embeddings.open_embeddings(root)
    fs, _ = st.arrow_filesystem(data.files[0])
    paths = [st.filesystem(f)[1] for f in data.files]
    ds = ray.data.read_parquet(paths, filesystem=fs)
    batches = list(ds.iterator().iter_torch_batches(batch_size=3, collate_fn=embeddings.make_collate_fn(data.info)))
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == [f"k{i}" for i in range(5)]
    first = batches[0]
    row = keys.index(first.keys[0])
    features = first.text[0]
    got = features.states[0][features.mask[0]]
    expected = torch.cat([data.prefixes["llama"].float(), s1[row, : l1[row]].float()])
    assert torch.equal(got, expected)
