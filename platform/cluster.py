"""Ray access: start or attach to Ray with the settings this project relies on."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

# Keep Ray on loopback and quiet unless the user says otherwise (../shared/notes/stack.md).
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DEDUP_LOGS": "1",
}


def ray_env() -> dict[str, str]:
    """Environment defaults for processes that start Ray (set only where the user has not). Ray Data's
    progress bars redraw with cursor movement: only on a terminal, else a log fills with redraws."""
    bars = {"RAY_DATA_DISABLE_PROGRESS_BARS": "0" if sys.stderr.isatty() else "1"}
    return {k: os.environ.get(k, v) for k, v in {**RAY_ENV_DEFAULTS, **bars}.items()}


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> None:
    """Attach to Ray once: `address=None` starts a private local Ray (never a stray `ray start`
    cluster); 'auto' or 'ray://host:port' attach to a cluster. No-op if Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    os.environ.update(ray_env())
    if "ray.data" in sys.modules:  # its default was read from the environment at import
        sys.modules["ray.data"].DataContext.get_current().enable_progress_bars = (
            os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "0")
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or "local"
    kwargs.setdefault("log_to_driver", True)
    kwargs.setdefault("include_dashboard", False if address == "local" else None)
    if address == "local":
        kwargs.setdefault("_node_ip_address", "127.0.0.1")
        kwargs["num_cpus"] = num_cpus
        # Ray kills idle workers above a soft limit (default: the node's CPU count). On a small machine the
        # long-lived actors (encoders, codec, train workers) already exceed it, so every short task (shard
        # reads, Parquet writes) would start a fresh worker and pay its imports again; +16 leaves room for the
        # precompute stages and Ray Data's own actors (docs/precompute.md, "worker soft limit").
        cpus = num_cpus if num_cpus is not None else (os.cpu_count() or 1)
        kwargs.setdefault("_system_config", {"num_workers_soft_limit": max(int(cpus), 1) + 16})
    log.info("starting Ray (address=%s)", address)
    ray.init(address=address, **{k: v for k, v in kwargs.items() if v is not None})
