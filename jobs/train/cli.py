"""`lidit train [SPEC.yaml]`: train or resume a run; `--json` prints its result as the last line."""

from __future__ import annotations

import argparse
import dataclasses

from lidit.jobs.commands import Command
from lidit.jobs.train.spec import TrainSpec


def run(spec: TrainSpec, args: argparse.Namespace) -> dict:
    from lidit.jobs.train.driver import train

    result = train(spec)
    print(f"lidit train: run {result.run_id} finished at step {result.final_step}; "
          f"checkpoint {result.checkpoint_uri}")
    for key in ("loss", "images_per_s", "data_wait_fraction"):
        if key in result.metrics:
            print(f"  {key}: {result.metrics[key]:.4g}")
    return dataclasses.asdict(result)


TRAIN = Command(run, spec=TrainSpec, config="train.yaml")
