"""`lidit promote`: register + evaluate + gate, re-evaluating a champion scored on another benchmark,
--force and --rollback, all against a real MLflow server."""

import uuid

import pytest

from helpers import make_checkpoint
from lidit.jobs.cli import main
from lidit.platform import registry


@pytest.fixture(scope="module")
def checkpoints(tiny_llms, tmp_path_factory):
    root = tmp_path_factory.mktemp("promote")
    return [make_checkpoint(root / f"ckpt{seed}", tiny_llms, image_size=16, seed=seed) for seed in (0, 1)]


@pytest.mark.slow
def test_promote_register_gate_force_rollback(checkpoints, mlflow_server, tmp_path, capsys):
    name = f"lidit-promote-{uuid.uuid4().hex[:6]}"
    common = ["--set", f"tracking.tracking_uri={mlflow_server}", "--set", f"tracking.registered_model={name}",
              "--set", "tracking.experiment=promote-test", "--set", f"output={tmp_path / 'eval'}",
              "--set", "benchmark.prompts=3", "--set", "benchmark.steps=1",
              "--set", "benchmark.likelihood={images: 4, pairs: 2}"]

    assert main(["promote", "--checkpoint", checkpoints[0], *common]) == 0
    out = capsys.readouterr().out
    assert "registered" in out and f"models:/{name}/1: promoted" in out and "champion is v1" in out
    first = registry.get_version(mlflow_server, name, "1").tags
    assert first["lidit.eval.benchmark"].startswith("shapes-") and first["lidit.promotion.decision"] == "promoted"

    # a different benchmark: the champion has no score on it, so the job evaluates it too
    assert main(["promote", "--checkpoint", checkpoints[1], *common, "--set", "benchmark.steps=2"]) == 0
    out = capsys.readouterr().out
    assert f"models:/{name}/2: rejected" in out and "champion is v1" in out  # equal scores do not beat it
    second = registry.get_version(mlflow_server, name, "2").tags
    assert registry.get_version(mlflow_server, name, "1").tags["lidit.eval.benchmark"] == second["lidit.eval.benchmark"]
    assert float(second["lidit.promotion.candidate_score"]) <= float(second["lidit.promotion.champion_score"])

    assert main(["promote", "--version", "2", "--force", *common]) == 0
    assert "forced" in capsys.readouterr().out
    assert registry.alias_version(mlflow_server, name, "champion").version == "2"

    assert main(["promote", "--rollback", *common]) == 0
    assert "rolled back" in capsys.readouterr().out
    assert registry.alias_version(mlflow_server, name, "champion").version == "1"
    assert registry.get_version(mlflow_server, name, "1").tags["lidit.rollback.previous_champion"] == "2"


def test_promote_without_a_candidate_fails_with_one_line(mlflow_server, capsys):
    name = f"lidit-promote-{uuid.uuid4().hex[:6]}"
    code = main(["promote", "--set", f"tracking.tracking_uri={mlflow_server}",
                 "--set", f"tracking.registered_model={name}"])
    assert code == 1 and "no candidate" in capsys.readouterr().err
    code = main(["promote", "--rollback", "--set", f"tracking.tracking_uri={mlflow_server}",
                 "--set", f"tracking.registered_model={name}"])
    assert code == 1 and "no previous champion" in capsys.readouterr().err
