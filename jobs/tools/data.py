"""`lidit data make-shapes OUT`: the synthetic shapes data set (WebDataset shards)."""

from __future__ import annotations

import argparse
import json

from lidit.pipelines.shapes import ShapesSpec
from lidit.platform.config import parse_spec

# flag -> ShapesSpec field; defaults, bounds and help come from the spec (one place)
_FLAGS = {"--train": "train", "--heldout": "heldout", "--image-size": "image_size", "--shard-size": "shard_size",
          "--heldout-percent": "heldout_percent", "--seed": "seed"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    shapes = sub.add_parser("make-shapes", help="coloured shapes with compositional captions and a held-out split")
    shapes.add_argument("out", help="local folder or s3:// prefix")
    for flag, name in _FLAGS.items():
        info = ShapesSpec.model_fields[name]
        shapes.add_argument(flag, type=int, default=info.default, help=f"{info.description or name} (default %(default)s)")
    shapes.add_argument("--json", action="store_true", help="print the data set manifest as one JSON line")


def run(args: argparse.Namespace) -> int:
    from lidit.pipelines.shapes import write_shapes

    spec = parse_spec(ShapesSpec, {name: getattr(args, flag[2:].replace("-", "_")) for flag, name in _FLAGS.items()},
                      source="make-shapes")
    manifest = write_shapes(args.out, spec)
    print(json.dumps(manifest) if args.json else json.dumps(manifest["splits"], indent=2))
    return 0
