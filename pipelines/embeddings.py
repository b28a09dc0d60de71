"""Reading an embedding data set (the Parquet files precompute writes, `lidit.pipelines.shards`): plain
pyarrow for evaluation and tests, and the collate function Ray Train's `iter_torch_batches` uses."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lidit.models.codecs import codec_geometry
from lidit.models.encoders import PromptFeatures, join_prefix
from lidit.pipelines.shards import (
    MANIFEST,
    METADATA_KEY,
    EncoderInfo,
    Manifest,
    images_from_arrow,
    load_prefix,
    states_column,
    states_from_arrow,
)
from lidit.platform import storage as st
from lidit.platform.config import LiditError, StorageSpec

try:  # Ray hands an Arrow table to subclasses of this; without Ray the collate fn is a plain callable.
    from ray.data.collate_fn import ArrowBatchCollateFn as _CollateBase
except ImportError:  # pragma: no cover - exercised only where Ray is not installed
    _CollateBase = object


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
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the images the latents encode."""
        downsample = codec_geometry(self.codec)[1]
        return self.image_shape[-2] * downsample, self.image_shape[-1] * downsample

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
