"""Ray Jobs API client: submit lidit jobs to a Ray cluster, list them, follow their logs, stop them.

A job travels as a runtime_env: `working_dir` holds the validated spec (the job's working directory on the
cluster) and, unless the cluster image already has lidit installed, `py_modules` carries a copy of the four
lidit folders, so the cluster runs exactly the code that validated the spec here. Every failure the user can
fix (unreachable address, missing or rejected auth token, unknown job id) is a one-line `LiditError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lidit.platform.config import LiditError

log = logging.getLogger(__name__)

CODE_FOLDERS = ("platform", "models", "pipelines", "jobs")
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
SPEC_FILE = "spec.yaml"
_ADDRESS_HELP = "expected the Ray dashboard URL, e.g. http://HEAD:8265"
_CONNECT_TIMEOUT_S = 10.0


def resolve_address(address: str | None) -> str:
    """The Jobs API URL: `address`, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS; `host:port` gets http://."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise LiditError(f"no cluster address: pass --address ({_ADDRESS_HELP}) or set RAY_API_SERVER_ADDRESS")
    address = address.strip().rstrip("/")
    if "://" not in address and re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:\d+", address):
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise LiditError(f"--address {address}: {_ADDRESS_HELP}")
    return address


def resolve_token(token_file: str | None = None) -> tuple[str | None, str]:
    """(token, where it came from), in Ray's own order after an explicit file: --token-file, $RAY_AUTH_TOKEN,
    $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token. (None, 'none') when there is no token."""
    if token_file:
        return _read_token(Path(token_file).expanduser(), "--token-file"), f"--token-file {token_file}"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = os.environ["RAY_AUTH_TOKEN_PATH"]
        return _read_token(Path(path).expanduser(), "$RAY_AUTH_TOKEN_PATH"), f"$RAY_AUTH_TOKEN_PATH ({path})"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip(), str(default)
    return None, "none"


def _read_token(path: Path, source: str) -> str:
    if not path.is_file():
        raise LiditError(f"{source} {path}: no such token file")
    token = path.read_text().strip()
    if not token:
        raise LiditError(f"{source} {path}: the token file is empty")
    return token


@dataclass
class Cluster:
    """A connected Ray Jobs API client and how it authenticated (for error messages)."""

    address: str
    client: Any  # ray.job_submission.JobSubmissionClient
    token_source: str

    @contextlib.contextmanager
    def errors(self, job_id: str | None = None) -> Iterator[None]:
        """Turn the Jobs API's exceptions into one-line `LiditError`s."""
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as err:
            rejected = str(err).startswith("Authentication failed")  # 403; 401 reads "Authentication required"
            raise LiditError(_auth_message(self.address, self.token_source, rejected)) from None
        except ConnectionError:
            raise LiditError(f"cannot reach the Ray Jobs API at {self.address}") from None
        except RuntimeError as err:
            text = str(err)
            if "status code 404" in text and job_id is not None:
                raise LiditError(f"no job '{job_id}' on {self.address}") from None
            first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
            raise LiditError(f"{self.address}: {first}") from None


def _auth_message(address: str, token_source: str, rejected: bool) -> str:
    if rejected:
        return f"{address} rejected the Ray auth token from {token_source}"
    return (f"{address} requires a Ray auth token (token auth is on by default in Ray 2.60): "
            "set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or pass --token-file")


def connect(address: str | None = None, token_file: str | None = None) -> Cluster:
    """Check the Jobs API answers (with a timeout, so a black-holed address fails fast) and return a client."""
    import requests

    url = resolve_address(address)
    token, source = resolve_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = requests.get(f"{url}/api/version", headers=headers, timeout=_CONNECT_TIMEOUT_S)
    except requests.RequestException as err:
        reason = "connection failed" if isinstance(err, requests.ConnectionError) else type(err).__name__
        raise LiditError(f"cannot reach the Ray Jobs API at {url} ({reason})") from None
    if response.status_code in (401, 403):
        raise LiditError(_auth_message(url, source, response.status_code == 403))
    try:
        cluster_ray = response.json()["ray_version"] if response.status_code == 200 else None
    except (ValueError, KeyError, TypeError):
        cluster_ray = None
    if cluster_ray is None:
        raise LiditError(f"{url} is not a Ray Jobs API (GET /api/version answered HTTP {response.status_code}); "
                         f"{_ADDRESS_HELP}")
    import ray
    from ray.job_submission import JobSubmissionClient

    if cluster_ray != ray.__version__:
        log.warning("the cluster runs Ray %s, this client Ray %s: jobs may fail to start", cluster_ray, ray.__version__)

    cluster = Cluster(url, None, source)
    with cluster.errors():
        cluster.client = JobSubmissionClient(url, headers=headers)
    return cluster


def package_code(dest: Path) -> Path:
    """Copy the lidit folders this process imports from into `dest/lidit` (a namespace package, like the
    installed one) and return that folder, ready for `py_modules`."""
    root = dest / "lidit"
    for folder in CODE_FOLDERS:
        spec = importlib.util.find_spec(f"lidit.{folder}")
        if spec is None or not spec.submodule_search_locations:
            raise LiditError(f"cannot find the code of lidit.{folder} to ship to the cluster")
        source = Path(list(spec.submodule_search_locations)[0])
        shutil.copytree(source, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def runtime_env(stage: Path, spec_yaml: str | None, ship_code: bool = True,
                env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """The runtime_env of a lidit job, staged under `stage`: the spec as `working_dir/spec.yaml`, the code in
    `py_modules` (when `ship_code`), and extra environment variables."""
    work = stage / "job"
    work.mkdir(parents=True)
    if spec_yaml is not None:
        (work / SPEC_FILE).write_text(spec_yaml)
    env: dict[str, Any] = {"working_dir": str(work)}
    if ship_code:
        env["py_modules"] = [str(package_code(stage / "code"))]
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def new_submission_id(job: str) -> str:
    return f"lidit-{job}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def submit(cluster: Cluster, job: str, command: str, spec_yaml: str | None, *, ship_code: bool = True,
           env_vars: dict[str, str] | None = None, metadata: dict[str, str] | None = None,
           submission_id: str | None = None) -> str:
    """Submit one job and return its id. `command` is the entrypoint the cluster runs in the job's working
    directory, where the spec (if any) is `SPEC_FILE`."""
    submission_id = submission_id or new_submission_id(job)
    with tempfile.TemporaryDirectory(prefix="lidit-submit-") as stage:
        env = runtime_env(Path(stage), spec_yaml, ship_code, env_vars)
        with cluster.errors():
            return cluster.client.submit_job(entrypoint=command, runtime_env=env,
                                             submission_id=submission_id,
                                             metadata={"lidit_job": job, **(metadata or {})})


def list_jobs(cluster: Cluster) -> list[Any]:
    """Submitted jobs (not bare `ray.init` drivers), oldest first."""
    with cluster.errors():
        jobs = cluster.client.list_jobs()
    jobs = [j for j in jobs if j.submission_id]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def info(cluster: Cluster, job_id: str) -> Any:
    with cluster.errors(job_id):
        return cluster.client.get_job_info(job_id)


def status(cluster: Cluster, job_id: str) -> str:
    with cluster.errors(job_id):
        return str(cluster.client.get_job_status(job_id).value)


def logs(cluster: Cluster, job_id: str) -> str:
    with cluster.errors(job_id):
        return cluster.client.get_job_logs(job_id)


def follow(cluster: Cluster, job_id: str, out: IO[str] | None = None) -> str:
    """Stream the job's logs to `out` (default stdout) until it ends; return its final status."""
    out = out or sys.stdout
    status(cluster, job_id)  # a clear error for an unknown id before opening the stream

    async def tail() -> None:
        async for chunk in cluster.client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    with cluster.errors(job_id):
        asyncio.run(tail())
    return wait(cluster, job_id, timeout_s=30.0)


def wait(cluster: Cluster, job_id: str, timeout_s: float = 600.0, poll_s: float = 0.5) -> str:
    """Poll until the job reaches SUCCEEDED, FAILED or STOPPED (or `timeout_s` passes); return the status."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = status(cluster, job_id)
        if current in TERMINAL or time.monotonic() > deadline:
            return current
        time.sleep(poll_s)


def stop(cluster: Cluster, job_id: str, timeout_s: float = 60.0) -> str:
    """Ask the cluster to stop the job and wait until it has; return the final status."""
    with cluster.errors(job_id):
        cluster.client.stop_job(job_id)
    return wait(cluster, job_id, timeout_s=timeout_s)
