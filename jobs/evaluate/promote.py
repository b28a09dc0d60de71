"""`lidit promote [SPEC.yaml]`: register a checkpoint, evaluate it, move `champion` when the gate passes.

    lidit promote --checkpoint out/run/checkpoint_000500   # register (-> candidate), evaluate, gate
    lidit promote                                         # gate the current candidate
    lidit promote --version 7 --force                     # move champion regardless (recorded)
    lidit promote --rollback [--to 5]                     # champion back to the version it replaced

The gate compares the candidate's benchmark score with the champion's on the same benchmark (scores are
`lidit.eval.*` version tags; a version without one is evaluated first) and promotes when the candidate
beats it by more than `margin`. The read-compare-write runs under the registry's promotion lock.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pydantic import Field

from lidit.jobs.evaluate import BenchmarkSpec, EvaluateSpec, ProbeSpec
from lidit.platform.config import LiditError, Spec, StorageSpec, TrackingSpec

log = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "promote.yaml"


class PromoteSpec(Spec):
    checkpoint: str | None = Field(None, description="register this checkpoint folder first (local or s3://)")
    version: int | None = Field(None, gt=0, description="the version to gate; default: the new one, else @candidate")
    margin: float = Field(0.0, ge=0, description="promote when candidate > champion + margin")
    metric: str = "overall"
    force: bool = False
    training_run: str | None = None
    dataset: str | None = None
    output: str = ".lidit/evaluate"
    workdir: str = ".lidit"
    device: str = "cpu"
    encoder_paths: dict[str, str] = Field(default_factory=dict)
    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec)
    probe: ProbeSpec = Field(default_factory=lambda: ProbeSpec(enabled=False))
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)


def _evaluate(spec: PromoteSpec, version: str) -> None:
    from lidit.jobs.evaluate import evaluate

    evaluate(EvaluateSpec(
        model=f"models:/{spec.tracking.registered_model}/{version}", output=spec.output, workdir=spec.workdir,
        device=spec.device, encoder_paths=spec.encoder_paths, benchmark=spec.benchmark, probe=spec.probe,
        tracking=spec.tracking, storage=spec.storage,
    ))


def promote(spec: PromoteSpec):
    """Register (optional), evaluate what lacks a score, gate; returns the registry `Decision`."""
    from lidit.platform import registry, storage, tracking

    uri = tracking.tracking_uri(spec.tracking, spec.workdir)
    name = spec.tracking.registered_model
    version = str(spec.version) if spec.version is not None else None
    if spec.checkpoint is not None:
        info = registry.register_checkpoint(uri, storage.local_copy(spec.checkpoint, spec.storage), name,
                                            spec.tracking.experiment, spec.training_run, spec.dataset)
        version = info.version
        print(f"registered {spec.checkpoint} as models:/{name}/{version} (@{registry.CANDIDATE})")
    if version is None:
        candidate = registry.alias_version(uri, name, registry.CANDIDATE)
        if candidate is None:
            raise LiditError(f"models:/{name}@{registry.CANDIDATE}: no candidate (give --checkpoint or --version)")
        version = candidate.version
    key = spec.benchmark.key()
    if not spec.force and registry.score(registry.get_version(uri, name, version), key, spec.metric) is None:
        _evaluate(spec, version)
    for _ in range(3):  # the champion can change (and need a score) while we evaluate
        try:
            return registry.promote(uri, name, version, key, spec.margin, spec.force, spec.metric)
        except registry.MissingScore as missing:
            log.info("champion v%s has no score on %s: evaluating it", missing.version, key)
            _evaluate(spec, missing.version)
    raise LiditError(f"models:/{name}: the champion kept changing while it was being evaluated; try again")


def describe(decision) -> str:
    scores = ""
    if decision.candidate_score is not None:
        champion = "none" if decision.champion_score is None else f"{decision.champion_score:.4f}"
        scores = f" (candidate {decision.candidate_score:.4f} vs champion {champion}, margin {decision.margin})"
    previous = f"v{decision.previous_champion}" if decision.previous_champion else "none"
    return (f"models:/{decision.name}/{decision.version}: {decision.decision}{scores}; "
            f"champion is v{decision.champion} (was {previous})")


SPEC = PromoteSpec  # the spec class `lidit submit` validates against


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lidit.platform.cli import add_spec_arguments

    add_spec_arguments(parser, required=False)
    parser.add_argument("--checkpoint", help="register this checkpoint folder first")
    parser.add_argument("--version", help="gate this version instead of the candidate")
    parser.add_argument("--force", action="store_true", help="move champion without the gate (recorded)")
    parser.add_argument("--rollback", action="store_true", help="move champion back to the version it replaced")
    parser.add_argument("--to", help="with --rollback: the version to roll back to")


def run(args: argparse.Namespace) -> int:
    from lidit.platform import registry, tracking
    from lidit.platform.config import load_spec

    overrides = list(args.overrides)
    for field in ("checkpoint", "version"):
        if getattr(args, field):
            overrides.append(f"{field}={getattr(args, field)}")
    if args.force:
        overrides.append("force=true")
    spec = load_spec(PromoteSpec, args.spec or DEFAULT_CONFIG, overrides)
    if args.rollback:
        uri = tracking.tracking_uri(spec.tracking, spec.workdir)
        decision = registry.rollback(uri, spec.tracking.registered_model, args.to)
    elif args.to:
        raise LiditError("--to needs --rollback")
    else:
        decision = promote(spec)
    print(describe(decision))
    return 0
