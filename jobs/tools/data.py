"""`lidit data make-shapes DIR`: the synthetic shapes data set (WebDataset shards)."""

from __future__ import annotations

import argparse
import json

from lidit.platform.config import LiditError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    shapes = sub.add_parser("make-shapes", help="coloured shapes with compositional captions and a held-out split")
    shapes.add_argument("out", help="local folder or s3:// prefix")
    shapes.add_argument("--train", type=int, default=2000, help="training samples")
    shapes.add_argument("--heldout", type=int, default=200, help="held-out samples (unseen attribute combinations)")
    shapes.add_argument("--size", type=int, default=32, help="image side in pixels")
    shapes.add_argument("--shard-size", type=int, default=250, help="samples per tar shard")
    shapes.add_argument("--heldout-percent", type=int, default=10, help="share of attribute combinations held out")
    shapes.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from lidit.pipelines.shapes import write_shapes

    for name in ("train", "heldout", "size", "shard_size"):
        if getattr(args, name) < (8 if name == "size" else 1):
            raise LiditError(f"--{name.replace('_', '-')} must be at least {8 if name == 'size' else 1}")
    if not 0 < args.heldout_percent < 100:
        raise LiditError("--heldout-percent must be between 1 and 99")
    manifest = write_shapes(args.out, train=args.train, heldout=args.heldout, size=args.size,
                            shard_size=args.shard_size, seed=args.seed, heldout_percent=args.heldout_percent)
    print(json.dumps(manifest["splits"], indent=2))
    return 0
