"""`lidit submit` and `lidit jobs` against real Ray heads started here (`ray start --head` on 127.0.0.1 from the
project's venv, free ports, a private temp dir) and stopped here: only this head's processes are ended."""

from __future__ import annotations

import io
import json
import os
import re
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
import yaml

from lidit.platform import submission
from lidit.jobs.cli import main

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
    token_file: Path | None = None

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


def start_head(token: str | None = None, num_cpus: int = 2, attempts: int = 2) -> RayHead:
    """`ray start --head` from this venv on 127.0.0.1, token auth only when `token` is given. Ray gives its
    raylet 30 s to register, which a machine loaded by other test sessions can miss: one more try then."""
    for attempt in range(attempts):
        try:
            return _start_head(token, num_cpus)
        except RuntimeError:
            if attempt == attempts - 1:
                raise


def _start_head(token: str | None, num_cpus: int) -> RayHead:
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


# --- one head for the module, with token auth on (Ray 2.60's default) ---------------------------------------

@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    token = secrets.token_hex(16)
    head = start_head(token=token)
    head.token_file = tmp_path_factory.mktemp("token") / "auth_token"
    head.token_file.write_text(token + "\n")
    yield head
    head.stop()
    assert head.processes() == []


def on(head: RayHead, *argv: str) -> list[str]:
    """CLI arguments plus this head's address and token file."""
    return [*argv, "--address", head.address, "--token-file", str(head.token_file)]


def connect(head: RayHead) -> submission.Cluster:
    return submission.connect(head.address, str(head.token_file))


def test_the_token_is_required_and_checked(ray_head, tmp_path, capsys, monkeypatch):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token to fall back on
    code, _, err = lidit(capsys, "jobs", "list", "--address", ray_head.address)
    assert code == 1
    assert err.count("\n") == 1 and "requires a Ray auth token" in err

    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    code, _, err = lidit(capsys, "jobs", "list", "--address", ray_head.address)
    assert code == 1
    assert err.count("\n") == 1 and "rejected the Ray auth token from $RAY_AUTH_TOKEN" in err

    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token_file.read_text().strip())
    code, out, _ = lidit(capsys, "jobs", "list", "--json", "--address", ray_head.address)
    assert code == 0 and isinstance(json.loads(out), list)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    code, _, err = lidit(capsys, *on(ray_head, "jobs", "list"))
    assert code == 0, err


def test_unreachable_address_is_one_line(capsys):
    code, _, err = lidit(capsys, "jobs", "list", "--address", f"http://127.0.0.1:{_free_port()}")
    assert code == 1
    assert err.count("\n") == 1 and "cannot reach the Ray Jobs API at http://127.0.0.1:" in err


def test_address_must_be_the_dashboard_url(capsys):
    code, _, err = lidit(capsys, "jobs", "list", "--address", "ray://127.0.0.1:10001")
    assert code == 1
    assert "expected the Ray dashboard URL" in err


def _probe(cluster: submission.Cluster, ship_code: bool) -> dict[str, str]:
    """Where the job's lidit code comes from and what its working directory holds."""
    probe = "import lidit.jobs, os; print('CODE', lidit.jobs.__file__); print('CWD', sorted(os.listdir()))"
    job_id = submission.submit(cluster, "probe", f'python -c "{probe}"', "answer: 42\n", ship_code=ship_code)
    assert submission.wait(cluster, job_id, timeout_s=120) == "SUCCEEDED"
    return dict(line.split(" ", 1) for line in submission.logs(cluster, job_id).splitlines()
                if line.startswith(("CODE ", "CWD ")))


@pytest.mark.slow
def test_the_job_runs_the_shipped_code_or_the_installed_one(ray_head):
    cluster = connect(ray_head)
    installed = Path(submission.__file__).parents[1]  # this checkout (the venv's editable install)
    shipped = _probe(cluster, ship_code=True)
    assert str(ray_head.temp_dir) in shipped["CODE"] and "runtime_resources" in shipped["CODE"]
    assert not shipped["CODE"].startswith(str(installed))
    assert shipped["CWD"] == "['spec.yaml']"
    image = _probe(cluster, ship_code=False)  # `--code image`: what the cluster has installed
    assert image["CODE"] == str(installed / "jobs" / "__init__.py")


@pytest.mark.slow
def test_make_shapes_job_succeeds_and_lists(ray_head, tmp_path, capsys):
    cluster = connect(ray_head)
    out_dir = tmp_path / "shapes"
    job_id = submission.submit(cluster, "data", (
        f"python -m lidit.jobs.cli data make-shapes {out_dir} --train 16 --heldout 8 --shard-size 8"), None)
    code, out, _ = lidit(capsys, *on(ray_head, "jobs", "logs", job_id, "--follow"))
    assert code == 0 and f"{job_id}: SUCCEEDED" in out
    assert sorted(p.name for p in out_dir.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]

    code, out, _ = lidit(capsys, *on(ray_head, "jobs", "list", "--json"))
    listed = {job["id"]: job for job in json.loads(out)}
    assert code == 0 and listed[job_id]["status"] == "SUCCEEDED" and listed[job_id]["job"] == "data"
    code, out, _ = lidit(capsys, *on(ray_head, "jobs", "list"))
    assert out.splitlines()[0].split() == ["ID", "STATUS", "JOB", "STARTED", "TIME"] and job_id in out
    code, out, _ = lidit(capsys, *on(ray_head, "jobs", "status", job_id))
    assert code == 0 and out.startswith(f"{job_id}: SUCCEEDED")
    code, out, _ = lidit(capsys, *on(ray_head, "jobs", "logs", job_id))
    assert code == 0 and '"heldout"' in out


class _Lines(io.StringIO):
    """A thread-safe enough text sink: `follow` writes whole chunks, the test reads `getvalue()`."""


@pytest.mark.slow
def test_logs_stream_while_the_job_runs_and_stop_works(ray_head, capsys):
    cluster = connect(ray_head)
    ticker = "import time\nfor i in range(600):\n    print('tick', i, flush=True)\n    time.sleep(0.2)"
    job_id = submission.submit(cluster, "ticker", f"python -c {shlex.quote(ticker)}", None)
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
    code, out, _ = lidit(capsys, *on(ray_head, "jobs", "stop", job_id))
    assert code == 0 and out.strip() == f"{job_id}: STOPPED"
    assert time.monotonic() - started < 30
    follower.join(timeout=30)
    assert result == ["STOPPED"]
    ticks = [int(line.split()[1]) for line in streamed.getvalue().splitlines() if line.startswith("tick ")]
    assert ticks == list(range(len(ticks))) and 3 < len(ticks) < 600


def test_unknown_job_id_is_one_line(ray_head, capsys):
    code, _, err = lidit(capsys, *on(ray_head, "jobs", "status", "lidit-nope"))
    assert code == 1
    assert err.strip() == f"lidit jobs: no job 'lidit-nope' on {ray_head.address}"


# --- the project's jobs from specs: precompute, then train on its output ----------------------------------

def _precompute_spec(tiny_llms, shapes_data, output) -> dict:
    """One shard (32 samples), one tiny LLM; every stage fits the head's 2 CPUs."""
    return {"input": str(shapes_data / "train-000000.tar"), "output": str(output), "image_size": 32,
            "encoders": [{"name": "llama", "path": tiny_llms["tiny-llama"], "num_cpus": 0.25, "batch_size": 16}],
            "codec": {"num_cpus": 0.25}, "window": 64, "read_num_cpus": 0.25, "write_num_cpus": 0.25}


def _train_spec(precompute: dict, output, workdir) -> dict:
    return {"name": "submitted", "output": str(output), "workdir": str(workdir),
            "encoders": [{k: e[k] for k in ("name", "path")} for e in precompute["encoders"]],
            "data": {"embeddings": precompute["output"], "batch_size": 8},
            "train": {"steps": 2, "log_every": 1}, "checkpoint": {"every_steps": 2},
            "samples": {"prompts": 0}, "scaling": {"num_workers": 1, "cpus_per_worker": 1}}


def test_a_rejected_spec_is_never_sent(ray_head, tmp_path, capsys):
    spec = tmp_path / "train.yaml"
    spec.write_text(yaml.safe_dump({"output": str(tmp_path), "encoders": [{"name": "a", "path": "b"}], "data": {"embeddings": "x"},
                                    "train": {"steps": 1}, "modle": {"preset": "tiny"}}))
    cluster = connect(ray_head)
    before = [j.submission_id for j in submission.list_jobs(cluster)]
    code, _, err = lidit(capsys, *on(ray_head, "submit", "train", str(spec)))
    assert code == 2 and err.count("\n") == 1 and "modle: unknown field" in err
    code, _, err = lidit(capsys, "submit", "precompute", str(spec), "--address", f"http://127.0.0.1:{_free_port()}")
    assert code == 2 and "input: Field required" in err  # validated before the (unreachable) address is tried
    assert [j.submission_id for j in submission.list_jobs(cluster)] == before


@pytest.mark.slow
def test_precompute_then_train_reach_succeeded(ray_head, tiny_llms, shapes_data, tmp_path, capsys):
    precompute = _precompute_spec(tiny_llms, shapes_data, tmp_path / "embeddings")
    (tmp_path / "precompute.yaml").write_text(yaml.safe_dump(precompute))
    code, out, err = lidit(capsys, *on(ray_head, "submit", "precompute", str(tmp_path / "precompute.yaml"),
                                             "--set", "store_dtype=float16", "--follow"))
    assert code == 0, out[-3000:] + err
    job_id = re.search(r"submitted (\S+) to", out).group(1)
    assert f"{job_id}: SUCCEEDED" in out and "rows      32 written" in out  # the job's own summary, streamed
    (manifest,) = (tmp_path / "embeddings").glob("*/manifest.json")
    written = json.loads(manifest.read_text())
    assert written["totals"]["rows"] == 32
    assert {e["dtype"] for e in written["encoders"]} == {"float16"}  # the --set override travelled

    train = _train_spec(precompute, tmp_path / "checkpoints", tmp_path / "work")
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    code, out, err = lidit(capsys, *on(ray_head, "submit", "train", str(tmp_path / "train.yaml"), "--follow"))
    assert code == 0, out[-3000:] + err
    assert "finished at step 2" in out
    checkpoints = sorted((tmp_path / "checkpoints").rglob("model.safetensors"))
    assert checkpoints and (checkpoints[-1].parent / "config.yaml").is_file()


def test_a_job_without_a_command_or_a_spec_is_refused_here():
    from lidit.jobs.commands import spec_class
    from lidit.platform.config import SpecError

    with pytest.raises(SpecError, match="unknown job 'nosuchjob'"):
        spec_class("nosuchjob")
    with pytest.raises(SpecError, match="job 'data' takes no spec file"):
        spec_class("data")
