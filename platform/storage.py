"""One place that opens local paths and s3:// URIs (fsspec + s3fs), used by every job.

Endpoint and credentials come from a `StorageSpec` or, where it leaves them unset, from the standard
AWS variables (`AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_REGION`). Remote failures are reported as one-line `LiditError`s naming the URI.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

import fsspec

from lidit.platform.config import LiditError, StorageSpec


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def _scheme(uri: str) -> str:
    return str(uri).split("://", 1)[0] if is_remote(uri) else "file"


def storage_options(spec: StorageSpec | None = None) -> dict[str, Any]:
    """s3fs keyword arguments from the spec, falling back to the standard AWS environment variables."""
    spec = spec or StorageSpec()
    env = os.environ
    endpoint = spec.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = spec.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    options: dict[str, Any] = {
        "client_kwargs": {"region_name": region},
        # fail fast on an unreachable endpoint instead of retrying for minutes
        "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"},
                          "s3": {"addressing_style": "path"} if endpoint else {}},
    }
    if endpoint:
        options["endpoint_url"] = endpoint
    if spec.anon:
        options["anon"] = True
    key = spec.key or env.get("AWS_ACCESS_KEY_ID")
    secret = spec.secret or env.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        options["key"], options["secret"] = key, secret
    return options


def filesystem(uri: str, spec: StorageSpec | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path, file:// or s3:// URI."""
    scheme = _scheme(uri)
    if scheme == "file":
        path = str(uri)[len("file://"):] if str(uri).startswith("file://") else str(uri)
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
    if scheme in ("s3", "s3a"):
        fs = fsspec.filesystem("s3", **storage_options(spec))
        return fs, str(uri).split("://", 1)[1]
    try:
        fs = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as err:
        raise LiditError(f"{uri}: unsupported storage scheme '{scheme}' ({err})") from None
    return fs, str(uri).split("://", 1)[1]


def arrow_filesystem(uri: str, spec: StorageSpec | None = None):
    """A pyarrow filesystem for `uri` (for pyarrow.parquet and Ray Data readers/writers) and its path."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, spec)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    base = str(uri).rstrip("/")
    return "/".join([base, *(p.strip("/") for p in parts)])


def exists(uri: str, spec: StorageSpec | None = None) -> bool:
    fs, path = filesystem(uri, spec)
    return _remote_call(uri, fs.exists, path)


def open_uri(uri: str, mode: str = "rb", spec: StorageSpec | None = None) -> IO:
    fs, path = filesystem(uri, spec)
    if "w" in mode and not is_remote(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return _remote_call(uri, fs.open, path, mode)


def makedirs(uri: str, spec: StorageSpec | None = None) -> None:
    fs, path = filesystem(uri, spec)
    if is_remote(uri):
        return  # object stores have no directories
    fs.makedirs(path, exist_ok=True)


def read_text(uri: str, spec: StorageSpec | None = None) -> str:
    with open_uri(uri, "rb", spec) as f:
        return f.read().decode("utf-8")


def write_text_atomic(uri: str, text: str, spec: StorageSpec | None = None) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"), spec)


def write_bytes_atomic(uri: str, data: bytes, spec: StorageSpec | None = None) -> None:
    """Write a file so that readers see the old or the new content, never a partial one."""
    fs, path = filesystem(uri, spec)
    if is_remote(uri):
        _remote_call(uri, fs.pipe_file, path, data)  # a single PUT is atomic on S3
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def expand(pattern: str, spec: StorageSpec | None = None) -> list[str]:
    """Expand brace patterns (`shard-{000..009}.tar`) and globs into existing URIs, sorted."""
    import braceexpand

    out: list[str] = []
    for item in braceexpand.braceexpand(str(pattern)):
        fs, path = filesystem(item, spec)
        if any(ch in path for ch in "*?["):
            matches = _remote_call(item, fs.glob, path)
        elif _remote_call(item, fs.isdir, path):
            matches = [p for p in _remote_call(item, fs.find, path)]
        else:
            matches = [path] if _remote_call(item, fs.exists, path) else []
        prefix = item.split("://", 1)[0] + "://" if is_remote(item) else ""
        out.extend(prefix + m for m in matches)
    return sorted(set(out))


def upload_dir(local_dir: str, uri: str, spec: StorageSpec | None = None) -> None:
    """Copy a local folder to `uri` (a local folder or s3:// prefix)."""
    fs, path = filesystem(uri, spec)
    if not is_remote(uri):
        shutil.copytree(local_dir, path, dirs_exist_ok=True)
        return
    _remote_call(uri, fs.put, str(local_dir).rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)


def download_dir(uri: str, local_dir: str, spec: StorageSpec | None = None) -> str:
    """Copy a folder or s3:// prefix to `local_dir`; returns `local_dir`."""
    fs, path = filesystem(uri, spec)
    if not _remote_call(uri, fs.exists, path):
        raise LiditError(f"{uri}: not found")
    os.makedirs(local_dir, exist_ok=True)
    if not is_remote(uri):
        shutil.copytree(path, local_dir, dirs_exist_ok=True)
    else:
        _remote_call(uri, fs.get, path.rstrip("/") + "/", str(local_dir).rstrip("/") + "/", recursive=True)
    return local_dir


def cache_dir() -> Path:
    return Path(os.environ.get("LIDIT_CACHE", Path.home() / ".cache" / "lidit"))


def local_copy(uri: str, spec: StorageSpec | None = None, cache: str | os.PathLike | None = None) -> str:
    """A local folder holding `uri`: local paths are returned as they are, s3:// prefixes are copied once
    into the cache so `from_pretrained(path)` can read them. The cache is keyed by the URI, the endpoint
    and a fresh listing of the prefix (keys, sizes, ETags): an object rewritten under the same URI, or the
    same bucket name on another server, gets a new copy, never a stale one. Completed with a marker file."""
    if not is_remote(uri):
        path = filesystem(uri, spec)[1]
        if not os.path.exists(path):
            raise LiditError(f"{uri}: not found")
        return path
    fs, path = filesystem(uri, spec)
    fs.invalidate_cache()
    listing = _remote_call(uri, fs.find, path.rstrip("/"), detail=True)
    if not listing:
        raise LiditError(f"{uri}: not found")
    endpoint = str(getattr(fs, "endpoint_url", "") or "")
    signature = json.dumps([uri, endpoint, sorted((k, v.get("size"), str(v.get("ETag") or v.get("mtime") or ""))
                                                  for k, v in listing.items())])
    root = Path(cache or cache_dir()) / "remote"
    target = root / hashlib.sha256(signature.encode()).hexdigest()[:16]
    marker = target / ".lidit-complete"
    if marker.exists():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
    download_dir(uri, str(tmp), spec)
    (tmp / ".lidit-complete").write_text(str(uri))
    if target.exists():  # another process finished first; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return str(target)


def check_readable(uri: str, spec: StorageSpec | None = None) -> None:
    """Fail fast with one line if `uri` (a file, folder or prefix) is missing or its endpoint unreachable."""
    if not exists(uri, spec):
        raise LiditError(f"{uri}: not found")


def _remote_call(uri: str, fn, *args, **kwargs):
    """Run a filesystem call, turning connection and permission failures into one-line errors."""
    try:
        return fn(*args, **kwargs)
    except (FileNotFoundError, LiditError):
        raise
    except PermissionError as err:
        raise LiditError(f"{uri}: access denied ({err})") from None
    except OSError as err:
        raise LiditError(f"{uri}: storage error: {_one_line(err)}") from None
    except Exception as err:  # botocore raises its own types for unreachable endpoints
        name = type(err).__name__
        if "Endpoint" in name or "Connect" in name or "Credentials" in name or "ClientError" in name:
            raise LiditError(f"{uri}: {name}: {_one_line(err)}") from None
        raise


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]
