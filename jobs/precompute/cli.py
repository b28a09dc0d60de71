"""`lidit precompute [SPEC.yaml]`: the summary on stdout; with `--json` the result as the last line."""

from __future__ import annotations

import argparse

from lidit.jobs.commands import Command
from lidit.jobs.precompute.spec import PrecomputeSpec


def run(spec: PrecomputeSpec, args: argparse.Namespace) -> dict:
    from lidit.jobs.precompute.driver import format_summary, precompute

    result = precompute(spec)
    print(format_summary(result))
    return result.to_dict()


PRECOMPUTE = Command(run, spec=PrecomputeSpec, config="precompute.yaml")
