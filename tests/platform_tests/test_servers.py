"""The test harness itself: the real servers answer and work together."""

import mlflow
from mlflow.tracking import MlflowClient


def test_s3_server_is_real_object_store(s3_server):
    client = s3_server.client()
    s3_server.bucket("harness")
    client.put_object(Bucket="harness", Key="k/v.txt", Body=b"hello")
    assert client.get_object(Bucket="harness", Key="k/v.txt")["Body"].read() == b"hello"


def test_mlflow_server_stores_runs_and_artifacts_on_s3(mlflow_server, s3_server, tmp_path):
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("harness")
    (tmp_path / "note.txt").write_text("artifact")
    with mlflow.start_run() as run:
        mlflow.log_metric("loss", 0.5)
        mlflow.log_artifact(str(tmp_path / "note.txt"))
    client = MlflowClient(mlflow_server)
    assert client.get_run(run.info.run_id).data.metrics["loss"] == 0.5
    assert [f.path for f in client.list_artifacts(run.info.run_id)] == ["note.txt"]
    listed = s3_server.client().list_objects_v2(Bucket="mlflow-artifacts")
    assert any(obj["Key"].endswith("note.txt") for obj in listed.get("Contents", []))


def test_ray_is_local_and_private(ray_local):
    assert ray_local.is_initialized()
    assert ray_local.cluster_resources()["CPU"] == 2
