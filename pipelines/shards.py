"""Embedding shards: the Parquet files precompute writes and training reads (docs/contracts.md).

A dataset folder `<output>/<dataset fingerprint>/` holds
- `manifest.json`: encoders, codec, image shape, and the committed input shards with their files;
- `prefix/<encoder>.safetensors`: the instruction-prefix states [P, D] of each encoder (LI-DiT Sec. 3.2:
  under a causal LLM they are the same for every caption, so they are stored once);
- `data/*.parquet`: one row per sample, `key`, `caption`, `image` (arrow.fixed_shape_tensor float16
  [C, h, w]) and per encoder `<name>.states` (list of fixed_size_list[D]: the caption + template-suffix
  token states, no padding) and `<name>.len`.

Only files listed in the manifest exist for readers: a file is written whole under a temporary name, moved
into place, and only then committed by an atomic rewrite of the manifest. bfloat16 has no Arrow type, so
bfloat16 states are stored as their uint16 bit patterns (field metadata `dtype: bfloat16`). Plain pyarrow
reads everything here; Ray is needed only for `iter_torch_batches`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lidit.models.encoders import PromptFeatures, join_prefix
from lidit.platform import storage as st
from lidit.platform.config import LiditError, StorageSpec

try:  # Ray hands an Arrow table to subclasses of this; without Ray the collate fn is a plain callable.
    from ray.data.collate_fn import ArrowBatchCollateFn as _CollateBase
except ImportError:  # pragma: no cover - exercised only where Ray is not installed
    _CollateBase = object

FORMAT = "lidit-embeddings"
VERSION = 1
MANIFEST = "manifest.json"
METADATA_KEY = b"lidit"
STORED_DTYPES = {"float16": (torch.float16, pa.float16()), "bfloat16": (torch.bfloat16, pa.uint16())}
ROW_GROUP_BYTES = 128 << 20  # keeps every Arrow array of a row group far below the 2 GiB offset limit


def states_column(name: str) -> str:
    return f"{name}.states"


def length_column(name: str) -> str:
    return f"{name}.len"


@dataclass(frozen=True)
class EncoderInfo:
    """What a reader needs to know about one encoder's stored features."""

    name: str
    fingerprint: str
    config: dict
    hidden_size: int
    dtype: str  # stored dtype: float16 | bfloat16
    prefix_len: int

    @property
    def cut_instruction(self) -> bool:
        return bool(self.config.get("cut_instruction", False))


def dataset_fingerprint(encoders: list[EncoderInfo] | list[dict], codec: dict, image_shape: list[int]) -> str:
    """Covers every encoder (name, feature fingerprint, stored dtype), the codec and the image shape."""
    rows = [e if isinstance(e, dict) else asdict(e) for e in encoders]
    key = {"format": VERSION, "codec": codec, "image_shape": list(image_shape),
           "encoders": [[r["name"], r["fingerprint"], r["dtype"]] for r in rows]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def header(encoders: list[EncoderInfo], codec: dict, image_shape: list[int]) -> dict:
    """The manifest fields that describe the features (also stored in every file's schema metadata)."""
    return {"format": FORMAT, "version": VERSION, "fingerprint": dataset_fingerprint(encoders, codec, image_shape),
            "encoders": [asdict(e) for e in encoders], "codec": codec, "image_shape": list(image_shape)}


def schema(encoders: list[EncoderInfo], codec: dict, image_shape: list[int]) -> pa.Schema:
    fields = [pa.field("key", pa.string()), pa.field("caption", pa.string()),
              pa.field("image", pa.fixed_shape_tensor(pa.float16(), list(image_shape)))]
    for enc in encoders:
        value_type = STORED_DTYPES[enc.dtype][1]
        fields.append(pa.field(states_column(enc.name), pa.list_(pa.list_(value_type, enc.hidden_size)),
                               metadata={"dtype": enc.dtype, "fingerprint": enc.fingerprint}))
        fields.append(pa.field(length_column(enc.name), pa.int32()))
    meta = json.dumps(header(encoders, codec, image_shape), sort_keys=True).encode()
    return pa.schema(fields, metadata={METADATA_KEY: meta})


# ---- tensors <-> Arrow ---------------------------------------------------------------------------------

def states_to_arrow(states: torch.Tensor, lengths: torch.Tensor, dtype: str) -> pa.ListArray:
    """Right-padded states [B, L, D] + lengths -> list<fixed_size_list[D]> without the padding."""
    torch_dtype, _ = STORED_DTYPES[dtype]
    batch, width, dim = states.shape
    mask = torch.arange(width, device=states.device) < lengths.to(states.device).unsqueeze(1)
    flat = states[mask].to(torch_dtype).cpu().contiguous()
    if dtype == "float16" and not torch.isfinite(flat).all():
        raise LiditError("float16 overflow in encoder states: store them as bfloat16 (store_dtype)")
    values = flat.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else flat.numpy()
    offsets = np.zeros(batch + 1, dtype=np.int32)
    np.cumsum(lengths.cpu().numpy(), out=offsets[1:])
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim)
    return pa.ListArray.from_arrays(pa.array(offsets), tokens)


def states_from_arrow(column: pa.Array | pa.ChunkedArray, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """list<fixed_size_list[D]> -> (right-padded states [B, L, D] in the stored dtype, mask [B, L])."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.value_type.list_size
    lengths = torch.from_numpy(column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64))
    values = column.flatten().flatten().to_numpy(zero_copy_only=False)
    flat = _tensor(values.view(np.int16)).view(torch.bfloat16) if dtype == "bfloat16" else _tensor(values)
    width = int(lengths.max()) if len(lengths) else 0
    mask = torch.arange(width) < lengths.unsqueeze(1)
    states = torch.zeros(len(lengths), width, dim, dtype=flat.dtype)
    states[mask] = flat.reshape(-1, dim)
    return states, mask


def images_to_arrow(latents: torch.Tensor) -> pa.FixedShapeTensorArray:
    """Latents [B, C, h, w] -> arrow.fixed_shape_tensor float16."""
    return pa.FixedShapeTensorArray.from_numpy_ndarray(latents.to(torch.float16).cpu().contiguous().numpy())


def images_from_arrow(column: pa.Array | pa.ChunkedArray) -> torch.Tensor:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return _tensor(column.to_numpy_ndarray())


def _tensor(array: np.ndarray) -> torch.Tensor:
    """Zero-copy view of a read-only Arrow buffer; callers only read it (torch warns on read-only arrays)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


# ---- writing -------------------------------------------------------------------------------------------

def build_table(schema: pa.Schema, columns: dict[str, pa.Array | pa.ChunkedArray]) -> pa.Table:
    """A table in `schema`'s column order; fails naming the first missing column."""
    missing = [f.name for f in schema if f.name not in columns]
    if missing:
        raise ValueError(f"shard table: missing column {missing[0]!r}")
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def row_group_rows(table: pa.Table) -> int:
    """Rows per row group so that one row group holds about ROW_GROUP_BYTES."""
    per_row = max(table.nbytes // max(table.num_rows, 1), 1)
    return max(1, min(table.num_rows, ROW_GROUP_BYTES // per_row))


def write_table(uri: str, table: pa.Table, storage: StorageSpec | None = None) -> int:
    """Write a whole Parquet file so that it appears complete or not at all; returns its size in bytes.

    Local: written under a temporary name in the same folder, then renamed. S3: one multipart upload,
    which makes the object visible only when it completes."""
    fs, path = st.filesystem(uri, storage)
    rows = row_group_rows(table)
    if st.is_remote(uri):
        with st.open_uri(uri, "wb", storage) as f:
            pq.write_table(table, f, row_group_size=rows, compression="zstd")
        return int(fs.size(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    pq.write_table(table, tmp, row_group_size=rows, compression="zstd")
    os.replace(tmp, path)
    return os.path.getsize(path)


def data_file_name(stem: str) -> str:
    """A fresh name per attempt, so a rerun never writes over a file a reader may be using."""
    return f"data/{stem}-{uuid.uuid4().hex[:8]}.parquet"


def save_prefix(dataset_uri: str, name: str, states: torch.Tensor, storage: StorageSpec | None = None) -> None:
    from safetensors.torch import save

    data = save({"states": states.detach().cpu().contiguous()}, metadata={"encoder": name})
    st.write_bytes_atomic(st.join(dataset_uri, "prefix", f"{name}.safetensors"), data, storage)


def load_prefix(dataset_uri: str, name: str, storage: StorageSpec | None = None) -> torch.Tensor:
    from safetensors.torch import load

    with st.open_uri(st.join(dataset_uri, "prefix", f"{name}.safetensors"), "rb", storage) as f:
        return load(f.read())["states"]


@dataclass
class Manifest:
    """`manifest.json`: the feature header plus the committed input shards (input URI -> files, rows,
    skipped samples by reason). Rewritten atomically; a shard absent from it was never written."""

    header: dict
    shards: dict[str, dict] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return self.header["fingerprint"]

    def commit(self, shard: str, files: list[dict], skipped: dict[str, int]) -> None:
        self.shards[shard] = {"files": files, "rows": sum(f["rows"] for f in files), "skipped": dict(skipped)}

    def files(self) -> list[str]:
        return [f["path"] for entry in self.shards.values() for f in entry["files"]]

    def totals(self) -> dict:
        skipped: dict[str, int] = {}
        for entry in self.shards.values():
            for reason, count in entry["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + count
        return {"shards": len(self.shards), "rows": sum(e["rows"] for e in self.shards.values()),
                "bytes": sum(f["bytes"] for e in self.shards.values() for f in e["files"]),
                "skipped": dict(sorted(skipped.items()))}

    def to_json(self) -> str:
        body = dict(self.header, shards=dict(sorted(self.shards.items())), totals=self.totals(), updated=time.time())
        return json.dumps(body, indent=1, sort_keys=False)

    def save(self, dataset_uri: str, storage: StorageSpec | None = None) -> None:
        st.write_text_atomic(st.join(dataset_uri, MANIFEST), self.to_json(), storage)

    @classmethod
    def load(cls, dataset_uri: str, storage: StorageSpec | None = None) -> "Manifest | None":
        uri = st.join(dataset_uri, MANIFEST)
        if not st.exists(uri, storage):
            return None
        data = json.loads(st.read_text(uri, storage))
        if data.get("format") != FORMAT:
            raise LiditError(f"{uri}: not a {FORMAT} manifest")
        shards = data.pop("shards", {})
        head = {k: data[k] for k in ("format", "version", "fingerprint", "encoders", "codec", "image_shape")}
        return cls(head, shards)


def remove_uncommitted(dataset_uri: str, manifest: Manifest, storage: StorageSpec | None = None) -> int:
    """Delete data files a crashed run left behind without committing them; returns how many."""
    fs, root = st.filesystem(st.join(dataset_uri, "data"), storage)
    if not fs.exists(root):
        return 0
    keep = {st.filesystem(st.join(dataset_uri, p), storage)[1].rstrip("/") for p in manifest.files()}
    stale = [p for p in fs.find(root) if p.rstrip("/") not in keep]
    for path in stale:
        fs.rm(path)
    return len(stale)


# ---- reading -------------------------------------------------------------------------------------------

class TrainBatch(NamedTuple):
    images: torch.Tensor  # [B, C, h, w] float
    text: list[PromptFeatures]  # one per encoder, in manifest order
    keys: list[str]


@dataclass(frozen=True)
class ShardInfo:
    """Everything the collate function needs (small and picklable: it travels to Ray Train workers)."""

    encoders: tuple[EncoderInfo, ...]
    prefixes: tuple[torch.Tensor, ...]
    image_shape: tuple[int, ...]


@dataclass
class EmbeddingDataset:
    """A committed embedding data set: its manifest, files (full URIs), encoders and prefix states."""

    uri: str
    manifest: Manifest
    files: list[str]
    encoders: list[EncoderInfo]
    prefixes: dict[str, torch.Tensor]
    storage: StorageSpec | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest.header["image_shape"])

    @property
    def codec(self) -> dict:
        return self.manifest.header["codec"]

    @property
    def num_rows(self) -> int:
        return self.manifest.totals()["rows"]

    @property
    def info(self) -> ShardInfo:
        return ShardInfo(tuple(self.encoders), tuple(self.prefixes[e.name] for e in self.encoders), self.image_shape)

    def iter_tables(self, batch_size: int = 64, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Plain pyarrow: record batches of up to `batch_size` rows, file by file (no Ray)."""
        for uri in self.files:
            with st.open_uri(uri, "rb", self.storage) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
                    yield pa.Table.from_batches([batch])

    def read_batches(self, batch_size: int = 64, dtype: torch.dtype = torch.float32,
                     device: str | torch.device | None = None) -> Iterator[TrainBatch]:
        collate = make_collate_fn(self.info, dtype=dtype, device=device)
        for table in self.iter_tables(batch_size):
            yield collate(table)


def _resolve_dataset(uri: str, storage: StorageSpec | None) -> str:
    """`uri` is a dataset folder, or an output root holding exactly one dataset folder."""
    if st.exists(st.join(uri, MANIFEST), storage):
        return uri
    if not st.exists(uri, storage):
        raise LiditError(f"{uri}: not found")
    fs, path = st.filesystem(uri, storage)
    prefix = uri.split("://", 1)[0] + "://" if st.is_remote(uri) else ""
    found = sorted(p for p in fs.ls(path, detail=False) if fs.exists(f"{p.rstrip('/')}/{MANIFEST}"))
    if len(found) != 1:
        names = ", ".join(os.path.basename(p.rstrip("/")) for p in found) or "none"
        raise LiditError(f"{uri}: expected one embedding data set (a folder with {MANIFEST}), found {names}")
    return prefix + found[0].rstrip("/")


def open_embeddings(uri: str, storage: StorageSpec | None = None) -> EmbeddingDataset:
    """Open a precomputed data set (its folder, or the precompute output root if it holds just one)."""
    dataset_uri = _resolve_dataset(str(uri).rstrip("/"), storage)
    manifest = Manifest.load(dataset_uri, storage)
    if manifest is None:
        raise LiditError(f"{dataset_uri}: no {MANIFEST}")
    encoders = [EncoderInfo(**e) for e in manifest.header["encoders"]]
    prefixes = {e.name: load_prefix(dataset_uri, e.name, storage) for e in encoders}
    files = [st.join(dataset_uri, p) for p in manifest.files()]
    return EmbeddingDataset(dataset_uri, manifest, files, encoders, prefixes, storage)


def read_batches(uri: str, batch_size: int = 64, storage: StorageSpec | None = None,
                 dtype: torch.dtype = torch.float32) -> Iterator[TrainBatch]:
    """Plain-pyarrow reading of a data set as `TrainBatch`es (evaluation, tests; no Ray)."""
    yield from open_embeddings(uri, storage).read_batches(batch_size, dtype=dtype)


def arrow_file_metadata(uri: str, storage: StorageSpec | None = None) -> dict[str, Any]:
    """The `lidit` header stored in a Parquet file's schema metadata."""
    with st.open_uri(uri, "rb", storage) as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    return json.loads(meta[METADATA_KEY])


class Collate(_CollateBase):
    """Arrow rows -> `TrainBatch`: images as float [B, C, h, w], per encoder right-padded states + mask with
    the instruction prefix joined back in front (LI-DiT keeps the instruction tokens through the refiners;
    `cut_instruction` leaves it out)."""

    def __init__(self, info: ShardInfo, dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None) -> None:
        self.info, self.dtype, self.device = info, dtype, device

    def __call__(self, batch: pa.Table) -> TrainBatch:
        if isinstance(batch, dict):
            raise TypeError("make_collate_fn: expected a pyarrow.Table batch (pass it to iter_torch_batches "
                            "as collate_fn, or use EmbeddingDataset.read_batches)")
        device = self.device or "cpu"
        images = images_from_arrow(batch.column("image")).to(device=device, dtype=self.dtype)
        text = []
        for enc, prefix in zip(self.info.encoders, self.info.prefixes):
            states, mask = states_from_arrow(batch.column(states_column(enc.name)), enc.dtype)
            states, mask = states.to(device=device, dtype=self.dtype), mask.to(device)
            if enc.cut_instruction:
                text.append(PromptFeatures(states, mask, 0))
            else:
                text.append(join_prefix(prefix, states, mask))
        return TrainBatch(images, text, batch.column("key").to_pylist())


def make_collate_fn(info: ShardInfo, dtype: torch.dtype = torch.float32,
                    device: str | torch.device | None = None) -> Collate:
    """For `iter_torch_batches(collate_fn=make_collate_fn(dataset.info))` and plain Arrow tables."""
    return Collate(info, dtype, device)
