"""`lidit demo`, shortened, against the real servers: MLflow tracking server on 127.0.0.1, the S3 server for
data, shards, checkpoints and MLflow artifacts, a local Ray. Asserts what a user would check."""

import json

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from servers import free_port


@pytest.mark.slow
def test_demo_end_to_end_on_s3_and_mlflow_server(tmp_path, ray_local, s3_server, mlflow_server):
    from lidit.jobs.commands import CONFIGS
    from lidit.jobs.experiments.demo import DemoSpec, run_demo
    from lidit.platform import storage
    from lidit.platform.config import load_spec

    bucket = s3_server.bucket("demo")
    overrides = [f"workdir={tmp_path / 'demo'}", "encoders=tiny", f"embeddings={bucket}/embeddings",
                 f"checkpoints={bucket}/checkpoints", f"data.uri={bucket}/data", "data.train=64", "data.heldout=16",
                 "data.shard_size=32", "train.train.steps=4", "train.checkpoint.every_steps=2",
                 "train.samples.every_steps=2", "benchmark.prompts=4", "benchmark.steps=4",
                 "benchmark.likelihood.images=4", "benchmark.likelihood.pairs=2",
                 f"serve.port={free_port()}", "wait=false", f"tracking.tracking_uri={mlflow_server}",
                 "tracking.experiment=demo-test", "tracking.registered_model=lidit-demo"]
    spec = load_spec(DemoSpec, CONFIGS / "demo.yaml", overrides)
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

    # the endpoint served a PNG of the trained size by default
    image = Image.open(summary["image"])
    assert image.format == "PNG" and image.size == (32, 32)
    assert summary["reused"] == []

    # a rerun (without serving) reuses every finished stage: no new training run, no new version
    again = run_demo(load_spec(DemoSpec, CONFIGS / "demo.yaml", overrides + ["serve=null"]))
    assert again["reused"] == ["encoder LLMs", "synthetic shapes data", "precompute (Ray Data)", "train (Ray Train)",
                               "register, evaluate, promote (MLflow)"]
    assert (again["run_id"], again["version"], again["checkpoint"]) == (
        summary["run_id"], summary["version"], summary["checkpoint"])
    assert len(client.search_model_versions("name='lidit-demo'")) == 1
    state = json.loads((tmp_path / "demo" / "demo-state.json").read_text())
    assert {"precompute (Ray Data)", "train (Ray Train)"} <= set(state)


def test_a_field_added_to_train_spec_is_settable_from_demo_and_ablate_yaml(monkeypatch):
    """The demo's and the ablation's `train:` sections are TrainSpecs less the fields those jobs fill in:
    a new TrainSpec field needs no edit there to be set from their YAML (here: a field added by subclassing)."""
    from lidit.jobs.commands import CONFIGS
    from lidit.jobs.experiments import ablate, demo
    from lidit.jobs.train import spec as train
    from lidit.pipelines.stages import EncoderSpec
    from lidit.platform.config import load_spec

    class LoopWithKnob(train.LoopSpec):
        new_knob: int = 0

    class TrainWithKnob(train.TrainSpec):
        train: LoopWithKnob

    monkeypatch.setattr(demo, "TrainSpec", TrainWithKnob)
    monkeypatch.setattr(ablate, "TrainSpec", TrainWithKnob)
    encoders = [EncoderSpec(name="e", path="p")]
    demo_spec = load_spec(demo.DemoSpec, CONFIGS / "demo.yaml", ["train.train.new_knob=7", "train.optim.betas=[0.8, 0.9]"])
    built = demo_spec.train_spec(encoders, "data", "out", "work")
    assert (built.train.new_knob, built.optim.betas, built.train.steps) == (7, (0.8, 0.9), 1000)
    ablate_spec = load_spec(ablate.AblateSpec, CONFIGS / "ablate.yaml", ["train.train.new_knob=5"])
    built = ablate_spec.train_spec("run", "refiner", encoders, 3, "data", "root")
    assert (built.train.new_knob, built.train.seed, built.model.overrides["use_collaborative"]) == (5, 3, False)
    with pytest.raises(Exception, match="train.train.new_knob: Input should be a valid integer"):
        load_spec(demo.DemoSpec, CONFIGS / "demo.yaml", ["train.train.new_knob=many"])
