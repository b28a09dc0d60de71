"""`lidit train`: train LI-DiT (refiners + backbone) on precomputed Parquet shards with Ray Train.

The driver validates the spec against the shards (encoder fingerprints), creates or reopens the MLflow
run, and runs a `TorchTrainer` whose workers stream the shards (`lidit.jobs.train.loop`). The LLMs
stay frozen and are never loaded: their hidden states are in the shards. Checkpoints go to
`<output>/<name>/checkpoint_<step>/` (local or s3://); re-running the same spec resumes from the latest.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from lidit.jobs.train.spec import TrainSpec
from lidit.models.checkpoint import CheckpointInfo
from lidit.models.presets import LiDiTConfig
from lidit.pipelines.stages import EncoderSpec
from lidit.platform import storage
from lidit.platform.config import LiditError, SpecError, StorageSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    checkpoint_uri: str | None
    run_id: str
    final_step: int
    metrics: dict[str, Any]


# ---- the driver's checks -------------------------------------------------------------------------------

def encoder_fingerprint(spec: EncoderSpec, storage_spec: StorageSpec | None = None) -> str:
    """The feature fingerprint of an encoder spec (hashes the model files unless `revision` is set)."""
    config = spec.features()
    if config.revision is None:
        config = dataclasses.replace(config, path=storage.local_copy(spec.path, storage_spec))
    return config.fingerprint()


def check_encoders(spec: TrainSpec, dataset) -> None:
    """Refuse a model whose encoder specs do not match the shards, naming both sides."""
    stored = dataset.encoders
    if [e.name for e in spec.encoders] != [e.name for e in stored]:
        raise SpecError(f"encoders: spec has {[e.name for e in spec.encoders]}, shards {dataset.uri} have "
                        f"{[e.name for e in stored]} (same names, same order)")
    for i, (wanted, have) in enumerate(zip(spec.encoders, stored)):
        try:
            fingerprint = encoder_fingerprint(wanted, spec.storage)
        except ValueError as err:
            raise SpecError(f"encoders.{i}.path: {err}") from None
        if fingerprint != have.fingerprint:
            raise SpecError(f"encoders.{i} ({wanted.name}): spec fingerprint {fingerprint} ({wanted.path}) does not "
                            f"match the shards' {have.fingerprint} ({dataset.uri}, from {have.config.get('path')})")


def model_config(spec: TrainSpec, dataset) -> LiDiTConfig:
    """The LiDiTConfig for this spec and these shards."""
    from lidit.models import lidit_config

    channels, height, width = dataset.image_shape
    try:
        config = lidit_config(spec.model.preset, in_channels=channels,
                              encoder_dims=[e.hidden_size for e in dataset.encoders], **spec.model.overrides)
    except ValueError as err:
        raise SpecError(f"model: {err}") from None
    if height % config.patch_size or width % config.patch_size:
        raise SpecError(f"model.overrides.patch_size: {config.patch_size} does not divide the shards' latents "
                        f"{height}x{width}")
    return config


def checkpoint_info(spec: TrainSpec, dataset, model: LiDiTConfig) -> CheckpointInfo:
    """What every checkpoint of this run records besides the weights (`lidit.models.CheckpointInfo`): the
    model config, the encoders, codec and image size of the shards, the diffusion schedule it was trained
    with (evaluation and serving sample with the same one), and the data set."""
    from lidit.models import EncoderConfig, EncoderEntry

    encoders = tuple(EncoderEntry(e.name, EncoderConfig.from_dict({**e.config, "fingerprint": e.fingerprint}),
                                  e.dtype, e.hidden_size, e.prefix_len) for e in dataset.encoders)
    schedule = spec.diffusion.schedule().config()
    return CheckpointInfo(model, encoders, dataset.codec, dataset.image_size, schedule,
                          {"uri": dataset.uri, "fingerprint": dataset.manifest.fingerprint})


def latest_checkpoint_uri(spec: TrainSpec) -> str | None:
    """The newest complete checkpoint (`config.yaml` is written last) under `<output>/<name>/`."""
    fs, root = storage.filesystem(spec.run_uri, spec.storage)
    fs.invalidate_cache()  # s3fs caches listings: Ray Train wrote new checkpoints behind its back
    if not fs.exists(root):
        return None
    names = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    for name in reversed([n for n in names if n.startswith("checkpoint_")]):
        uri = storage.join(spec.run_uri, name)
        if storage.exists(storage.join(uri, "config.yaml"), spec.storage):
            return uri
    return None


def latest_checkpoint(spec: TrainSpec, local_dir: str | None = None) -> str:
    """A local folder holding the newest complete checkpoint of this spec's run (downloaded from s3://)."""
    uri = latest_checkpoint_uri(spec)
    if uri is None:
        raise LiditError(f"{spec.run_uri}: no checkpoint yet")
    if local_dir is None:
        return storage.local_copy(uri, spec.storage)
    return storage.download_dir(uri, local_dir, spec.storage)


# ---- the job -------------------------------------------------------------------------------------------

MAX_EPOCHS_PER_PASS = 32


def data_plan(spec: TrainSpec, rows: int) -> dict[str, int]:
    """Which epochs one pass of the Ray dataset holds: from the epoch of the step training resumes at
    (read from the latest checkpoint) to the last one needed, so epochs follow each other in one
    streaming execution instead of paying Ray Data's start-up at every epoch boundary (seconds)."""
    import json

    start_step = 0
    latest = latest_checkpoint_uri(spec)
    if latest is not None:
        start_step = json.loads(storage.read_text(storage.join(latest, "train_state.json"), spec.storage))["step"]
    global_batch = spec.data.batch_size * spec.train.grad_accum * spec.scaling.num_workers
    if rows < global_batch:
        raise SpecError(f"data.batch_size: {spec.data.batch_size} x {spec.train.grad_accum} accumulation x "
                        f"{spec.scaling.num_workers} workers is more than the {rows} rows of the shards")
    first = start_step * global_batch // rows
    last = -(-spec.train.steps * global_batch // rows)  # one epoch of margin: equal splits drop a few rows
    return {"first_epoch": first, "epochs": max(1, min(last - first + 1, MAX_EPOCHS_PER_PASS)), "rows": rows,
            "start_step": start_step}


def build_dataset(spec: TrainSpec, dataset, first_epoch: int = 0, epochs: int = 1):
    """Ray Data over the committed Parquet files: `epochs` epochs back to back (a union of one read per
    epoch; `read_parquet` drops repeated paths), each with its file order drawn from (seed, epoch)."""
    import ray.data
    from ray.data import FileShuffleConfig

    filesystem, _ = storage.arrow_filesystem(dataset.files[0], spec.storage)
    paths = [storage.filesystem(f, spec.storage)[1] for f in dataset.files]
    context = ray.data.DataContext.get_current()  # read_parquet picks the datasource from it when called
    default, context.use_datasource_v2 = context.use_datasource_v2, spec.data.parquet_reader == "v2"
    try:
        reads = []
        for epoch in range(first_epoch, first_epoch + epochs):
            shuffle = (FileShuffleConfig(seed=spec.train.seed * 100_003 + epoch, reseed_after_execution=False)
                       if spec.data.shuffle_files else None)
            reads.append(ray.data.read_parquet(paths, filesystem=filesystem, shuffle=shuffle))
    finally:
        context.use_datasource_v2 = default
    return reads[0].union(*reads[1:]) if len(reads) > 1 else reads[0]


def data_config(spec: TrainSpec):
    """Ray Train's ingest options, with Ray Data's `preserve_order` from `spec.data`."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = spec.data.preserve_order
    return DataConfig(execution_options=options)


def train(spec: TrainSpec) -> TrainResult:
    """Train (or resume) the run named by `spec.name`; returns where its final checkpoint is."""
    from lidit.pipelines.embeddings import open_embeddings
    from lidit.platform import tracking
    from lidit.platform.cluster import init_ray

    dataset = open_embeddings(spec.data.embeddings, spec.storage)
    if not dataset.files:
        raise LiditError(f"{dataset.uri}: no committed shards")
    check_encoders(spec, dataset)
    plan = data_plan(spec, dataset.num_rows)
    info = checkpoint_info(spec, dataset, model_config(spec, dataset))
    config = {"spec": spec.model_dump(mode="json"), "checkpoint": info.to_config(), "data": plan}

    init_ray(spec.ray.address, spec.ray.num_cpus)
    uri = tracking.tracking_uri(spec.tracking, spec.workdir)
    run_id, resumed = tracking.start_run(uri, spec.tracking.experiment, spec.name,
                                         tags={"lidit.job": "train", "lidit.dataset": dataset.manifest.fingerprint})
    log.info("MLflow run %s (%s) at %s", run_id, "reopened" if resumed else "new", uri)
    if plan["start_step"] >= spec.train.steps:  # a rerun of a finished spec: nothing to train
        log.info("%s: already at step %d of %d", spec.run_uri, plan["start_step"], spec.train.steps)
        metrics = dict(tracking.client(uri).get_run(run_id).data.metrics, step=plan["start_step"])
        tracking.end_run(uri, run_id, "FINISHED")
        return TrainResult(latest_checkpoint_uri(spec), run_id, plan["start_step"], metrics)
    try:
        result = _fit(spec, dataset, config, uri, run_id)
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    tracking.end_run(uri, run_id, "FINISHED")
    return result


def text_statistics(dataset, rows: int = 1024) -> list[dict]:
    """Per-channel caption-token statistics of each encoder's features over the data set's first `rows`
    rows (plain pyarrow, in the driver): a fresh model standardises its LLM inputs with them
    (`lidit.models.text_stats`); a resumed one keeps those in its checkpoint."""
    from itertools import islice

    from lidit.models.text_stats import caption_statistics

    batches = islice(dataset.read_batches(batch_size=256), max(1, rows // 256))
    return caption_statistics(batch.text for batch in batches)


def _fit(spec: TrainSpec, dataset, config: dict, uri: str, run_id: str) -> TrainResult:
    import json

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lidit.jobs.train.loop import train_loop_per_worker
    from lidit.platform import tracking

    tracking.log_spec(uri, run_id, spec)
    tracking.log_input_dataset(uri, run_id, name="embeddings", source=dataset.uri,
                               digest=dataset.manifest.fingerprint,
                               profile={"rows": dataset.num_rows, "files": len(dataset.files),
                                        "encoders": {e.name: e.fingerprint for e in dataset.encoders},
                                        "codec": dataset.codec, "image_size": list(dataset.image_size)})
    config = dict(config, tracking_uri=uri, run_id=run_id, text_statistics=text_statistics(dataset))
    filesystem, path = storage.arrow_filesystem(spec.output, spec.storage)
    if not storage.is_remote(spec.output):
        os.makedirs(path, exist_ok=True)
    gpus = spec.scaling.gpus_per_worker or (1.0 if spec.scaling.use_gpu else 0.0)
    resources = {"CPU": spec.scaling.cpus_per_worker, **({"GPU": gpus} if spec.scaling.use_gpu else {})}
    plan = config["data"]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=spec.name, storage_path=path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=spec.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.num_to_keep),
        ),
        datasets={"train": build_dataset(spec, dataset, plan["first_epoch"], plan["epochs"])},
        dataset_config=data_config(spec),
    )
    result = _fit_keeping_sigint(trainer)
    metrics = dict(result.metrics or {})
    checkpoint_uri = latest_checkpoint_uri(spec)
    if checkpoint_uri is None:
        raise LiditError(f"{spec.run_uri}: training ended without a checkpoint")
    if "step" not in metrics:  # a rerun of a finished spec reports nothing new
        state = json.loads(storage.read_text(storage.join(checkpoint_uri, "train_state.json"), spec.storage))
        metrics["step"] = state["step"]
    return TrainResult(checkpoint_uri, run_id, int(metrics["step"]), metrics)


def _fit_keeping_sigint(trainer):
    """`trainer.fit()`, then the SIGINT handler that was there before. Ray Train (2.60) installs its own
    handler (Ctrl-C aborts the run) and never restores it, so in a process that goes on after training,
    e.g. `lidit demo` serving until Ctrl-C, Ctrl-C kept asking a finished run's controller to abort."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()  # Ray Train installs no handler off the main thread
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        signal.signal(signal.SIGINT, previous)
