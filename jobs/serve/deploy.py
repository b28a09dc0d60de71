"""Deploy `lidit serve`'s application: `serve(spec)` returns a `Served` (URL + handle) once it answers.

The deployments run inside Ray Serve replicas (`lidit.jobs.serve.deployments`, `lidit.jobs.serve.ingress`);
the HTTP contract is `lidit.jobs.serve.api`; the design is in docs/serving.md.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from lidit.jobs.serve.source import ModelRef, current_version, describe, model_source
from lidit.jobs.serve.spec import ServeSpec
from lidit.platform.config import LiditError

log = logging.getLogger(__name__)


@dataclass
class Served:
    """A running application: where to send requests and how to stop it."""

    url: str
    app_name: str
    handle: Any  # ray.serve DeploymentHandle of the ingress
    ref: ModelRef

    def stop(self) -> None:
        from ray import serve

        serve.delete(self.app_name)


def serve(spec: ServeSpec) -> Served:
    """Deploy the application and wait until it answers; returns its URL and ingress handle."""
    return serve_many([spec])[0]


def serve_many(specs: list[ServeSpec]) -> list[Served]:
    """Deploy several applications at once behind the same HTTP proxy (same host and port, distinct
    `app_name` and `route_prefix`), so their replicas start together; wait until each answers."""
    from ray import serve as ray_serve

    from lidit.jobs.serve.api import token_digest
    from lidit.jobs.serve.ingress import build_app
    from lidit.platform.cluster import init_ray

    head = specs[0]
    for spec in specs[1:]:
        if (spec.host, spec.port) != (head.host, head.port):
            raise LiditError(f"{spec.app_name}: every application shares one proxy; host/port differ from {head.app_name}")
    targets, served = [], []
    for spec in specs:
        source = model_source(spec)
        ref = describe(source, current_version(source))
        token = os.environ.get(spec.auth_token_env) if spec.auth_token_env else None
        digest = token_digest(token) if token else None
        host = "127.0.0.1" if spec.host in ("0.0.0.0", "::") else spec.host
        served.append(Served(f"http://{host}:{spec.port}{spec.route_prefix.rstrip('/')}", spec.app_name, None, ref))
        targets.append(ray_serve.RunTarget(build_app(spec, source, ref, digest), name=spec.app_name,
                                           route_prefix=spec.route_prefix))
        log.info("%s: %s version %s, auth %s", spec.app_name, ref.name, ref.version, "on" if digest else "off")
    init_ray(head.ray.address, head.ray.num_cpus)
    ray_serve.start(http_options={"host": head.host, "port": head.port})
    start = time.monotonic()
    handles = ray_serve.run_many(targets)
    for spec, app, handle in zip(specs, served, handles):
        app.handle = handle
        _wait_ready(app.url, spec.ready_timeout_s)
        log.info("serving %s at %s (up in %.1fs)", app.app_name, app.url, time.monotonic() - start)
    return served


def _wait_ready(url: str, timeout_s: float) -> None:
    """Until /healthz says ok: the first version loads in the background after the replicas start."""
    import json
    import urllib.error
    import urllib.request

    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=10):
                return
        except urllib.error.HTTPError as err:
            last = json.loads(err.read() or b"{}").get("error") or f"HTTP {err.code}"
        except OSError as err:
            last = str(err)
        time.sleep(0.5)
    raise LiditError(f"{url}: not ready after {timeout_s:.0f}s ({last})")


def app_builder(args: dict[str, Any]):
    """Ray Serve application builder for `serve run` / `serve deploy` / KubeRay RayService
    (`import_path: lidit.jobs.serve.deploy:app_builder`): `args` are ServeSpec fields. Ray is already up
    there, so unlike `serve()` this neither starts Ray nor Serve's HTTP proxy."""
    from lidit.jobs.serve.api import token_digest
    from lidit.jobs.serve.ingress import build_app
    from lidit.platform.config import parse_spec

    spec = parse_spec(ServeSpec, dict(args or {}), "serve application args")
    source = model_source(spec)
    ref = describe(source, current_version(source))
    token = os.environ.get(spec.auth_token_env) if spec.auth_token_env else None
    return build_app(spec, source, ref, token_digest(token) if token else None)
