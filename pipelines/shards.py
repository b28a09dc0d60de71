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
from typing import Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lidit.platform import storage as st
from lidit.platform.config import LiditError, StorageSpec

FORMAT = "lidit-embeddings"
VERSION = 1
MANIFEST = "manifest.json"
METADATA_KEY = b"lidit"
StoredDtype = Literal["float16", "bfloat16"]  # bfloat16 has no Arrow type: its uint16 bit patterns are stored
STORED_DTYPES = dict(zip(get_args(StoredDtype), ((torch.float16, pa.float16()), (torch.bfloat16, pa.uint16()))))
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


def write_dataset(out: str, keys: list[str], captions: list[str], images: torch.Tensor, encoders: list[EncoderInfo],
                  states: list[tuple[torch.Tensor, torch.Tensor]], prefixes: list[torch.Tensor], codec: dict,
                  files: int = 4, storage: StorageSpec | None = None) -> str:
    """A committed data set under `out/<fingerprint>/` from tensors already computed: images (latents)
    [N, C, h, w], per encoder right-padded caption states [N, L, D] with their lengths [N], and prefix states
    [P, D]; split into `files` Parquet files. Returns the data set folder. (The precompute pipeline writes
    the same format shard by shard.)"""
    shape = list(images.shape[1:])
    table_schema = schema(encoders, codec, shape)
    manifest = Manifest(header(encoders, codec, shape))
    folder = st.join(out, manifest.fingerprint)
    rows = len(captions)
    for number in range(files):
        part = list(range(number * rows // files, (number + 1) * rows // files))
        columns = {"key": pa.array([keys[i] for i in part], pa.string()),
                   "caption": pa.array([captions[i] for i in part], pa.string()), "image": images_to_arrow(images[part])}
        for info, (values, lengths) in zip(encoders, states):
            columns[states_column(info.name)] = states_to_arrow(values[part], lengths[part], info.dtype)
            columns[length_column(info.name)] = pa.array(lengths[part].to(torch.int32).numpy())
        name = data_file_name(f"part-{number:05d}")
        size = write_table(st.join(folder, name), build_table(table_schema, columns), storage)
        manifest.commit(f"part-{number:05d}", [{"path": name, "rows": len(part), "bytes": size}], {})
    for info, prefix in zip(encoders, prefixes):
        save_prefix(folder, info.name, prefix, storage)
    manifest.save(folder, storage)
    return folder

