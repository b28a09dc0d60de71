"""platform/tracking.py against the default local store (sqlite + artifact folder): one run per name,
params from the redacted spec, metrics, artifacts, the input data set."""

from __future__ import annotations

from pathlib import Path

from lidit.platform import tracking
from lidit.platform.config import Spec, StorageSpec, TrackingSpec


class _Job(Spec):
    name: str = "job"
    storage: StorageSpec = StorageSpec()
    layers: list[int] = [1, 2]


def test_local_store_run_is_created_once_and_reopened(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = tracking.tracking_uri(TrackingSpec(), tmp_path / "work")
    assert uri == f"sqlite:///{(tmp_path / 'work' / 'mlflow.db').resolve()}"
    run_id, resumed = tracking.start_run(uri, "exp", "run-a", tags={"token": "abc", "job": "train"})
    assert not resumed
    again, resumed = tracking.start_run(uri, "exp", "run-a")
    assert (again, resumed) == (run_id, True)
    other, _ = tracking.start_run(uri, "exp", "run-b")
    assert other != run_id

    spec = _Job(storage=StorageSpec(key="AKIA-ID", secret="s3cr3t"))
    tracking.log_spec(uri, run_id, spec)
    tracking.log_spec(uri, run_id, spec.model_copy(update={"layers": [3]}))  # a rerun with a changed spec
    tracking.log_metrics(uri, run_id, {"loss": 0.5, "lr": 1e-4}, step=3)
    tracking.log_bytes(uri, run_id, b"\x89PNG", "samples/step_3.png")
    tracking.log_input_dataset(uri, run_id, "embeddings", "s3://bucket/emb/abc", "abc123", {"rows": 10})
    tracking.log_input_dataset(uri, run_id, "embeddings", "s3://bucket/emb/abc", "abc123", {"rows": 10})
    tracking.end_run(uri, run_id)

    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["storage.secret"] == "***" and run.data.params["storage.key"] == "***"
    assert run.data.params["layers"] == "[1, 2]", "a reopened run keeps its first params"
    assert run.data.tags["token"] == "***" and run.data.tags[tracking.RUN_NAME_TAG] == "run-a"
    assert run.data.metrics == {"loss": 0.5, "lr": 1e-4}
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == ["abc123"]
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(tmp_path / "work" / "mlartifacts")
    assert (artifacts / "samples" / "step_3.png").read_bytes() == b"\x89PNG"
    assert "s3cr3t" not in (artifacts / "spec.yaml").read_text()
    assert "- 3" in (artifacts / "spec.yaml").read_text(), "the artifact holds the spec actually run"


def test_flatten_names_nested_fields():
    assert tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": [{"e": "x"}]}) == {"a.b": "1", "a.c": "[1, 2]", "d.0.e": "x"}
