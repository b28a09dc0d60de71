"""`lidit demo`: the whole life of a model on embedded defaults.

Built so far: the offline tiny LLMs and the synthetic shapes data. Precompute, training, evaluation,
promotion and serving join as those jobs land (see the open issues); the demo says which stages ran.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=".lidit/demo", help="folder for every output of the demo")


def run(args: argparse.Namespace) -> int:
    from lidit.models.tiny_llms import make_tiny_llms
    from lidit.pipelines.shapes import write_shapes

    workdir = Path(args.workdir).resolve()
    print(f"lidit demo: outputs go under {workdir}")
    start = time.monotonic()
    llms = make_tiny_llms(workdir / "llms")
    print(f"[1/5] tiny LLMs ready: {', '.join(llms)} ({time.monotonic() - start:.1f}s)")
    data = workdir / "data" / "shapes"
    if not (data / "dataset.json").exists():
        write_shapes(str(data))
    print(f"[1/5] synthetic shapes data ready: {data} ({time.monotonic() - start:.1f}s)")
    print("stages 2-5 (precompute, train, evaluate + promote, serve) are not built yet: see the open issues")
    return 0
