"""Exactly once: `kill -9` of a running `lidit precompute`, then the same command again, gives every
sample exactly once; the rerun skips the committed input shards and removes the uncommitted files."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lidit.pipelines.embeddings import open_embeddings
from lidit.pipelines.shapes import ShapesSpec, write_shapes

SHARDS, PER_SHARD = 48, 8


def lidit(log: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    # its own session, so that kill -9 reaches the job (a Ray driver) and nothing else
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "lidit.jobs.cli", *args], env=env,
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)


def wait_group_gone(pgid: int, timeout: float = 30) -> None:
    """Make sure nothing of the killed group lingers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes of group {pgid} survived kill -9")


def committed(output: Path) -> dict:
    manifests = list(output.glob("*/manifest.json"))
    return json.loads(manifests[0].read_text())["shards"] if manifests else {}


@pytest.mark.slow
def test_kill_9_then_rerun_writes_every_sample_once(ray_local, tiny_llms, tmp_path):
    write_shapes(str(tmp_path / "in"), ShapesSpec(train=SHARDS * PER_SHARD, heldout=1, image_size=16,
                                                  shard_size=PER_SHARD))
    output = tmp_path / "out"
    spec = {"input": str(tmp_path / "in" / "train-*.tar"), "output": str(output), "image_size": 16,
            "store_dtype": "float16", "window": PER_SHARD, "commit_interval_s": 0, "read_num_cpus": 1,
            "write_num_cpus": 0.25, "codec": {"num_cpus": 0.25, "batch_size": PER_SHARD},
            "ray": {"address": ray_local.get_runtime_context().gcs_address},  # a driver attached to a running Ray
            "encoders": [{"name": "llama", "path": tiny_llms["tiny-llama"], "num_cpus": 0.5, "batch_size": 4}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))

    job = lidit(tmp_path / "killed.log", "precompute", str(tmp_path / "spec.yaml"))
    deadline = time.monotonic() + 400
    while not committed(output) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # the driver, at whatever point it is; Ray drops its actors and tasks
    job.wait()
    wait_group_gone(job.pid)
    before = committed(output)
    log = (tmp_path / "killed.log").read_text()[-3000:]
    assert 0 < len(before) < SHARDS, f"the kill should land mid-way: {len(before)} shards committed\n{log}"

    rerun = lidit(tmp_path / "rerun.log", "precompute", str(tmp_path / "spec.yaml"), "--json")
    rerun.wait(timeout=600)
    out = (tmp_path / "rerun.log").read_text()
    assert rerun.returncode == 0, out[-3000:]
    assert not re.search(r"\x1b\[\d*[ABCDHJK]", out), "a log that is not a terminal gets no cursor movement"
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["already_committed"] == len(before)
    assert summary["rows"] == (SHARDS - len(before)) * PER_SHARD

    data = open_embeddings(str(output))
    keys = [k for table in data.iter_tables(batch_size=1000, columns=["key"]) for k in table.column("key").to_pylist()]
    assert len(keys) == len(set(keys)) == SHARDS * PER_SHARD
    on_disk = sorted(str(p) for p in (Path(data.uri) / "data").glob("*.parquet"))
    assert on_disk == sorted(data.files)  # the killed run's uncommitted files are gone
    for shard, entry in before.items():  # committed shards were not rewritten
        assert data.manifest.shards[shard]["files"] == entry["files"]
