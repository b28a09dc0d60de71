"""One storage layer for local folders and s3:// on a real S3-compatible server."""

import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lidit.platform import storage
from lidit.platform.config import LiditError, StorageSpec


@pytest.mark.parametrize("where", ["local", "s3"])
def test_roundtrip(where, tmp_path, s3_server):
    root = str(tmp_path / "root") if where == "local" else s3_server.bucket("storage-test") + "/roundtrip"
    storage.write_text_atomic(storage.join(root, "a", "x.json"), '{"ok": 1}')
    storage.write_bytes_atomic(storage.join(root, "b-000.bin"), b"\x00" * 10)
    storage.write_bytes_atomic(storage.join(root, "b-001.bin"), b"\x01" * 10)
    assert storage.read_text(storage.join(root, "a", "x.json")) == '{"ok": 1}'
    assert storage.exists(storage.join(root, "a", "x.json"))
    found = storage.expand(storage.join(root, "b-{000..002}.bin"))
    assert [f.rsplit("/", 1)[1] for f in found] == ["b-000.bin", "b-001.bin"]
    # a folder round trip, and a local copy for from_pretrained(path)
    src = tmp_path / "folder"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.txt").write_text("weights")
    storage.upload_dir(str(src), storage.join(root, "model"))
    local = storage.local_copy(storage.join(root, "model"), cache=tmp_path / "cache")
    assert open(f"{local}/sub/w.txt").read() == "weights"
    assert storage.local_copy(storage.join(root, "model"), cache=tmp_path / "cache") == local  # cached
    # the same URI with other content (rewritten, or the same bucket on a new server) is never served stale
    (src / "sub" / "w.txt").write_text("new weights")
    storage.upload_dir(str(src), storage.join(root, "model"))
    fresh = storage.local_copy(storage.join(root, "model"), cache=tmp_path / "cache")
    assert open(f"{fresh}/sub/w.txt").read() == "new weights"


def test_parquet_through_arrow_filesystem(s3_server):
    uri = s3_server.bucket("storage-test") + "/parquet/part-0.parquet"
    fs, path = storage.arrow_filesystem(uri)
    pq.write_table(pa.table({"key": ["a", "b"], "n": [1, 2]}), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).column("n").to_pylist() == [1, 2]


def test_missing_and_unreachable_fail_fast_in_one_line(tmp_path, s3_server):
    with pytest.raises(LiditError, match="not found"):
        storage.check_readable(str(tmp_path / "nope"))
    with pytest.raises(LiditError, match="not found"):
        storage.local_copy(s3_server.bucket("storage-test") + "/no/such/model")
    dead = StorageSpec(endpoint_url="http://127.0.0.1:9", key="k", secret="s")
    start = time.monotonic()
    with pytest.raises(LiditError) as err:
        storage.check_readable("s3://bucket/data", dead)
    assert time.monotonic() - start < 60 and "\n" not in str(err.value) and "s3://bucket/data" in str(err.value)
