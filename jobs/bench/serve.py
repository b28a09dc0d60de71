"""`lidit bench serve`: closed-loop HTTP load on the Serve application, batched vs unbatched, same run.

Two applications serve the same checkpoint side by side: one with `@serve.batch` as the spec sets it, one
with every batch size forced to 1. A separate client process (`python -m lidit.jobs.bench.serve client`)
runs C closed-loop clients (each sends its next request when the last one is answered) until a fixed
number of requests is done, for C in 1, 4, 16, and reports requests/s, p50/p99 latency, errors and the
batch sizes the denoiser reported (X-Lidit-Batch-Images). Without --checkpoint, a random-init checkpoint
of --preset is built over the tiny offline LLMs (weights do not change the speed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

PROMPTS = ["a red circle to the left of a blue square", "two green triangles above a yellow star",
           "a small purple heart below a big orange ring", "three cyan diamonds next to a white cross"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients per phase (default %(default)s)")
    parser.add_argument("--requests", type=int, default=48, help="requests per phase (default %(default)s)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=32, help="image height and width in pixels")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--preset", default="tiny", help="LI-DiT preset of the random-init checkpoint")
    parser.add_argument("--checkpoint", default=None, help="serve this checkpoint folder instead")
    parser.add_argument("--max-batch-size", type=int, default=16, help="denoiser images / encoder prompts per batch")
    parser.add_argument("--denoiser-cpus", type=int, default=1,
                        help="CPUs the denoiser replica reserves = its torch threads, in both apps (default %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    parser.add_argument("--workdir", default=None, help="where the random checkpoint and tiny LLMs go")


def make_checkpoint(folder: Path, preset: str, size: int) -> str:
    """Random-init LI-DiT of `preset` over the tiny offline LLMs, identity codec (pixels)."""
    import torch
    from transformers import AutoConfig

    from lidit.models import CheckpointInfo, EncoderConfig, EncoderEntry, LiDiT, lidit_config, save_checkpoint
    from lidit.models.tiny_llms import make_tiny_llms

    llms = make_tiny_llms(folder / "llms")
    encoders = tuple(EncoderEntry(name.replace("tiny-", "").replace("-", "_"), EncoderConfig(path=path))
                     for name, path in llms.items())
    widths = [AutoConfig.from_pretrained(path).hidden_size for path in llms.values()]
    torch.manual_seed(0)
    model = LiDiT(lidit_config(preset, encoder_dims=widths, in_channels=3))
    out = folder / f"checkpoint-{preset}"
    save_checkpoint(str(out), model, None, CheckpointInfo(model.config, encoders, {"kind": "identity"}, (size, size)))
    return str(out)


# ---- the load generator (runs in its own process) -------------------------------------------------------

def _one(url: str, body: dict) -> tuple[float, int, int]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()
            batch = int(response.headers.get("X-Lidit-Batch-Images", "0"))
            return time.perf_counter() - start, response.status, batch
    except urllib.error.HTTPError as err:
        return time.perf_counter() - start, err.code, 0
    except OSError:
        return time.perf_counter() - start, 0, 0


def closed_loop(url: str, clients: int, requests: int, steps: int, size: int, guidance: float) -> dict:
    """`clients` threads, each sending its next request when the previous one is answered, `requests` in all."""
    results: list[tuple[float, int, int]] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": steps, "width": size, "height": size,
                    "guidance": guidance}
            outcome = _one(url, body)
            with lock:
                results.append(outcome)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    latencies = sorted(r[0] for r in results if r[1] == 200)
    batches = [r[2] for r in results if r[1] == 200]
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(results), "errors": sum(r[1] != 200 for r in results),
            "requests_per_s": len(latencies) / elapsed, "p50_ms": 1000 * pick(0.5), "p99_ms": 1000 * pick(0.99),
            "batch_mean": statistics.fmean(batches) if batches else 0.0, "batch_max": max(batches, default=0),
            "seconds": elapsed}


def _client_process(url: str, clients: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "lidit.jobs.bench.serve", "client", url, str(clients), str(args.requests),
               str(args.steps), str(args.size), str(args.guidance)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the benchmark --------------------------------------------------------------------------------------

def _spec(checkpoint: str, name: str, port: int, batch: int, args: argparse.Namespace):
    from lidit.jobs.serve.ingress import INGRESS_CONCURRENT_BATCHES
    from lidit.jobs.serve.spec import ServeSpec
    from lidit.platform.config import load_spec

    overrides = [f"model={checkpoint}", f"app_name={name}", f"route_prefix=/{name}", f"port={port}",
                 "poll_interval_s=0", "auth_token_env=null", f"limits.max_size={max(args.size, 64)}",
                 f"limits.max_steps={max(args.steps, 50)}", "limits.max_n=1"]
    for part in ("encoder", "denoiser"):
        overrides += [f"{part}.max_ongoing_requests={max(2 * batch, 32)}"]
    overrides += [f"ingress.max_ongoing_requests={max(INGRESS_CONCURRENT_BATCHES * batch, 32)}"]
    # only one app is under load at a time, so each denoiser may reserve the threads it would have alone:
    # Ray gets enough logical CPUs for both (the encoders and the ingress reserve none, one thread each)
    cpus = max(os.cpu_count() or 1, 2 * args.denoiser_cpus)
    overrides += ["encoder.num_cpus=0", "ingress.num_cpus=0", f"denoiser.num_cpus={args.denoiser_cpus}",
                  f"ray.num_cpus={cpus}"]
    overrides += [f"{part}.max_batch_size={batch}" for part in ("encoder", "denoiser", "ingress")]
    return load_spec(ServeSpec, None, overrides)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> int:
    from ray import serve as ray_serve

    from lidit.jobs.serve.deploy import serve_many

    clients = [int(c) for c in args.clients.split(",")]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lidit-bench-serve-"))
    checkpoint = args.checkpoint or make_checkpoint(workdir, args.preset, args.size)
    port = args.port or _free_port()
    batched, unbatched = serve_many([_spec(checkpoint, "batched", port, args.max_batch_size, args),
                                     _spec(checkpoint, "unbatched", port, 1, args)])
    apps = {"batched": batched.url, "unbatched": unbatched.url}
    try:
        rows = measure(apps, clients, args)
    finally:
        for served in (batched, unbatched):
            served.stop()
        ray_serve.shutdown()
    report(rows, args, clients)
    return 0 if all(row["errors"] == 0 for row in rows) else 1


def measure(apps: dict[str, str], clients: list[int], args: argparse.Namespace) -> list[dict]:
    """One row per (mode, client count): each app (mode -> base URL) warmed up, then loaded by a client process."""
    rows = []
    for mode, base in apps.items():
        url = f"{base}/v1/images"
        closed_loop(url, 2, 4, args.steps, args.size, args.guidance)  # warm-up: first calls load lazily
        for count in clients:
            rows.append({"mode": mode, **_client_process(url, count, args)})
    return rows


def report(rows: list[dict], args: argparse.Namespace, clients: list[int]) -> None:
    print(f"lidit bench serve: preset {args.preset}, {args.size}px, {args.steps} steps, guidance {args.guidance}, "
          f"{args.requests} requests per phase")
    print(f"{'mode':<10}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'batch mean':>12}{'max':>5}")
    for row in rows:
        print(f"{row['mode']:<10}{row['clients']:>8}{row['requests_per_s']:>9.2f}{row['p50_ms']:>9.0f}"
              f"{row['p99_ms']:>9.0f}{row['errors']:>8}{row['batch_mean']:>12.1f}{row['batch_max']:>5}")
    top = max(clients)
    rate = {row["mode"]: row["requests_per_s"] for row in rows if row["clients"] == top}
    speedup = rate.get("batched", 0.0) / max(rate.get("unbatched", 0.0), 1e-9)
    print(f"batched / unbatched requests/s at {top} clients: {speedup:.2f}x")
    if args.json:
        print(json.dumps({"benchmark": "serve", "preset": args.preset, "size": args.size, "steps": args.steps,
                          "rows": rows, "speedup_at_max_clients": speedup}))


if __name__ == "__main__" and len(sys.argv) == 8 and sys.argv[1] == "client":
    url, n_clients, n_requests, n_steps, px = sys.argv[2], *map(int, sys.argv[3:7])
    print(json.dumps(closed_loop(url, n_clients, n_requests, n_steps, px, float(sys.argv[7]))))
