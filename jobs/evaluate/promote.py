"""`lidit promote`: register a checkpoint, evaluate it, move `champion` when the gate passes.

    lidit promote --checkpoint out/run/checkpoint_000500   # register (-> candidate), evaluate, gate
    lidit promote                                         # gate the current candidate
    lidit promote --version 7 --force                     # move champion regardless (recorded)
    lidit promote --rollback [--version 5]                # champion back to the version it replaced

The gate compares the candidate's benchmark score with the champion's on the same benchmark (scores are
`lidit.eval.*` version tags; a version without one is evaluated first) and promotes when the candidate
beats it by more than `margin`. The read-compare-write runs under the registry's promotion lock.
"""

from __future__ import annotations

import logging

from lidit.jobs.evaluate.spec import EvaluateSpec, PromoteSpec
from lidit.platform.config import LiditError

log = logging.getLogger(__name__)


def _evaluate(spec: PromoteSpec, version: str) -> None:
    from lidit.jobs.evaluate.driver import evaluate

    evaluate(EvaluateSpec(model=f"models:/{spec.tracking.registered_model}/{version}",
                          **spec.settings().model_dump()))


def promote(spec: PromoteSpec):
    """Register (optional), evaluate what lacks a score, gate; returns the registry `Decision`. With
    `rollback`, move champion back instead (to `version`, or to the version it replaced)."""
    from lidit.platform import registry, storage, tracking

    uri = tracking.tracking_uri(spec.tracking, spec.workdir)
    name = spec.tracking.registered_model
    version = str(spec.version) if spec.version is not None else None
    if spec.rollback:
        return registry.rollback(uri, name, version)
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
