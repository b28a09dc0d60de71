"""`lidit demo [SPEC.yaml]` and `lidit ablate [SPEC.yaml]`; `--json` prints the result as the last line."""

from __future__ import annotations

import argparse
import time

from lidit.jobs.commands import Command, Flag
from lidit.jobs.experiments.ablate import AblateSpec
from lidit.jobs.experiments.demo import DemoSpec


def demo(spec: DemoSpec, args: argparse.Namespace) -> dict:
    from lidit.jobs.experiments.demo import run_demo

    start = time.monotonic()
    try:
        summary = run_demo(spec)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    print(f"lidit demo: finished in {time.monotonic() - start:.0f}s; stage times (s): "
          + ", ".join(f"{k} {v}" for k, v in summary["timings_s"].items()))
    return summary


def ablate(spec: AblateSpec, args: argparse.Namespace) -> dict:
    from lidit.jobs.experiments.ablate import run_ablation
    from lidit.jobs.experiments.ablate_report import log_ablation, report

    start = time.monotonic()
    outcomes, data = run_ablation(spec)
    wall_s = time.monotonic() - start
    text = report(outcomes)
    run_id = log_ablation(spec, outcomes, text, {"data": data, "wall_s": round(wall_s, 1)})
    print(text)
    print(f"lidit ablate: {len(outcomes)} rows in {wall_s / 60:.1f} min; MLflow run {run_id} "
          f"(experiment {spec.tracking.experiment}), artifact ablation.md")
    return {"run_id": run_id, "wall_s": round(wall_s, 1), "data": data,
            "variants": [{"variant": o.variant, "kind": o.kind, "llms": o.llms, "scores": o.scores} for o in outcomes]}


DEMO = Command(demo, spec=DemoSpec, config="demo.yaml", flags=("--workdir", "--encoders"), own_flags={
    "--no-wait": Flag("wait", "stop serving after the first image", const=False),
})
ABLATE = Command(ablate, spec=AblateSpec, config="ablate.yaml", flags=("--workdir", "--encoders"))
