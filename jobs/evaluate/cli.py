"""`lidit evaluate [SPEC.yaml]` and `lidit promote [SPEC.yaml]`; `--json` prints the result as the last line."""

from __future__ import annotations

import argparse
import dataclasses

from lidit.jobs.commands import Command, Flag
from lidit.jobs.evaluate.spec import EvaluateSpec, PromoteSpec


def evaluate(spec: EvaluateSpec, args: argparse.Namespace) -> dict:
    from lidit.jobs.evaluate.driver import evaluate

    result = evaluate(spec)
    print(f"lidit evaluate: results in {result.output}" + (f", MLflow run {result.run_id}" if result.run_id else ""))
    return {k: v for k, v in dataclasses.asdict(result).items() if k != "rows"}


def promote(spec: PromoteSpec, args: argparse.Namespace) -> dict:
    from lidit.jobs.evaluate.promote import describe, promote

    decision = promote(spec)
    print(describe(decision))
    return dataclasses.asdict(decision)


EVALUATE = Command(evaluate, spec=EvaluateSpec, config="evaluate.yaml", flags=("--model",))
PROMOTE = Command(promote, spec=PromoteSpec, config="promote.yaml", own_flags={
    "--checkpoint": Flag("checkpoint", "register this checkpoint folder first"),
    "--version": Flag("version", "gate this version (with --rollback: roll back to it)"),
    "--force": Flag("force", "move champion without the gate (recorded)", const=True),
    "--rollback": Flag("rollback", "move champion back to the version it replaced", const=True),
})
