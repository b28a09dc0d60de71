"""`lidit bench NAME`: benchmarks. Each prints a readable table and, with `--json`, one JSON object as its
last line. Each lives in `lidit.jobs.bench.<name>` with `add_arguments(parser)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib

from lidit.jobs.commands import Command

BENCHMARKS = {
    "model": "LI-DiT forward+backward images/s and TFLOP/s next to diffusers' PixArt transformer",
    "precompute": "captions/s and tokens/s: naive loop vs batched prefix-cached loop vs Ray Data pipeline",
    "train": "train loop fed from Parquet vs from in-memory tensors: images/s, data-wait fraction",
    "serve": "closed-loop HTTP load at 1/4/16 clients, batched vs unbatched deployment",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, help_text in BENCHMARKS.items():
        bench = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(f"lidit.jobs.bench.{name}")
        module.add_arguments(bench)
        bench.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        bench.set_defaults(_bench=module.run)


def run(args: argparse.Namespace) -> int:
    return args._bench(args)


BENCH = Command(run, add_arguments=add_arguments)
