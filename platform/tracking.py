"""MLflow helpers shared by train, evaluate, ablate and demo.

The driver resolves the tracking URI (None -> a local sqlite store `sqlite:///<workdir>/mlflow.db`
with artifacts in `<workdir>/mlartifacts`), creates or finds the run by its name (tag
`lidit.run_name`) so that restarts and reruns never duplicate it, and passes the run id to the
workers, which log with `MlflowClient(tracking_uri)`. Params come from the redacted spec only, so
credentials never reach params or tags.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from lidit.platform.config import LiditError, Spec, TrackingSpec, dump_spec, redact

log = logging.getLogger(__name__)

RUN_NAME_TAG = "lidit.run_name"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
_BATCH = 100  # MLflow's limit on params per log_batch call


def tracking_uri(tracking: TrackingSpec, workdir: str | os.PathLike) -> str:
    """The tracking URI to use: the spec's, else a local sqlite store under `workdir`."""
    if tracking.tracking_uri:
        return tracking.tracking_uri
    root = Path(workdir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
    """Local stores keep artifacts next to the database; servers decide for themselves."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


@functools.lru_cache(maxsize=8)
def client(uri: str):
    """An `MlflowClient` bound to `uri` (imported lazily: mlflow is slow to import)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """Find or create the experiment `name`."""
    mlflow_client = client(uri)
    try:
        found = mlflow_client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        return mlflow_client.create_experiment(name, artifact_location=_artifact_root(uri))
    except Exception as err:  # unreachable server, bad URI
        if type(err).__name__ == "RestException" and "RESOURCE_ALREADY_EXISTS" in str(err):
            return mlflow_client.get_experiment_by_name(name).experiment_id
        raise LiditError(f"tracking.tracking_uri {uri}: {type(err).__name__}: {' '.join(str(err).split())[:300]}") from None


def find_run(uri: str, experiment: str, run_name: str) -> str | None:
    """The id of the live run named `run_name` in `experiment`, if there is one."""
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = mlflow_client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        order_by=["attributes.start_time ASC"], max_results=1,
    )
    return runs[0].info.run_id if runs else None


def start_run(uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """(run id, resumed): the run named `run_name`, created on first use and reopened after."""
    exp_id = experiment_id(uri, experiment)
    mlflow_client = client(uri)
    run_id = find_run(uri, experiment, run_name)
    if run_id is not None:
        mlflow_client.update_run(run_id, status="RUNNING")
        return run_id, True
    all_tags = {RUN_NAME_TAG: run_name, **redact(tags or {})}
    run = mlflow_client.create_run(exp_id, run_name=run_name, tags=all_tags)
    return run.info.run_id, False


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists -> {'a.b.0.c': 'value'} with values as strings."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for index, item in enumerate(value):
            out.update(flatten(item, f"{prefix}{index}."))
        return out
    text = json.dumps(value) if isinstance(value, list) else str(value)
    return {prefix.rstrip("."): text[:MAX_PARAM_LENGTH]}


def log_spec(uri: str, run_id: str, spec: Spec, artifact_name: str = "spec.yaml") -> None:
    """Log the resolved spec, credentials redacted: as params (flattened) and as a YAML artifact.

    A reopened run keeps the params it has; changed values are only warned about (MLflow refuses
    to change a param), and the new spec is still saved as the artifact."""
    params = flatten(redact(spec.model_dump(mode="json")))
    mlflow_client = client(uri)
    existing = mlflow_client.get_run(run_id).data.params
    changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
    if changed:
        log.warning("run %s: spec changed since the run began (%s); keeping the first values", run_id, ", ".join(changed))
    fresh = [(k, v) for k, v in params.items() if k not in existing]
    from mlflow.entities import Param

    for first in range(0, len(fresh), _BATCH):
        mlflow_client.log_batch(run_id, params=[Param(k, v) for k, v in fresh[first:first + _BATCH]])
    log_text(uri, run_id, dump_spec(spec), artifact_name)


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log several metrics at one step in one call."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
    client(uri).log_batch(run_id, metrics=batch)


def log_artifact(uri: str, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
    """Upload a file or a folder's content under `artifact_path`."""
    mlflow_client = client(uri)
    if os.path.isdir(local_path):
        mlflow_client.log_artifacts(run_id, local_path, artifact_path)
    else:
        mlflow_client.log_artifact(run_id, local_path, artifact_path)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(uri).log_text(run_id, text, artifact_file)


def log_bytes(uri: str, run_id: str, data: bytes, artifact_file: str) -> None:
    """Upload `data` as the artifact `artifact_file` (e.g. 'samples/step_000100.png')."""
    folder, name = os.path.split(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        client(uri).log_artifact(run_id, path, folder or None)


def log_input_dataset(
    uri: str, run_id: str, name: str, source: str, digest: str, profile: dict | None = None,
    context: str = "training",
) -> None:
    """Record the input data set (location + fingerprint) in the run's inputs, once."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    mlflow_client = client(uri)
    logged = mlflow_client.get_run(run_id).inputs.dataset_inputs or []
    if any(d.dataset.name == name and d.dataset.digest == digest for d in logged):
        return
    dataset = Dataset(name=name, digest=digest[:36], source_type="lidit-embeddings",
                      source=json.dumps({"uri": source}), profile=json.dumps(redact(profile or {})))
    mlflow_client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])
