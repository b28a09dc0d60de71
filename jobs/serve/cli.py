"""`lidit serve [SPEC.yaml]`: serve until Ctrl-C, then delete the application.

`--model` is a registry URI (followed as the alias moves) or a local folder (its newest checkpoint).
When the application answers, one line says where (with `--json`: one JSON object).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from lidit.jobs.commands import Command, Flag
from lidit.jobs.serve.spec import ServeSpec


def run(spec: ServeSpec, args: argparse.Namespace) -> None:
    from lidit.jobs.serve.deploy import serve

    served = serve(spec)
    ready = {"url": served.url, "name": served.ref.name, "version": served.ref.version,
             "playground": f"{served.url}/", "api": f"{served.url}/v1/images"}
    print(json.dumps(ready) if args.json else
          f"lidit serve: {served.ref.name} version {served.ref.version} at {served.url}/  (playground at "
          f"{served.url}/, API at {served.url}/v1/images; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("lidit serve: stopping", file=sys.stderr, flush=True)
    finally:
        served.stop()


SERVE = Command(run, spec=ServeSpec, config="serve.yaml", flags=("--model",), own_flags={
    "--host": Flag("host", "bind address"),
    "--port": Flag("port", "HTTP port"),
})
