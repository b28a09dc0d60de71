"""`lidit demo`, shortened, against the real servers: MLflow tracking server on 127.0.0.1, the S3 server for
data, shards, checkpoints and MLflow artifacts, a local Ray. Asserts what a user would check."""

import io
import json
import urllib.request

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from servers import free_port


@pytest.mark.slow
def test_demo_end_to_end_on_s3_and_mlflow_server(tmp_path, ray_local, s3_server, mlflow_server):
    from lidit.jobs.demo import DemoSpec, run_demo
    from lidit.platform import storage
    from lidit.platform.config import parse_spec

    bucket = s3_server.bucket("demo")
    spec = parse_spec(DemoSpec, {
        "workdir": str(tmp_path / "demo"), "encoders": "tiny",
        "embeddings": f"{bucket}/embeddings", "checkpoints": f"{bucket}/checkpoints",
        "data": {"uri": f"{bucket}/data", "train": 64, "heldout": 16, "shard_size": 32},
        "train": {"steps": 4, "batch_size": 16, "checkpoint_every": 2},
        "evaluate": {"prompts": 4, "steps": 4},
        "serve": {"port": free_port(), "wait": False},
        "tracking": {"tracking_uri": mlflow_server, "experiment": "demo-test", "registered_model": "lidit-demo"},
    })
    summary = run_demo(spec)

    # Parquet shards on S3, readable by plain pyarrow
    files = [f for f in storage.expand(summary["embeddings"] + "/data/*.parquet")]
    assert files, "no Parquet shard on S3"
    fs, path = storage.arrow_filesystem(files[0])
    table = pq.read_table(path, filesystem=fs)
    assert table.num_rows > 0 and {"key", "caption", "image"} <= set(table.column_names)

    # an MLflow run with metrics and image grids, artifacts stored on S3
    client = MlflowClient(mlflow_server)
    run = client.get_run(summary["run_id"])
    assert "loss" in run.data.metrics
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    grids = [a for top in artifacts for a in ([top] + [c.path for c in client.list_artifacts(run.info.run_id, top)])
             if a.endswith(".png")]
    assert grids, f"no image grid among {artifacts}"
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])]
    assert any(k.endswith(".png") for k in keys)

    # a registered version holding the champion alias
    champion = client.get_model_version_by_alias("lidit-demo", "champion")
    assert champion.version == str(summary["version"])

    # the endpoint served a PNG of the requested size
    image = Image.open(summary["image"])
    assert image.format == "PNG" and image.size == (32, 32)

    # a rerun reuses every finished stage
    state = json.loads((tmp_path / "demo" / "demo-state.json").read_text())
    assert {"precompute (Ray Data)", "train (Ray Train)"} <= set(state)
