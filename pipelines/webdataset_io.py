"""WebDataset ingest: read one tar shard, validate and decode its samples, count what is skipped and why.

A sample is the run of tar members sharing a key (the path up to the first dot of the file name, the
WebDataset convention); it needs an image (`jpg`/`jpeg`/`png`/`webp`) and a caption (`txt`, or `json` with
a `caption` field). Bad samples are skipped and counted by reason, never fatal; a truncated tar keeps the
samples read before the damage and counts the one cut short as `truncated_tar`.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from dataclasses import dataclass, field
import numpy as np
from PIL import Image

from lidit.platform import storage as st
from lidit.platform.config import StorageSpec

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SKIP_REASONS = ("image_missing", "image_undecodable", "caption_missing", "caption_empty", "caption_not_utf8",
                "truncated_tar")


@dataclass
class ShardSamples:
    """The valid samples of one shard (images uint8 [N, S, S, 3]) and the skipped ones by reason."""

    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def split_name(name: str) -> tuple[str, str]:
    """`dir/abc.seg.png` -> (`dir/abc`, `seg.png`): WebDataset's key and extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_groups(data: bytes):
    """Yield (key, {ext: bytes}) per sample; finally (None, None) if the tar is cut short.

    Random access over the whole shard in memory: a tar cut at a member boundary still parses, so the
    end-of-archive block (512 zero bytes after the last member) is checked explicitly."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            yield None, None
            return
    key, members = None, {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name_key, ext = split_name(member.name)
                payload = tar.extractfile(member).read()
                if len(payload) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                if name_key != key and key is not None:
                    yield key, members
                    members = {}
                key = name_key
                members[ext] = payload
            complete = data[tar.offset : tar.offset + tarfile.BLOCKSIZE] == tarfile.NUL * tarfile.BLOCKSIZE
    except (tarfile.TarError, EOFError, OSError):
        complete = False
    if not complete:
        yield None, None  # the sample being read is lost with the rest of the tar
        return
    if key is not None:
        yield key, members


def decode_caption(members: dict[str, bytes]) -> tuple[str | None, str | None]:
    """(caption, None) or (None, reason)."""
    if "txt" in members:
        try:
            text = members["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return None, "caption_not_utf8"
    elif "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except UnicodeDecodeError:
            return None, "caption_not_utf8"
        except ValueError:
            return None, "caption_missing"
        text = meta.get("caption") if isinstance(meta, dict) else None
        if not isinstance(text, str):
            return None, "caption_missing"
    else:
        return None, "caption_missing"
    text = text.strip()
    return (text, None) if text else (None, "caption_empty")


def decode_image(members: dict[str, bytes], size: int) -> tuple[np.ndarray | None, str | None]:
    """Centre-crop to a square and resize to `size` (bicubic); (uint8 [size, size, 3], None) or (None, reason)."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        return None, "image_missing"
    try:
        with Image.open(io.BytesIO(members[ext])) as image:
            image.load()
            image = image.convert("RGB")
    except Exception:  # PIL raises many types for damaged files
        return None, "image_undecodable"
    width, height = image.size
    if width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8), None


def list_shards(pattern: str, storage: StorageSpec | None = None) -> list[str]:
    """The tar shards a path, folder, brace pattern or glob names (local or s3://), sorted."""
    return [uri for uri in st.expand(pattern, storage) if uri.endswith(TAR_SUFFIXES)]


def read_shard(uri: str, image_size: int, storage: StorageSpec | None = None) -> ShardSamples:
    """Read, validate and decode every sample of one tar shard (local path or s3:// URI)."""
    out = ShardSamples()
    with st.open_uri(uri, "rb", storage) as f:
        data = f.read()
    for key, members in iter_groups(data):
        if key is None:
            out.skip("truncated_tar")
            break
        caption, reason = decode_caption(members)
        image, image_reason = decode_image(members, image_size) if reason is None else (None, None)
        if reason or image_reason:
            out.skip(reason or image_reason)
            continue
        out.keys.append(key)
        out.captions.append(caption)
        out.images.append(image)
    return out
