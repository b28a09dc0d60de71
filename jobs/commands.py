"""The table of `lidit` commands and the shape every job command shares.

A command is a `Command` object in the job's subpackage (`lidit.jobs.<role>.cli`), named here by its
import path so that only the command being run is imported (`lidit --help` stays fast and a command's
heavy imports never slow down the others). A job command takes an optional YAML spec (its packaged
default in jobs/configs/), `--set key.sub=value`, `--json` (one JSON object as the last line) and a few
flags that are shorthands for spec fields, each flag meaning the same in every command.
"""

from __future__ import annotations

import argparse
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lidit.platform.config import Spec, SpecError, load_spec

CONFIGS = Path(__file__).parent / "configs"

# command -> (import path of its Command, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("lidit.jobs.experiments.cli:DEMO",
             "run the whole life of a model on embedded defaults (data, precompute, train, evaluate, promote, serve)"),
    "precompute": ("lidit.jobs.precompute.cli:PRECOMPUTE",
                   "Ray Data: WebDataset shards -> multi-LLM hidden states + image latents as Parquet"),
    "train": ("lidit.jobs.train.cli:TRAIN", "Ray Train: train LI-DiT on precomputed Parquet shards, tracked in MLflow"),
    "evaluate": ("lidit.jobs.evaluate.cli:EVALUATE",
                 "prompt-following benchmark and positional-bias probe for a checkpoint or model version"),
    "promote": ("lidit.jobs.evaluate.cli:PROMOTE",
                "register a checkpoint, evaluate it and move the champion alias when the gate passes"),
    "ablate": ("lidit.jobs.experiments.cli:ABLATE",
               "train and evaluate the paper's encoder variants on the same data and budget"),
    "serve": ("lidit.jobs.serve.cli:SERVE", "Ray Serve text-to-image endpoint for a registered model alias"),
    "submit": ("lidit.jobs.cluster.cli:SUBMIT", "submit a job spec to a Ray cluster through the Ray Jobs API"),
    "jobs": ("lidit.jobs.cluster.cli:JOBS", "list, inspect, follow and stop jobs on a Ray cluster"),
    "bench": ("lidit.jobs.bench.cli:BENCH", "benchmarks: model, precompute, train, serve"),
    "models": ("lidit.jobs.tools.cli:MODELS", "build tiny offline LLMs, import GGUF LLMs"),
    "data": ("lidit.jobs.tools.cli:DATA", "make synthetic data sets"),
}


@dataclass(frozen=True)
class Flag:
    """A command-line shorthand for `--set FIELD=VALUE` (or, with `const`, a flag without a value)."""

    field: str
    help: str
    const: Any = None


# Flags shared by several commands, one meaning each.
FLAGS: dict[str, Flag] = {
    "--workdir": Flag("workdir", "folder for every local output"),
    "--encoders": Flag("encoders", "encoder preset: real (SmolLM2 + Gemma-3) or tiny (two tiny random LLMs)"),
    "--model": Flag("model", "checkpoint folder (local or s3://) or models:/NAME@ALIAS | models:/NAME/VERSION"),
}


@dataclass(frozen=True)
class Command:
    """One `lidit` command. Job commands give `spec` (+ `config`, the packaged default spec) and
    `run(spec, args) -> dict | None`, whose dict is printed as the `--json` line; other commands give
    `run(args) -> int` and their own `add_arguments`."""

    run: Callable[..., Any]
    spec: type[Spec] | None = None
    config: str | None = None  # file name under jobs/configs/
    flags: tuple[str, ...] = ()  # shared FLAGS this command takes
    own_flags: dict[str, Flag] = field(default_factory=dict)  # flags only this command has
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None

    def all_flags(self) -> dict[str, Flag]:
        return {flag: FLAGS[flag] for flag in self.flags} | self.own_flags


def load(name: str) -> Command:
    """The `Command` of `lidit NAME` (imports only its module)."""
    path, _ = COMMANDS[name]
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def spec_class(name: str) -> type[Spec]:
    """The spec class of a job command (what `lidit submit` validates a spec with)."""
    if name not in COMMANDS:
        raise SpecError(f"unknown job '{name}' (choose from {', '.join(COMMANDS)})")
    command = load(name)
    if command.spec is None:
        raise SpecError(f"job '{name}' takes no spec file")
    return command.spec


def default_config(command: Command) -> Path | None:
    return CONFIGS / command.config if command.config else None


def add_job_arguments(parser: argparse.ArgumentParser, command: Command) -> None:
    """The shape every job command shares: [SPEC] --set KEY=VALUE --json, plus its flags."""
    default = default_config(command)
    parser.add_argument("spec", nargs="?", default=str(default) if default else None,
                        help="YAML job spec" + (f" (default: the packaged {command.config})" if default else ""))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object (last line)")
    for name, flag in command.all_flags().items():
        if flag.const is None:
            parser.add_argument(name, dest=_dest(name), default=None, metavar=flag.field.upper().replace(".", "_"),
                                help=f"{flag.help} (--set {flag.field}=...)")
        else:
            parser.add_argument(name, dest=_dest(name), action="store_const", const=flag.const, default=None,
                                help=f"{flag.help} (--set {flag.field}={json.dumps(flag.const)})")
    if command.add_arguments is not None:
        command.add_arguments(parser)


def _dest(flag: str) -> str:
    return "flag_" + flag.lstrip("-").replace("-", "_")


def job_spec(command: Command, args: argparse.Namespace) -> Spec:
    """The validated spec: the YAML file, then `--set` overrides, then flags (flags are `--set` shorthands)."""
    overrides = list(args.overrides)
    for name, flag in command.all_flags().items():
        value = getattr(args, _dest(name))
        if value is not None:
            overrides.append(f"{flag.field}={str(value).lower() if isinstance(value, bool) else value}")
    return load_spec(command.spec, args.spec, overrides)
