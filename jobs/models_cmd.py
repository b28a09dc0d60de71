"""`lidit models ...`: build the tiny offline LLMs (and import real ones)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    tiny = sub.add_parser("make-tiny", help="build a tiny Llama- and a tiny Qwen2-architecture causal LM offline")
    tiny.add_argument("out", help="folder to write the models into (one subfolder per model)")
    tiny.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.action == "make-tiny":
        from lidit.models.tiny_llms import make_tiny_llms

        print(json.dumps(make_tiny_llms(args.out, seed=args.seed), indent=2))
    return 0
