"""Real servers on 127.0.0.1 for the test suite: an S3-compatible object store and an MLflow server.

S3: OpenStack Swift from Debian with its s3api middleware (scripts/install-system-deps.sh installs it), a
real object store with four server processes; moto's standalone server only where Swift cannot start (the
reason is printed). MLflow: `mlflow server` with a sqlite backend and its artifacts proxied to S3.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

SWIFT_SERVERS = ("account", "container", "object")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


@dataclass
class S3Server:
    endpoint_url: str
    key: str
    secret: str
    kind: str  # "swift" or "moto"
    procs: list[subprocess.Popen] = field(default_factory=list)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}))

    def bucket(self, name: str) -> str:
        """Create bucket `name` if needed and return its s3:// URI."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point s3fs, boto3 and MLflow at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ENDPOINT_URL_S3": self.endpoint_url,
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
                "AWS_RESPONSE_CHECKSUM_VALIDATION": "WHEN_REQUIRED"}

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _swift_confs(root: Path, ports: dict[str, int]) -> None:
    etc, devices = root / "etc", root / "srv"
    (devices / "d1").mkdir(parents=True, exist_ok=True)
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "swift.conf").write_text(
        "[swift-hash]\nswift_hash_path_suffix = lidit-tests\nswift_hash_path_prefix = lidit\n\n"
        "[storage-policy:0]\nname = Policy-0\ndefault = yes\n")
    common = (f"devices = {devices}\nmount_check = false\nbind_ip = 127.0.0.1\nworkers = 1\nuser = root\n"
              f"swift_dir = {etc}\nlog_address = /dev/null\nlog_level = WARNING\n")
    for server in SWIFT_SERVERS:
        (etc / f"{server}-server.conf").write_text(
            f"[DEFAULT]\n{common}bind_port = {ports[server]}\n\n[pipeline:main]\npipeline = {server}-server\n\n"
            f"[app:{server}-server]\nuse = egg:swift#{server}\n")
    filters = {"catch_errors": "catch_errors", "gatekeeper": "gatekeeper", "healthcheck": "healthcheck",
               "proxy-logging": "proxy_logging", "cache": "memcache", "listing_formats": "listing_formats",
               "copy": "copy", "slo": "slo", "dlo": "dlo"}
    text = (f"[DEFAULT]\nbind_ip = 127.0.0.1\nbind_port = {ports['proxy']}\nworkers = 1\nuser = root\n"
            f"swift_dir = {etc}\nlog_address = /dev/null\nlog_level = WARNING\n\n[pipeline:main]\n"
            "pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth "
            "copy slo dlo proxy-logging proxy-server\n\n"
            "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n\n"
            "[filter:s3api]\nuse = egg:swift#s3api\nlocation = us-east-1\n\n"
            "[filter:tempauth]\nuse = egg:swift#tempauth\nuser_test_tester = testing .admin\n\n")
    text += "".join(f"[filter:{name}]\nuse = egg:swift#{egg}\n\n" for name, egg in filters.items())
    (etc / "proxy-server.conf").write_text(text)
    for server in SWIFT_SERVERS:
        builder = str(etc / f"{server}.builder")
        for args in (["create", "10", "1", "1"], ["add", f"r1z1-127.0.0.1:{ports[server]}/d1", "100"], ["rebalance"]):
            subprocess.run(["swift-ring-builder", builder, *args], check=True, capture_output=True, cwd=etc)


def start_swift(root: Path, timeout: float = 60) -> S3Server:
    if not shutil.which("swift-proxy-server"):
        raise FileNotFoundError("swift-proxy-server not installed (run scripts/install-system-deps.sh)")
    ports = {name: free_port() for name in (*SWIFT_SERVERS, "proxy")}
    _swift_confs(root, ports)
    server = S3Server(f"http://127.0.0.1:{ports['proxy']}", "test:tester", "testing", "swift")
    log = root / "swift.log"
    with log.open("ab") as out:
        for name in (*SWIFT_SERVERS, "proxy"):
            server.procs.append(subprocess.Popen([f"swift-{name}-server", str(root / "etc" / f"{name}-server.conf")],
                                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        wait_http(f"{server.endpoint_url}/healthcheck", timeout, server.procs[-1], log)
        deadline = time.monotonic() + timeout  # the storage servers may answer a little after the proxy
        while True:
            try:
                server.bucket("lidit-healthcheck")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    except Exception:
        server.stop()
        raise
    return server


def start_moto(root: Path, timeout: float = 30) -> S3Server:
    port = free_port()
    log = root / "moto.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{port}", "testing", "testing", "moto", [proc])
    wait_http(f"{server.endpoint_url}/moto-api/", timeout, proc, log)
    return server


def start_s3(root: Path) -> S3Server:
    """Swift with s3api; moto's server only where Swift cannot start (says why on stderr)."""
    try:
        return start_swift(root / "swift")
    except Exception as err:
        print(f"\n[lidit tests] Swift could not start ({' '.join(str(err).split())[:300]}); "
              "falling back to moto's S3 server", file=sys.stderr)
        (root / "moto").mkdir(parents=True, exist_ok=True)
        return start_moto(root / "moto")


@dataclass
class MlflowServer:
    tracking_uri: str
    proc: subprocess.Popen

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_mlflow(root: Path, artifacts: str, env: dict[str, str], timeout: float = 90) -> MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store and artifacts proxied to `artifacts` (e.g. s3://...)."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server_env = {**os.environ, **env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                  "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    log = root / "mlflow.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                 "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                 "--artifacts-destination", artifacts],
                                stdout=out, stderr=subprocess.STDOUT, env=server_env, start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", proc)
    try:
        wait_http(f"{server.tracking_uri}/health", timeout, proc, log)
    except Exception:
        server.stop()
        raise
    return server
