"""`lidit train`: real Ray Train (2 CPU workers, gloo), tiny preset on tiny shards, MLflow server, S3 storage.

A worker is killed mid-run (SIGKILL, once) and the job finishes from its last checkpoint, bit-identical to an
uninterrupted run (`data.preserve_order`); a rerun with more steps continues the same MLflow run; a mismatched
encoder spec is refused before any work starts.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import make_tiny_embeddings
from lidit.jobs.train.driver import latest_checkpoint, train
from lidit.jobs.train.spec import TrainSpec
from lidit.platform import storage, tracking
from lidit.platform.config import SpecError


@pytest.fixture(scope="module")
def tiny_embeddings(tmp_path_factory, tiny_llms) -> str:
    return make_tiny_embeddings(str(tmp_path_factory.mktemp("embeddings")), tiny_llms, rows=64, files=4)


def make_spec(tiny_llms, embeddings: str, output: str, workdir: str, **sections) -> TrainSpec:
    data = {
        "name": "tiny-run", "output": output, "workdir": workdir,
        "encoders": [{"name": "llama", "path": tiny_llms["tiny-llama"]}, {"name": "qwen", "path": tiny_llms["tiny-qwen2"]}],
        "data": {"embeddings": embeddings, "batch_size": 8},
        "optim": {"lr": 2e-3, "warmup_steps": 2, "ema_decay": 0.9},
        "train": {"steps": 12, "log_every": 1},
        "checkpoint": {"every_steps": 4, "num_to_keep": 2},
        "samples": {"every_steps": 6, "prompts": 4, "sampler_steps": 4},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    return TrainSpec.model_validate(data)


def test_mismatched_encoder_is_refused_naming_both(tiny_llms, tiny_embeddings, tmp_path):
    spec = make_spec(tiny_llms, tiny_embeddings, str(tmp_path / "out"), str(tmp_path),
                     encoders=[{"name": "llama", "path": tiny_llms["tiny-llama"], "layer": -2},
                               {"name": "qwen", "path": tiny_llms["tiny-qwen2"]}])
    with pytest.raises(SpecError) as err:
        train(spec)
    message = str(err.value)
    stored = json.loads((open(os.path.join(tiny_embeddings, "manifest.json")).read()))["encoders"][0]["fingerprint"]
    assert message.startswith("encoders.0 (llama)") and stored in message and tiny_embeddings in message
    assert not (tmp_path / "mlflow.db").exists(), "nothing may start before the spec is checked"


def test_bad_spec_fails_in_the_cli_with_the_field_named(tmp_path, capsys):
    from lidit.jobs.cli import main

    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp_path), "encoders": [{"name": "a", "path": "x"}],
                                    "data": {"embeddings": str(tmp_path)}, "train": {"steps": 0}}))
    assert main(["train", str(path)]) == 2
    assert "train.steps" in capsys.readouterr().err
    assert main(["train", str(path), "--set", "train.steps=3", "--set", "optim.lrr=1"]) == 2
    assert "optim.lrr: unknown field" in capsys.readouterr().err


@pytest.mark.parametrize("reader", ["v1", "v2"])
def test_a_data_pass_holds_every_row_once_per_epoch_with_either_parquet_reader(ray_local, tiny_llms, tiny_embeddings,
                                                                              tmp_path, reader, monkeypatch):
    from lidit.jobs.train.driver import build_dataset
    from lidit.pipelines.embeddings import open_embeddings

    monkeypatch.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")  # V2's default starts 32 processes per read
    spec = make_spec(tiny_llms, tiny_embeddings, str(tmp_path / "out"), str(tmp_path), data={"parquet_reader": reader})
    dataset = open_embeddings(tiny_embeddings)
    default = ray_local.data.DataContext.get_current().use_datasource_v2
    keys = [row["key"] for row in build_dataset(spec, dataset, first_epoch=1, epochs=2).select_columns(["key"]).take_all()]
    expected = [k for t in dataset.iter_tables(columns=["key"]) for k in t.column("key").to_pylist()]
    assert len(expected) == 64 and sorted(keys) == sorted(expected * 2)
    assert ray_local.data.DataContext.get_current().use_datasource_v2 == default, "the process-wide setting is put back"


@pytest.mark.slow
def test_train_survives_a_killed_worker_and_resumes(ray_local, mlflow_server, s3_server, tiny_llms, tiny_embeddings,
                                                    tmp_path):
    from mlflow.tracking import MlflowClient

    output = s3_server.bucket("train-runs") + "/runs"
    spec = make_spec(tiny_llms, tiny_embeddings, output, str(tmp_path),
                     tracking={"tracking_uri": mlflow_server, "experiment": "train-test"},
                     storage={"key": s3_server.key, "secret": s3_server.secret, "endpoint_url": s3_server.endpoint_url},
                     chaos={"at_step": 6, "rank": 1}, data={"preserve_order": True})
    handler = signal.getsignal(signal.SIGINT)
    result = train(spec)
    assert signal.getsignal(signal.SIGINT) is handler, "Ctrl-C after training does what it did before"

    # exactly once: with the rows in read order, the run killed at step 6 and resumed from its step-4
    # checkpoint ends where one uninterrupted run of the same spec ends, to the bit (weights, EMA, optimizer)
    plain = make_spec(tiny_llms, tiny_embeddings, str(tmp_path / "plain"), str(tmp_path / "plain-work"),
                      data={"preserve_order": True}, samples={"every_steps": 0})
    uninterrupted = train(plain).checkpoint_uri
    killed = storage.download_dir(result.checkpoint_uri, str(tmp_path / "killed"), spec.storage)
    for name in ("model", "ema", "optimizer"):
        ours, theirs = (load_file(os.path.join(folder, f"{name}.safetensors")) for folder in (killed, uninterrupted))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name

    assert result.final_step == 12
    assert result.checkpoint_uri.startswith("s3://") and result.checkpoint_uri.endswith("checkpoint_00000012")
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    losses = [m.value for m in sorted(client.get_metric_history(result.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) >= 12
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    resumed = client.get_metric_history(result.run_id, "resumed_from_step")
    assert [m.value for m in resumed] == [4.0], "the killed worker group restarts from the step-4 checkpoint"
    for name in ("lr", "grad_norm", "images_per_s", "data_wait_fraction"):
        assert client.get_metric_history(result.run_id, name), name
    assert run.data.params["storage.secret"] == "***" and s3_server.secret not in json.dumps(run.data.params)
    assert run.data.params["train.steps"] == "12"
    dataset = run.inputs.dataset_inputs[0].dataset
    assert dataset.digest == os.path.basename(tiny_embeddings)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"spec.yaml", "samples", "checkpoint"} <= artifacts
    samples = {a.path for a in client.list_artifacts(result.run_id, "samples")}
    assert {"samples/step_00000006.png", "samples/step_00000012.png", "samples/prompts.txt"} <= samples
    assert "checkpoint/model.safetensors" in {a.path for a in client.list_artifacts(result.run_id, "checkpoint")}

    longer = spec.model_copy(update={"train": spec.train.model_copy(update={"steps": 16}), "chaos": None})
    again = train(longer)
    assert again.run_id == result.run_id and again.final_step == 16
    assert again.checkpoint_uri.endswith("checkpoint_00000016")
    assert [m.value for m in client.get_metric_history(result.run_id, "resumed_from_step")] == [4.0, 12.0]
    runs = client.search_runs([run.info.experiment_id], f"tags.`{tracking.RUN_NAME_TAG}` = 'tiny-run'")
    assert len(runs) == 1
    done = train(longer)  # nothing left to train: answered from the checkpoint, the run stays one
    assert (done.run_id, done.final_step, done.checkpoint_uri) == (again.run_id, 16, again.checkpoint_uri)

    from lidit.models import load_checkpoint

    folder = latest_checkpoint(longer)
    model, info = load_checkpoint(folder)
    assert json.load(open(os.path.join(folder, "train_state.json")))["step"] == 16
    assert [e.config.fingerprint() for e in info.encoders] == [e.fingerprint for e in _encoders(tiny_embeddings)]
    assert model.config.encoder_dims == [64, 96] and info.image_size == (32, 32)
    assert info.schedule == {"num_steps": 1000, "kind": spec.diffusion.kind, "beta_start": 1e-4, "beta_end": 0.02,
                             "objective": "eps", "sampler": "ddim", "min_snr_gamma": None}


def test_checkpoints_record_the_diffusion_schedule_they_were_trained_with(tiny_embeddings, tmp_path):
    """Evaluation and serving sample with the checkpoint's schedule: a cosine-trained model sampled
    with the default linear one would be scored on the wrong noise levels."""
    from lidit.jobs.train.driver import checkpoint_info, model_config
    from lidit.models import DiffusionSchedule, LiDiT, save_checkpoint
    from lidit.models.generate import TextToImagePipeline
    from lidit.pipelines.embeddings import open_embeddings

    dataset = open_embeddings(tiny_embeddings)
    spec = make_spec({"tiny-llama": "x", "tiny-qwen2": "y"}, tiny_embeddings, str(tmp_path), str(tmp_path),
                     diffusion={"num_steps": 500, "kind": "cosine"})
    info = checkpoint_info(spec, dataset, model_config(spec, dataset))
    assert info.schedule["kind"] == "cosine" and info.schedule["num_steps"] == 500
    save_checkpoint(str(tmp_path / "ckpt"), LiDiT(info.model), None, info)
    schedule = TextToImagePipeline.from_checkpoint(str(tmp_path / "ckpt")).schedule
    expected = DiffusionSchedule(500, "cosine")
    assert schedule.kind == "cosine" and torch.equal(schedule.alphas_cumprod, expected.alphas_cumprod)


def _encoders(uri: str):
    from lidit.pipelines.embeddings import open_embeddings

    return open_embeddings(uri).encoders


def test_ema_warms_up_so_short_runs_are_not_their_initial_weights():
    from torch import nn

    from lidit.jobs.train.ema import EMA

    model = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=0)  # decay min(0.9999, 1/10): 90 % of the new weights
    assert torch.allclose(ema.shadow[0], torch.full((2, 2), 0.9))
    for step in range(1, 600):
        ema.update(model, step)
    assert torch.allclose(ema.shadow[0], torch.ones(2, 2), atol=1e-6)
