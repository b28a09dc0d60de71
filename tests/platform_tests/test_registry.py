"""Model registry on a real MLflow server: register, gated alias moves, rollback, concurrent promotions."""

import json
import multiprocessing
import os
import time
import uuid

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lidit.platform import registry
from lidit.platform.config import LiditError


def make_checkpoint(folder, tag: str = "a") -> str:
    os.makedirs(folder, exist_ok=True)
    save_file({"w": torch.arange(4.0)}, os.path.join(folder, "model.safetensors"))
    config = {"model": {"width": 8}, "codec": {"kind": "identity"}, "image_size": 32,
              "encoders": [{"name": "tiny_llama", "fingerprint": f"fp-llama-{tag}"},
                           {"name": "tiny_qwen2", "fingerprint": f"fp-qwen-{tag}"}]}
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    return str(folder)


def unique_name() -> str:
    return f"lidit-test-{uuid.uuid4().hex[:8]}"


def register_scored(uri, tmp_path, name, scores, benchmark="bench-1"):
    versions = []
    for i, value in enumerate(scores):
        info = registry.register_checkpoint(uri, make_checkpoint(tmp_path / f"ckpt{i}", str(i)), name=name)
        registry.record_evaluation(uri, name, info.version, benchmark, {"overall": value, "color": value})
        versions.append(info.version)
    return versions


def test_register_records_source_tags_and_candidate_alias(mlflow_server, tmp_path):
    name = unique_name()
    folder = make_checkpoint(tmp_path / "step_000100")
    info = registry.register_checkpoint(mlflow_server, folder, name=name, training_run="run-123",
                                        dataset="s3://data/shapes@abcd")
    assert info.version == "1" and info.aliases == ("candidate",)
    assert info.source.endswith("/checkpoint") and info.run_id
    assert info.tags["lidit.encoder.tiny_llama"] == "fp-llama-a" and info.tags["lidit.encoder.tiny_qwen2"] == "fp-qwen-a"
    assert info.tags["lidit.training_run"] == "run-123" and info.tags["lidit.dataset"] == "s3://data/shapes@abcd"

    second = registry.register_checkpoint(mlflow_server, make_checkpoint(tmp_path / "b", "b"), name=name)
    assert second.version == "2"
    assert registry.alias_version(mlflow_server, name, "candidate").version == "2"
    assert registry.alias_version(mlflow_server, name, "champion") is None

    resolved = registry.resolve(f"models:/{name}/1", mlflow_server, cache=tmp_path / "cache")
    assert sorted(os.listdir(resolved.folder)) == ["config.yaml", "model.safetensors"]
    assert yaml.safe_load(open(os.path.join(resolved.folder, "config.yaml")))["encoders"][0]["fingerprint"] == "fp-llama-a"
    latest = registry.resolve(f"models:/{name}@candidate", mlflow_server, cache=tmp_path / "cache")
    assert latest.version.version == "2" and latest.folder != resolved.folder
    assert registry.resolve(folder).folder == folder and registry.resolve(folder).version is None


def test_register_refuses_pickles_and_incomplete_folders(mlflow_server, tmp_path):
    folder = make_checkpoint(tmp_path / "pickled")
    (tmp_path / "pickled" / "optimizer.pt").write_bytes(b"\x80\x04")
    with pytest.raises(LiditError, match="pickle.*optimizer.pt"):
        registry.register_checkpoint(mlflow_server, folder, name=unique_name())
    (tmp_path / "empty").mkdir()
    with pytest.raises(LiditError, match="missing config.yaml, model.safetensors"):
        registry.register_checkpoint(mlflow_server, str(tmp_path / "empty"), name=unique_name())
    with pytest.raises(LiditError, match="expected models:/NAME@ALIAS"):
        registry.resolve("models:/just-a-name", mlflow_server)


def test_champion_moves_only_when_the_gate_passes_and_rollback(mlflow_server, tmp_path):
    name = unique_name()
    v1, v2, v3 = register_scored(mlflow_server, tmp_path, name, [0.50, 0.53, 0.70])

    first = registry.promote(mlflow_server, name, v1, "bench-1", margin=0.05)
    assert (first.decision, first.champion, first.previous_champion) == ("promoted", v1, None)

    rejected = registry.promote(mlflow_server, name, v2, "bench-1", margin=0.05)  # +0.03 < margin
    assert (rejected.decision, rejected.champion) == ("rejected", v1)
    assert registry.alias_version(mlflow_server, name, "champion").version == v1
    tags = registry.get_version(mlflow_server, name, v2).tags
    assert tags["lidit.promotion.decision"] == "rejected"
    assert float(tags["lidit.promotion.candidate_score"]) == 0.53 and float(tags["lidit.promotion.champion_score"]) == 0.5

    promoted = registry.promote(mlflow_server, name, v3, "bench-1", margin=0.05)
    assert (promoted.decision, promoted.previous_champion) == ("promoted", v1)
    assert registry.alias_version(mlflow_server, name, "champion").version == v3

    back = registry.rollback(mlflow_server, name)  # to the version v3 replaced
    assert (back.decision, back.champion, back.previous_champion) == ("rolled back", v1, v3)
    assert registry.alias_version(mlflow_server, name, "champion").version == v1
    assert registry.get_version(mlflow_server, name, v1).tags["lidit.rollback.previous_champion"] == v3

    forced = registry.promote(mlflow_server, name, v2, "bench-1", margin=0.05, force=True)
    assert forced.decision == "forced" and registry.alias_version(mlflow_server, name, "champion").version == v2
    model_tag = registry.client(mlflow_server).get_registered_model(name).tags["lidit.last_decision"]
    assert json.loads(model_tag)["decision"] == "forced"
    explicit = registry.rollback(mlflow_server, name, to_version=v3)
    assert explicit.champion == v3 and registry.alias_version(mlflow_server, name, "champion").version == v3


def test_the_gate_needs_scores_on_the_same_benchmark(mlflow_server, tmp_path):
    name = unique_name()
    v1, v2 = register_scored(mlflow_server, tmp_path, name, [0.4, 0.6])
    registry.promote(mlflow_server, name, v1, "bench-1")
    registry.record_evaluation(mlflow_server, name, v2, "bench-2", {"overall": 0.9})
    with pytest.raises(registry.MissingScore) as err:  # v1 was scored on bench-1 only
        registry.promote(mlflow_server, name, v2, "bench-2")
    assert err.value.version == v1
    assert registry.alias_version(mlflow_server, name, "champion").version == v1


def promote_in_process(uri, name, version, barrier, queue) -> None:
    """One contender, in its own process (forked: mlflow is already imported)."""
    registry.client(uri).get_registered_model(name)
    barrier.wait(timeout=60)  # all contenders connected: start together
    decision = registry.promote(uri, name, version, "bench-1", margin=0.0)
    queue.put({"version": version, "decision": decision.decision, "previous": decision.previous_champion})


@pytest.mark.slow
def test_concurrent_promotions_leave_exactly_one_champion(mlflow_server, tmp_path):
    name = unique_name()
    scores = [0.30, 0.80, 0.55, 0.65]
    versions = register_scored(mlflow_server, tmp_path, name, scores)
    context = multiprocessing.get_context("fork")
    barrier, queue = context.Barrier(len(versions)), context.Queue()
    procs = [context.Process(target=promote_in_process, args=(mlflow_server, name, v, barrier, queue))
             for v in versions]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0] * len(procs)
    decisions = [queue.get(timeout=5) for _ in procs]
    best = versions[scores.index(max(scores))]
    assert registry.alias_version(mlflow_server, name, "champion").version == best
    # serialised: each promotion replaced the champion the one before it left, so the promotions form
    # one chain from "no champion" to the best version, with rising scores
    promoted = {d["previous"]: d["version"] for d in decisions if d["decision"] == "promoted"}
    assert len(promoted) == sum(d["decision"] == "promoted" for d in decisions)
    chain, current = [], None
    while current in promoted:
        current = promoted[current]
        chain.append(current)
    assert len(chain) == len(promoted) and chain[-1] == best
    chain_scores = [scores[versions.index(v)] for v in chain]
    assert chain_scores == sorted(chain_scores)
    assert all(d["decision"] in ("promoted", "rejected") for d in decisions) and len(decisions) == len(versions)
    lock = registry.client(mlflow_server).search_model_versions(f"name='{name}.promotion-lock'")
    assert lock == []  # every ticket released


def test_a_dead_holders_ticket_expires(mlflow_server):
    name = unique_name()
    mlflow_client = registry.client(mlflow_server)
    with registry.promotion_lock(mlflow_server, name):
        pass  # creates the lock model
    mlflow_client.create_model_version(f"{name}.promotion-lock", "lidit:///promotion-lock",
                                       tags={"owner": "crashed", "expires": f"{time.time() - 1:.3f}"})
    started = time.monotonic()
    with registry.promotion_lock(mlflow_server, name, timeout_s=20):
        assert time.monotonic() - started < 10
    with pytest.raises(LiditError, match="timed out"):
        held = mlflow_client.create_model_version(f"{name}.promotion-lock", "lidit:///promotion-lock",
                                                  tags={"owner": "alive", "expires": f"{time.time() + 60:.3f}"})
        try:
            with registry.promotion_lock(mlflow_server, name, timeout_s=1):
                pass
        finally:
            mlflow_client.delete_model_version(f"{name}.promotion-lock", held.version)
