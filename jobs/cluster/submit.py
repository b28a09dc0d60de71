"""`lidit submit JOB [SPEC.yaml] --address http://HEAD:8265`: run a job spec on a Ray cluster.

The spec is validated here, with the job command's own spec class, before anything is sent: a bad
spec fails with exit code 2 and never reaches the cluster. The spec travels as written (plus the `--set`
overrides), so defaults that read the environment resolve on the cluster. Paths in it are seen from the
cluster: use s3:// URIs or paths every node shares.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import yaml

from lidit.jobs import commands
from lidit.platform.config import SpecError, apply_overrides, load_spec

# The jobs a cluster runs from a spec; serving is a RayService (infra/kubernetes/rayservice.yaml) or `lidit serve`.
SUBMITTABLE = ("precompute", "train", "evaluate", "promote", "ablate")


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """The address and token options every cluster command takes."""
    parser.add_argument("--address", default=None,
                        help="Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")
    parser.add_argument("--token-file", default=None,
                        help="file holding the cluster's Ray auth token (default: $RAY_AUTH_TOKEN, "
                             "$RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", choices=SUBMITTABLE, help="which job the spec is for")
    parser.add_argument("spec", nargs="?", default=None, help="YAML job spec (default: the job's packaged spec)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. --set train.steps=100 (repeatable)")
    add_cluster_arguments(parser)
    parser.add_argument("--code", choices=("ship", "image"), default="ship",
                        help="ship: send this checkout's lidit code with the job (default); "
                             "image: use the lidit installed in the cluster's image")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job (repeatable)")
    parser.add_argument("--submission-id", default=None, help="job id to use (default: lidit-JOB-TIME-RANDOM)")
    parser.add_argument("--follow", action="store_true",
                        help="stream the job's logs until it ends; the exit code is 0 only if it SUCCEEDED")
    parser.add_argument("--json", action="store_true", help="print the job id and address as one JSON object")


def spec_path(job: str, path: str | None) -> str:
    """The spec file to ship: the given one, or the job's packaged default."""
    if path is not None:
        return path
    default = commands.default_config(commands.load(job))
    if default is None:
        raise SpecError(f"job '{job}' has no packaged spec: give SPEC.yaml")
    return str(default)


def resolved_spec(job: str, path: str, overrides: list[str]) -> str:
    """Validate the spec + overrides with the job's spec class and return the YAML to ship."""
    load_spec(commands.spec_class(job), path, overrides)  # raises SpecError naming the field
    data = yaml.safe_load(Path(path).read_text()) or {}
    return yaml.safe_dump(apply_overrides(data, overrides), sort_keys=False)


def entrypoint(job: str) -> str:
    """The command the cluster runs: the lidit CLI on the shipped spec, with the cluster's Python."""
    from lidit.platform.submission import SPEC_FILE

    return f"python -m lidit.jobs.cli {shlex.quote(job)} {SPEC_FILE}"


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--env {item!r}: expected KEY=VALUE")
        env[key.strip()] = value
    return env


def run(args: argparse.Namespace) -> int:
    import json

    from lidit.platform import submission

    path = spec_path(args.job, args.spec)
    spec_yaml = resolved_spec(args.job, path, args.overrides)
    env = parse_env(args.env)
    cluster = submission.connect(args.address, args.token_file)
    job_id = submission.submit(cluster, args.job, entrypoint(args.job), spec_yaml, ship_code=args.code == "ship",
                               env_vars=env, metadata={"lidit_spec": Path(path).name},
                               submission_id=args.submission_id)
    print(f"submitted {job_id} to {cluster.address}", flush=True)
    if args.json and not args.follow:
        print(json.dumps({"job_id": job_id, "address": cluster.address}))
        return 0
    if not args.follow:
        print(f"follow it with: lidit jobs logs {job_id} --follow --address {cluster.address}")
        return 0
    final = submission.follow(cluster, job_id)
    print(json.dumps({"job_id": job_id, "address": cluster.address, "status": final}) if args.json
          else f"{job_id}: {final}")
    return 0 if final == "SUCCEEDED" else 1
