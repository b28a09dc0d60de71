"""Session fixtures: real servers and small real artefacts, started once per test session.

- `s3_server`: an S3-compatible object store on 127.0.0.1 (Swift s3api; moto only as a fallback). Its
  endpoint and credentials are exported as the standard AWS variables before Ray starts, so Ray workers,
  s3fs, boto3 and MLflow all reach it without extra settings.
- `mlflow_server`: tracking URI of `mlflow server` on 127.0.0.1 (sqlite backend, artifacts proxied to S3).
- `ray_local`: a private local Ray (`address="local"`, 2 CPUs).
- `tiny_llms`: {name: folder} of the tiny Llama/Qwen2 causal LMs, saved with save_pretrained.
- `shapes_data`: folder of synthetic shapes WebDataset shards (train + held-out).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from servers import start_mlflow, start_s3  # noqa: E402

pytest_plugins = ["real_llm_fixtures"]

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def servers_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def s3_server(servers_root):
    server = start_s3(servers_root)
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(servers_root, s3_server) -> str:
    artifacts = s3_server.bucket("mlflow-artifacts") + "/artifacts"
    server = start_mlflow(servers_root / "mlflow", artifacts, s3_server.env())
    yield server.tracking_uri
    server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A private local Ray for the whole session; S3 variables are set before it starts."""
    import ray

    from lidit.platform.cluster import init_ray

    init_ray(address="local", num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llms(tmp_path_factory) -> dict[str, str]:
    from lidit.models.tiny_llms import make_tiny_llms

    return make_tiny_llms(tmp_path_factory.mktemp("tiny-llms"))


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    from lidit.pipelines.shapes import ShapesSpec, write_shapes

    out = tmp_path_factory.mktemp("shapes")
    write_shapes(str(out), ShapesSpec(train=96, heldout=32, image_size=32, shard_size=32, seed=0))
    return out
