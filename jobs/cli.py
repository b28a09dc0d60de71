"""The `lidit` command line: one entry point, one sub-command per job.

Each command lives in a module `lidit.jobs.<module>` exposing `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only for the command being run, so `lidit --help` is fast
and a command's heavy imports (torch, ray, mlflow) never slow down the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from lidit.platform.config import LiditError, SpecError

# command -> (module under lidit.jobs, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "run the whole life of a model on embedded defaults (data, precompute, train, evaluate, promote, serve)"),
    "precompute": ("precompute", "Ray Data: WebDataset shards -> multi-LLM hidden states + image latents as Parquet"),
    "train": ("train", "Ray Train: train LI-DiT on precomputed Parquet shards, tracked in MLflow"),
    "evaluate": ("evaluate", "prompt-following benchmark and positional-bias probe for a checkpoint or model version"),
    "promote": ("promote", "register a checkpoint, evaluate it and move the champion alias when the gate passes"),
    "ablate": ("ablate", "train and evaluate the paper's encoder variants on the same data and budget"),
    "serve": ("serve", "Ray Serve text-to-image endpoint for a registered model alias"),
    "submit": ("submit", "submit a job spec to a Ray cluster through the Ray Jobs API"),
    "jobs": ("jobs_cmd", "list, inspect, follow and stop jobs on a Ray cluster"),
    "bench": ("bench", "benchmarks: model, precompute, train, serve"),
    "models": ("models_cmd", "build tiny offline LLMs, import GGUF LLMs"),
    "data": ("data_cmd", "make synthetic data sets"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lidit",
        description="LI-DiT platform: LLM-prompted diffusion transformers on Ray and MLflow.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'lidit COMMAND --help' for a command's options.",
    )
    parser.add_argument("--log-level", default=os.environ.get("LIDIT_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def build_parser(command: str) -> argparse.ArgumentParser:
    """The full parser for one command (imports only that command's module)."""
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(f"lidit.jobs.{module_name}")
    parser = argparse.ArgumentParser(prog=f"lidit {command}", description=help_text)
    parser.add_argument("--log-level", default=os.environ.get("LIDIT_LOG_LEVEL", "INFO"))
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)
    return parser


def add_spec_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The spec file and `--set` overrides every spec-driven job takes."""
    parser.add_argument("spec", nargs=None if required else "?", help="YAML job spec")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. --set model.preset=tiny (repeatable)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    # find the command: the first argument that is not a top-level option
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is None or command not in COMMANDS:
        if command is not None:
            top.error(f"unknown command '{command}' (choose from {', '.join(COMMANDS)})")
        top.print_help()
        return 0 if ("-h" in argv or "--help" in argv) else 2
    index = argv.index(command)
    parser = build_parser(command)
    args = parser.parse_args(argv[:index] + argv[index + 1:])
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except SpecError as err:
        print(f"lidit {command}: bad spec: {err}", file=sys.stderr)
        return 2
    except LiditError as err:
        print(f"lidit {command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lidit {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
