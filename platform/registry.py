"""MLflow model registry: checkpoints as versions, `candidate`/`champion` aliases, a locked promotion gate.

- `register_checkpoint`: logs a checkpoint folder (safetensors + config.yaml, no pickle) as run artifacts
  and creates a version whose source is that folder; tags carry the encoder fingerprints, the training
  run and the data set; the new version gets the `candidate` alias.
- `record_evaluation`: benchmark scores as version tags (`lidit.eval.*`).
- `promote` / `rollback`: move `champion`, recording the decision and both scores as version tags.
  Aliases are single-valued, so there is never more than one champion; the gate itself is a
  read-compare-write, so it runs under `promotion_lock`, a ticket lock kept in the registry's own
  database (see `promotion_lock`): concurrent promotions are serialised and each compares against
  the champion the previous one left.
- `resolve`: `models:/NAME@ALIAS`, `models:/NAME/VERSION` or a folder -> a local checkpoint folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import yaml

from lidit.platform import storage
from lidit.platform.config import LiditError

CANDIDATE, CHAMPION = "candidate", "champion"
EVAL, PROMOTION, ROLLBACK = "lidit.eval.", "lidit.promotion.", "lidit.rollback."
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
REQUIRED_FILES = ("config.yaml", "model.safetensors")
LOCK_TTL_S = 600.0


class MissingScore(LiditError):
    """The gate needs a version's score on the benchmark and the version has none yet."""

    def __init__(self, version: str, benchmark: str) -> None:
        super().__init__(f"version {version} has no score on benchmark {benchmark}: evaluate it first")
        self.version, self.benchmark = version, benchmark


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    source: str
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class Resolved:
    """A local checkpoint folder and, for registry URIs, the version it came from."""

    folder: str
    version: VersionInfo | None = None


@dataclass(frozen=True)
class Decision:
    """What a promotion or rollback did; also written to the version's tags."""

    name: str
    version: str
    decision: str  # promoted | rejected | forced | unchanged | rolled back
    champion: str | None  # the champion after the decision
    previous_champion: str | None
    candidate_score: float | None = None
    champion_score: float | None = None
    margin: float | None = None
    benchmark: str | None = None

    @property
    def moved(self) -> bool:
        return self.champion != self.previous_champion


def client(tracking_uri: str | None):
    """An `MlflowClient` whose registry is the tracking server (or local store)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _call(what: str, fn, *args, **kwargs):
    """Run a registry call, turning MLflow's errors into one-line `LiditError`s."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args, **kwargs)
    except MlflowException as err:
        raise LiditError(f"{what}: {str(err).splitlines()[0][:300]}") from None


def _info(v) -> VersionInfo:
    return VersionInfo(v.name, str(v.version), v.source, v.run_id, dict(v.tags or {}), tuple(v.aliases or ()))


def get_version(tracking_uri: str | None, name: str, version: str) -> VersionInfo:
    return _info(_call(f"models:/{name}/{version}", client(tracking_uri).get_model_version, name, str(version)))


def alias_version(tracking_uri: str | None, name: str, alias: str) -> VersionInfo | None:
    """The version behind `alias`, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return _info(client(tracking_uri).get_model_version_by_alias(name, alias))
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(err) or "INVALID_PARAMETER_VALUE" in str(err) or "not found" in str(err):
            return None
        raise LiditError(f"models:/{name}@{alias}: {str(err).splitlines()[0][:300]}") from None


def _ensure_model(mlflow_client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err) and "already exists" not in str(err):
            raise LiditError(f"registered model {name}: {str(err).splitlines()[0][:300]}") from None


def check_checkpoint(folder: str) -> dict:
    """A registrable checkpoint: config.yaml + model.safetensors and no pickle file. Returns the config."""
    root = Path(folder)
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    if missing:
        raise LiditError(f"{folder}: not a checkpoint folder (missing {', '.join(missing)})")
    pickled = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise LiditError(f"{folder}: refusing to register pickle files ({', '.join(pickled)}); weights go in safetensors")
    config = yaml.safe_load((root / "config.yaml").read_text())
    if not isinstance(config, dict):
        raise LiditError(f"{folder}/config.yaml: not a mapping")
    return config


def encoder_tags(config: dict) -> dict[str, str]:
    """`lidit.encoder.<name>` -> fingerprint for every encoder a checkpoint config lists."""
    entries = config.get("encoders") or []
    if isinstance(entries, dict):
        entries = [{"name": k, **v} for k, v in entries.items()]
    tags = {f"lidit.encoder.{e.get('name', i)}": str(e.get("fingerprint", "unknown")) for i, e in enumerate(entries)}
    tags["lidit.encoders"] = ",".join(str(e.get("name", i)) for i, e in enumerate(entries))
    return tags


def register_checkpoint(
    tracking_uri: str | None, folder: str, name: str = "lidit", experiment: str = "lidit",
    training_run: str | None = None, dataset: str | None = None, tags: dict[str, str] | None = None,
    alias: str | None = CANDIDATE,
) -> VersionInfo:
    """Log `folder` as the artifacts of a `register` run and create a version with it as the source."""
    config = check_checkpoint(folder)
    mlflow_client = client(tracking_uri)
    found = _call(f"experiment {experiment}", mlflow_client.get_experiment_by_name, experiment)
    exp_id = found.experiment_id if found else _call(f"experiment {experiment}", mlflow_client.create_experiment, experiment)
    version_tags = {**encoder_tags(config), "lidit.checkpoint": os.path.abspath(folder) if not storage.is_remote(folder) else folder}
    if training_run:
        version_tags["lidit.training_run"] = training_run
    recorded = config.get("dataset")
    if isinstance(recorded, dict):  # training writes {uri, fingerprint}
        recorded = f"{recorded.get('uri')}@{recorded.get('fingerprint')}"
    if dataset or recorded:
        version_tags["lidit.dataset"] = str(dataset or recorded)
    version_tags.update(tags or {})
    run = _call("create run", mlflow_client.create_run, exp_id, run_name=f"register {Path(folder).name}",
                tags={"lidit.job": "register", **version_tags})
    run_id = run.info.run_id
    try:
        _call("log checkpoint", mlflow_client.log_artifacts, run_id, folder, "checkpoint")
        _ensure_model(mlflow_client, name)
        source = f"{run.info.artifact_uri.rstrip('/')}/checkpoint"
        version = _call(f"register {name}", mlflow_client.create_model_version, name, source, run_id=run_id,
                        tags=version_tags, description=f"checkpoint {Path(folder).name}", await_creation_for=0)
        if alias:
            _call(f"alias {alias}", mlflow_client.set_registered_model_alias, name, alias, version.version)
        mlflow_client.set_terminated(run_id, "FINISHED")
    except BaseException:
        mlflow_client.set_terminated(run_id, "FAILED")
        raise
    return get_version(tracking_uri, name, str(version.version))


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME@ALIAS` -> (NAME, ALIAS, None); `models:/NAME/VERSION` -> (NAME, None, VERSION)."""
    body = uri[len("models:/"):]
    if "@" in body:
        name, alias = body.split("@", 1)
        if name and alias and "/" not in name:
            return name, alias, None
    else:
        name, _, version = body.partition("/")
        if name and version.isdigit():
            return name, None, version
    raise LiditError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def resolve(uri: str, tracking_uri: str | None = None, cache: str | os.PathLike | None = None) -> Resolved:
    """A local checkpoint folder for a registry URI (downloaded once per version) or a folder/s3 prefix."""
    if not uri.startswith("models:/"):
        return Resolved(storage.local_copy(uri))
    name, alias, version = parse_model_uri(uri)
    info = alias_version(tracking_uri, name, alias) if alias else get_version(tracking_uri, name, version)
    if info is None:
        raise LiditError(f"{uri}: no such alias")
    # Keyed by what the version holds, not only its number: a new server on the same address (or a
    # re-created registry) reuses names and numbers for other checkpoints.
    key = hashlib.sha256(f"{tracking_uri}|{info.source}|{info.run_id}".encode()).hexdigest()[:12]
    target = Path(cache or storage.cache_dir()) / "registry" / key / info.name / info.version
    if not (target / ".lidit-complete").exists():
        import mlflow

        # The version's own source, not models:/...: MLflow resolves models:/ URIs with the global
        # registry URI whatever registry_uri is passed (mlflow 3.17).
        source = _call(uri, client(tracking_uri).get_model_version_download_uri, info.name, info.version)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
        folder = _call(uri, mlflow.artifacts.download_artifacts, artifact_uri=source, dst_path=str(partial),
                       tracking_uri=tracking_uri)
        inner = Path(folder).relative_to(partial)
        (partial / ".lidit-complete").write_text(str(inner))
        if target.exists():  # another process finished first
            shutil.rmtree(partial, ignore_errors=True)
        else:
            os.replace(partial, target)
    return Resolved(str(target / (target / ".lidit-complete").read_text()), info)


def record_evaluation(tracking_uri: str | None, name: str, version: str, benchmark: str,
                      scores: dict[str, float], run_id: str | None = None) -> None:
    """Scores on `benchmark` as version tags: lidit.eval.benchmark, lidit.eval.<metric>, lidit.eval.run."""
    mlflow_client = client(tracking_uri)
    tags = {"benchmark": benchmark, **{k: f"{v:.6f}" for k, v in scores.items()}}
    if run_id:
        tags["run"] = run_id
    for key, value in tags.items():
        _call(f"models:/{name}/{version}", mlflow_client.set_model_version_tag, name, str(version), EVAL + key, value)


def score(info: VersionInfo, benchmark: str, metric: str = "overall") -> float | None:
    """The version's recorded score on `benchmark`, None if it was not evaluated on it."""
    if info.tags.get(EVAL + "benchmark") != benchmark or EVAL + metric not in info.tags:
        return None
    return float(info.tags[EVAL + metric])


@contextlib.contextmanager
def promotion_lock(tracking_uri: str | None, name: str, ttl_s: float = LOCK_TTL_S, timeout_s: float = 600.0,
                   poll_s: float = 0.2) -> Iterator[str]:
    """Serialise alias changes of registered model `name` across processes and machines.

    A ticket lock in the registry's own database: each contender creates a version of the model
    `<name>.promotion-lock`. Version numbers are allocated atomically and never reused (deleted
    versions are kept as deleted rows), and a lower ticket is committed before a higher one can be
    numbered, so the lowest live ticket is the holder, seen the same by everyone. Releasing deletes the
    ticket; a ticket past its expiry (a crashed holder) is deleted by the next contender."""
    mlflow_client = client(tracking_uri)
    lock = f"{name}.promotion-lock"
    _ensure_model(mlflow_client, lock)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    ticket = _call(f"lock {lock}", mlflow_client.create_model_version, lock, "lidit:///promotion-lock",
                   tags={"owner": owner, "expires": f"{time.time() + ttl_s:.3f}"},
                   description="ticket of the promotion lock; deleted on release", await_creation_for=0)
    mine = int(ticket.version)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            live = []
            for v in _call(f"lock {lock}", mlflow_client.search_model_versions, f"name='{lock}'"):
                if int(v.version) != mine and float(v.tags.get("expires", 0)) < time.time():
                    with contextlib.suppress(Exception):
                        mlflow_client.delete_model_version(lock, v.version)
                    continue
                live.append(int(v.version))
            if min(live) == mine:
                break
            if time.monotonic() > deadline:
                raise LiditError(f"{lock}: timed out after {timeout_s:.0f}s waiting for ticket {min(live)}")
            time.sleep(poll_s)
        yield owner
    finally:
        with contextlib.suppress(Exception):
            mlflow_client.delete_model_version(lock, str(mine))


def _record(mlflow_client, decision: Decision, prefix: str) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    values = {k: v for k, v in asdict(decision).items() if v is not None and k not in ("name", "version")}
    for key, value in {**values, "time": now}.items():
        mlflow_client.set_model_version_tag(decision.name, decision.version, prefix + key, str(value))
    mlflow_client.set_registered_model_tag(decision.name, "lidit.last_decision",
                                           json.dumps({**asdict(decision), "time": now}))


def promote(tracking_uri: str | None, name: str, version: str, benchmark: str, margin: float = 0.0,
            force: bool = False, metric: str = "overall", ttl_s: float = LOCK_TTL_S) -> Decision:
    """Move `champion` to `version` if its score beats the champion's by more than `margin` (or there is
    no champion, or `force`). Both scores come from `record_evaluation` tags on `benchmark`; raises
    `MissingScore` for a version that has none (the caller evaluates it and calls again)."""
    version = str(version)
    with promotion_lock(tracking_uri, name, ttl_s=ttl_s):
        candidate = get_version(tracking_uri, name, version)
        champion = alias_version(tracking_uri, name, CHAMPION)
        candidate_score = score(candidate, benchmark, metric)
        if candidate_score is None and not force:
            raise MissingScore(version, benchmark)
        champion_score = score(champion, benchmark, metric) if champion else None
        previous = champion.version if champion else None
        if champion is not None and champion.version != version and champion_score is None and not force:
            raise MissingScore(champion.version, benchmark)
        if previous == version:
            verdict = "unchanged"
        elif force:
            verdict = "forced"
        elif champion is None or candidate_score > champion_score + margin:
            verdict = "promoted"
        else:
            verdict = "rejected"
        mlflow_client = client(tracking_uri)
        if verdict in ("promoted", "forced"):
            _call(f"alias {CHAMPION}", mlflow_client.set_registered_model_alias, name, CHAMPION, version)
            mlflow_client.set_model_version_tag(name, version, PROMOTION + "replaced", str(previous or "none"))
        decision = Decision(name, version, verdict, version if verdict in ("promoted", "forced", "unchanged") else previous,
                            previous, candidate_score, champion_score, margin, benchmark)
        _record(mlflow_client, decision, PROMOTION)
        return decision


def rollback(tracking_uri: str | None, name: str, to_version: str | None = None,
             ttl_s: float = LOCK_TTL_S) -> Decision:
    """Point `champion` back at `to_version`, by default the version the current champion replaced."""
    with promotion_lock(tracking_uri, name, ttl_s=ttl_s):
        champion = alias_version(tracking_uri, name, CHAMPION)
        if to_version is None:
            replaced = champion.tags.get(PROMOTION + "replaced") if champion else None
            if not replaced or replaced == "none":
                raise LiditError(f"{name}: no previous champion to roll back to (give a version)")
            to_version = replaced
        target = get_version(tracking_uri, name, str(to_version))
        mlflow_client = client(tracking_uri)
        _call(f"alias {CHAMPION}", mlflow_client.set_registered_model_alias, name, CHAMPION, target.version)
        decision = Decision(name, target.version, "rolled back", target.version,
                            champion.version if champion else None)
        _record(mlflow_client, decision, ROLLBACK)
        return decision
