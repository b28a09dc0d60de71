"""`lidit submit JOB SPEC.yaml --address http://HEAD:8265`: run a job spec on a Ray cluster.

The spec is validated here, with the job module's own spec class (`SPEC`), before anything is sent: a bad
spec fails with exit code 2 and never reaches the cluster. The spec travels as written (plus the `--set`
overrides), so defaults that read the environment resolve on the cluster. Paths in it are seen from the
cluster: use s3:// URIs or paths every node shares.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import yaml

from lidit.platform.cli import add_spec_arguments
from lidit.platform.config import LiditError, SpecError, apply_overrides, load_spec

# The jobs a cluster runs from a spec; serving is a RayService (infra/kuberay/rayservice.yaml) or `lidit serve`.
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
    add_spec_arguments(parser)
    add_cluster_arguments(parser)
    parser.add_argument("--code", choices=("ship", "image"), default="ship",
                        help="ship: send this checkout's lidit code with the job (default); "
                             "image: use the lidit installed in the cluster's image")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job (repeatable)")
    parser.add_argument("--submission-id", default=None, help="job id to use (default: lidit-JOB-TIME-RANDOM)")
    parser.add_argument("--follow", action="store_true",
                        help="stream the job's logs until it ends; the exit code is 0 only if it SUCCEEDED")


def spec_class(job: str) -> type:
    """The pydantic spec class a job module exposes as `SPEC`."""
    name = f"lidit.jobs.{job}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name in (name, "lidit.jobs"):
            raise LiditError(f"unknown job '{job}': this lidit has no {name} module yet") from None
        raise
    cls = getattr(module, "SPEC", None)
    if cls is None:
        raise LiditError(f"job '{job}' takes no spec file ({name} has no SPEC)")
    return cls


def resolved_spec(job: str, path: str, overrides: list[str]) -> str:
    """Validate the spec + overrides with the job's spec class and return the YAML to ship."""
    load_spec(spec_class(job), path, overrides)  # raises SpecError naming the field
    data = yaml.safe_load(Path(path).read_text()) or {}
    return yaml.safe_dump(apply_overrides(data, overrides), sort_keys=False)


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--env {item!r}: expected KEY=VALUE")
        env[key.strip()] = value
    return env


def run(args: argparse.Namespace) -> int:
    from lidit.platform import submission

    spec_yaml = resolved_spec(args.job, args.spec, args.overrides)
    env = parse_env(args.env)
    cluster = submission.connect(args.address, args.token_file)
    job_id = submission.submit(cluster, args.job, spec_yaml, ship_code=args.code == "ship", env_vars=env,
                               metadata={"lidit_spec": Path(args.spec).name}, submission_id=args.submission_id)
    print(f"submitted {job_id} to {cluster.address}", flush=True)
    if not args.follow:
        print(f"follow it with: lidit jobs logs {job_id} --follow --address {cluster.address}")
        return 0
    final = submission.follow(cluster, job_id)
    print(f"{job_id}: {final}")
    return 0 if final == "SUCCEEDED" else 1
