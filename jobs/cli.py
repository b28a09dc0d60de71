"""The `lidit` command line: one entry point, one sub-command per job (the table is `lidit.jobs.commands`).

Global options (`--log-level`) parse before or after the command. Errors the user can fix end in one
line on stderr: exit code 2 for a bad spec or flag, 1 for a failure (`LiditError`), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from lidit.jobs import commands
from lidit.platform.config import LiditError, SpecError


def _global_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--log-level", default=os.environ.get("LIDIT_LOG_LEVEL", "INFO"),
                        help="logging level: DEBUG, INFO, WARNING, ERROR (default: $LIDIT_LOG_LEVEL or INFO)")
    return parser


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lidit", parents=[_global_options()],
        description="LI-DiT platform: LLM-prompted diffusion transformers on Ray and MLflow.",
        epilog="Run 'lidit COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in commands.COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def build_parser(name: str) -> tuple[argparse.ArgumentParser, commands.Command]:
    """The full parser for one command (imports only that command's module)."""
    command = commands.load(name)
    parser = argparse.ArgumentParser(prog=f"lidit {name}", description=commands.COMMANDS[name][1],
                                     parents=[_global_options()])
    if command.spec is not None:
        commands.add_job_arguments(parser, command)
    elif command.add_arguments is not None:
        command.add_arguments(parser)
    return parser, command


def _run(name: str, command: commands.Command, args: argparse.Namespace) -> int:
    if command.spec is None:
        return int(command.run(args) or 0)
    spec = commands.job_spec(command, args)
    result = command.run(spec, args)
    if args.json and result is not None:
        print(json.dumps(result, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    known, rest = _global_options().parse_known_args(argv)
    name = next((a for a in rest if not a.startswith("-")), None)
    if name is None or name not in commands.COMMANDS:
        top = _top_parser()
        if name is not None:
            top.error(f"unknown command '{name}' (choose from {', '.join(commands.COMMANDS)})")
        top.print_help()
        return 0 if ("-h" in rest or "--help" in rest) else 2
    rest.remove(name)
    parser, command = build_parser(name)
    args = parser.parse_args(rest)
    logging.basicConfig(level=known.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(name, command, args)
    except SpecError as err:
        print(f"lidit {name}: bad spec: {err}", file=sys.stderr)
        return 2
    except LiditError as err:
        print(f"lidit {name}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lidit {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
