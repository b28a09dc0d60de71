"""`lidit submit` and `lidit jobs` against real Ray heads started here (`ray start --head` on 127.0.0.1 from the
project's venv, free ports, a private temp dir) and stopped here: only this head's processes are ended."""

from __future__ import annotations

import io
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from lidit.platform import submission
from lidit.platform.cli import main

VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    address: str
    temp_dir: Path
    pgid: int

    def processes(self) -> list[psutil.Process]:
        """Every process of this head: its process group, their descendants (job drivers run in their own
        sessions) and anything naming its temp dir."""
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                mine = os.getpgid(proc.pid) == self.pgid or str(self.temp_dir) in " ".join(proc.info["cmdline"] or [])
            except (psutil.Error, ProcessLookupError):
                continue
            if mine:
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        return list(found.values())

    def stop(self) -> None:
        procs = self.processes()
        for proc in procs:
            with _ignore_gone():
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=3)
        for proc in alive:
            with _ignore_gone():
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class _ignore_gone:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, psutil.NoSuchProcess)


def start_head(token: str | None = None, num_cpus: int = 2) -> RayHead:
    """`ray start --head` from this venv on 127.0.0.1, token auth only when `token` is given."""
    temp_dir = Path(tempfile.mkdtemp(prefix="lidit-rh-", dir="/tmp"))  # short: Ray's socket paths are limited
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_API_SERVER"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token" if token else "disabled")
    if token:
        env["RAY_AUTH_TOKEN"] = token
    dashboard = _free_port()
    command = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
               "--port", str(_free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
               "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
               "--num-cpus", str(num_cpus), "--temp-dir", str(temp_dir), "--include-dashboard", "true",
               "--disable-usage-stats"]
    log = temp_dir / "ray-start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dashboard}", temp_dir, proc.pid)
    try:
        if proc.wait(timeout=120) != 0:
            raise RuntimeError(f"ray start failed:\n{log.read_text()[-3000:]}")
        _wait_dashboard(head.address, token)
    except BaseException:
        head.stop()
        raise
    return head


def _wait_dashboard(address: str, token: str | None, timeout: float = 60) -> None:
    request = urllib.request.Request(f"{address}/api/version",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise TimeoutError(f"{address} did not answer within {timeout:.0f}s")


def lidit(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the `lidit` CLI in this process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# --- token auth: its own head, first in the file so that two heads never run at once --------------------------

@pytest.mark.slow
def test_token_auth_head_needs_the_token(tmp_path, capsys, monkeypatch):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token to fall back on
    token = secrets.token_hex(16)
    head = start_head(token=token, num_cpus=1)
    try:
        code, _, err = lidit(capsys, "jobs", "list", "--address", head.address)
        assert code == 1
        assert err.count("\n") == 1 and "requires a Ray auth token" in err

        monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
        code, _, err = lidit(capsys, "jobs", "list", "--address", head.address)
        assert code == 1
        assert err.count("\n") == 1 and "rejected the Ray auth token from $RAY_AUTH_TOKEN" in err
        monkeypatch.delenv("RAY_AUTH_TOKEN")

        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
        cluster = submission.connect(head.address, str(token_file))
        out_dir = tmp_path / "shapes"
        job_id = submission.submit(cluster, "data", None, command=(
            f"python -m lidit.platform.cli data make-shapes {out_dir} --train 8 --heldout 4 --shard-size 8"))
        code, out, _ = lidit(capsys, "jobs", "logs", job_id, "--follow", "--address", head.address,
                             "--token-file", str(token_file))
        assert code == 0, out
        assert f"{job_id}: SUCCEEDED" in out and '"train"' in out
        assert (out_dir / "dataset.json").is_file()
    finally:
        head.stop()
    assert head.processes() == []


# --- a head without token auth, shared by the tests below ----------------------------------------------------

@pytest.fixture(scope="module")
def ray_head():
    head = start_head()
    yield head
    head.stop()
    assert head.processes() == []


def test_unreachable_address_is_one_line(capsys):
    code, _, err = lidit(capsys, "jobs", "list", "--address", f"http://127.0.0.1:{_free_port()}")
    assert code == 1
    assert err.count("\n") == 1 and "cannot reach the Ray Jobs API at http://127.0.0.1:" in err


def test_address_must_be_the_dashboard_url(capsys):
    code, _, err = lidit(capsys, "jobs", "list", "--address", "ray://127.0.0.1:10001")
    assert code == 1
    assert "expected the Ray dashboard URL" in err


@pytest.mark.slow
def test_the_job_runs_the_shipped_code(ray_head, tmp_path):
    cluster = submission.connect(ray_head.address)
    probe = "import lidit.jobs, lidit.platform.cli, os; print('CODE', lidit.jobs.__file__); print('CWD', os.listdir())"
    job_id = submission.submit(cluster, "probe", "answer: 42\n", command=f'python -c "{probe}"')
    assert submission.wait(cluster, job_id, timeout_s=120) == "SUCCEEDED"
    lines = dict(line.split(" ", 1) for line in submission.logs(cluster, job_id).splitlines()
                 if line.startswith(("CODE ", "CWD ")))
    shipped = Path(lines["CODE"])
    assert str(ray_head.temp_dir) in str(shipped) and "runtime_resources" in str(shipped)
    assert not str(shipped).startswith(str(Path(submission.__file__).parents[1]))
    assert lines["CWD"] == "['spec.yaml']"


@pytest.mark.slow
def test_make_shapes_job_succeeds_and_lists(ray_head, tmp_path, capsys):
    cluster = submission.connect(ray_head.address)
    out_dir = tmp_path / "shapes"
    job_id = submission.submit(cluster, "data", None, command=(
        f"python -m lidit.platform.cli data make-shapes {out_dir} --train 16 --heldout 8 --shard-size 8"))
    code, out, _ = lidit(capsys, "jobs", "logs", job_id, "--follow", "--address", ray_head.address)
    assert code == 0 and f"{job_id}: SUCCEEDED" in out
    assert sorted(p.name for p in out_dir.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]

    code, out, _ = lidit(capsys, "jobs", "list", "--json", "--address", ray_head.address)
    listed = {job["id"]: job for job in json.loads(out)}
    assert code == 0 and listed[job_id]["status"] == "SUCCEEDED" and listed[job_id]["job"] == "data"
    code, out, _ = lidit(capsys, "jobs", "list", "--address", ray_head.address)
    assert out.splitlines()[0].split() == ["ID", "STATUS", "JOB", "STARTED", "TIME"] and job_id in out
    code, out, _ = lidit(capsys, "jobs", "status", job_id, "--address", ray_head.address)
    assert code == 0 and out.startswith(f"{job_id}: SUCCEEDED")
    code, out, _ = lidit(capsys, "jobs", "logs", job_id, "--address", ray_head.address)
    assert code == 0 and '"heldout"' in out


class _Lines(io.StringIO):
    """A thread-safe enough text sink: `follow` writes whole chunks, the test reads `getvalue()`."""


@pytest.mark.slow
def test_logs_stream_while_the_job_runs_and_stop_works(ray_head, capsys):
    cluster = submission.connect(ray_head.address)
    ticker = "import time\nfor i in range(600):\n    print('tick', i, flush=True)\n    time.sleep(0.2)"
    job_id = submission.submit(cluster, "ticker", None, command=f"python -c {shlex.quote(ticker)}")
    streamed = _Lines()
    result: list[str] = []
    follower = threading.Thread(target=lambda: result.append(submission.follow(cluster, job_id, out=streamed)))
    follower.start()
    deadline = time.monotonic() + 60
    while "tick 3\n" not in streamed.getvalue():  # lines arrive while the job is still running
        assert time.monotonic() < deadline and follower.is_alive(), streamed.getvalue()
        time.sleep(0.2)
    assert submission.status(cluster, job_id) == "RUNNING"
    started = time.monotonic()
    code, out, _ = lidit(capsys, "jobs", "stop", job_id, "--address", ray_head.address)
    assert code == 0 and out.strip() == f"{job_id}: STOPPED"
    assert time.monotonic() - started < 30
    follower.join(timeout=30)
    assert result == ["STOPPED"]
    ticks = [int(line.split()[1]) for line in streamed.getvalue().splitlines() if line.startswith("tick ")]
    assert ticks == list(range(len(ticks))) and 3 < len(ticks) < 600


def test_unknown_job_id_is_one_line(ray_head, capsys):
    code, _, err = lidit(capsys, "jobs", "status", "lidit-nope", "--address", ray_head.address)
    assert code == 1
    assert err.strip() == f"lidit jobs: no job 'lidit-nope' on {ray_head.address}"
