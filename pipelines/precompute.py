"""Ray Data precompute: WebDataset shards -> frozen-LLM hidden states + image latents as Parquet shards.

LI-DiT (arXiv 2406.11831) keeps its LLM prompt encoders frozen, so their features are computed once:

    read + validate + decode (CPU tasks, one input shard each)
      -> one actor-pool stage per LLM (`EncodeCaptions`, GPUs per actor from the spec; each batch window
         is sorted by token length and run in micro-batches, reusing the instruction-prefix KV cache)
      -> image codec stage (`EncodeImages`)
      -> `WriteShards` (CPU tasks: Parquet files, written whole under a temporary name)
      -> the driver commits an input shard in the manifest once all its rows are in files.

Exactly once: only committed shards exist for readers, a rerun skips them and deletes the files a killed
run left uncommitted. The output folder is `<output>/<dataset fingerprint>/`, so another encoder spec
never mixes with these features.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from hashlib import sha1

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from lidit.models.codecs import codec_from_config
from lidit.models.encoders import EncoderConfig, LLMPromptEncoder
from lidit.pipelines import shards
from lidit.pipelines.webdataset_io import list_shards, read_shard
from lidit.platform import storage as st
from lidit.pipelines.stages import CodecSpec, EncoderSpec
from lidit.platform.config import LiditError, StorageSpec

log = logging.getLogger(__name__)

SHARD, SHARD_ROWS, SKIPPED, PIXELS, LATENTS = "_shard", "_shard_rows", "_skipped", "_pixels", "_latents"


@dataclass(frozen=True)
class EncoderPlan:
    """One encoder as the pipeline runs it: the user's spec, its resolved revision and fingerprint."""

    spec: EncoderSpec
    revision: str
    fingerprint: str

    def config(self, local_path: str) -> EncoderConfig:
        return dataclasses.replace(self.spec.features(), path=local_path, revision=self.revision)


def plan_encoder(spec: EncoderSpec, storage: StorageSpec | None = None) -> EncoderPlan:
    """Resolve the model's content hash (copying an s3:// model to the local cache) and fingerprint."""
    local = st.local_copy(spec.path, storage)
    try:
        config = dataclasses.replace(spec.features(), path=local)
        return EncoderPlan(spec, config.resolved_revision(), config.fingerprint())
    except ValueError as err:
        raise LiditError(f"encoders.{spec.name}: {err}") from None


def device_for_actor() -> str:
    import ray

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def _fixed_binary(values: np.ndarray) -> pa.FixedSizeBinaryArray:
    """Rows of a C-contiguous array [N, ...] as fixed-size binary values (no offsets, no 2 GiB limit)."""
    flat = np.ascontiguousarray(values).reshape(len(values), -1).view(np.uint8)
    width = flat.shape[1]
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(flat.tobytes())])


def _from_fixed_binary(column: pa.ChunkedArray | pa.Array, dtype, shape: tuple[int, ...]) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = array.type.byte_width
    data = np.frombuffer(array.buffers()[1], dtype=np.uint8, count=len(array) * width, offset=array.offset * width)
    return data.view(dtype).reshape(len(array), *shape)


class ReadShards:
    """CPU task: one input tar -> its valid rows (key, caption, pixels), each tagged with its shard, the
    shard's valid row count and its skipped samples by reason (so the driver knows when it is complete)."""

    def __init__(self, image_size: int, storage: StorageSpec | None = None) -> None:
        self.image_size, self.storage = image_size, storage

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = []
        for uri in batch.column("shard").to_pylist():
            samples = read_shard(uri, self.image_size, self.storage)
            rows = len(samples.keys)
            tables.append(pa.table({
                "key": pa.array(samples.keys, pa.string()), "caption": pa.array(samples.captions, pa.string()),
                PIXELS: _fixed_binary(np.stack(samples.images)) if rows else pa.array([], pa.binary(self.image_size ** 2 * 3)),
                SHARD: pa.array([uri] * rows, pa.string()), SHARD_ROWS: pa.array([rows] * rows, pa.int64()),
                SKIPPED: pa.array([json.dumps(samples.skipped)] * rows, pa.string()),
            }))
        return pa.concat_tables(tables)


def padded_tokens(lengths: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per row, the width of its micro-batch when rows run in length-sorted chunks of `batch_size`
    (what `LLMPromptEncoder.encode_captions` computes); their sum is the tokens actually computed."""
    order = torch.sort(lengths, stable=True).indices
    widths = torch.zeros_like(lengths)
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        widths[chunk] = lengths[chunk].max()
    return widths


class EncodeCaptions:
    """Actor: one frozen LLM prompt encoder (LI-DiT Sec. 3.2). Each batch is a sort window: captions are
    run in length-sorted micro-batches of `batch_size`, so padded compute stays small."""

    def __init__(self, plan: EncoderPlan, store_dtype: str, storage: StorageSpec | None = None) -> None:
        self.name, self.store_dtype = plan.spec.name, store_dtype
        self.batch_size = plan.spec.batch_size
        device = device_for_actor()
        if device == "cpu":  # intra-op threads = the CPUs the actor holds
            torch.set_num_threads(max(1, int(plan.spec.num_cpus)))
        self.encoder = LLMPromptEncoder(plan.config(st.local_copy(plan.spec.path, storage)), device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        captions = batch.column("caption").to_pylist()
        if not captions:
            lengths = torch.zeros(0, dtype=torch.long)
            states = torch.zeros(0, 0, self.encoder.hidden_size)
            widths, seconds, begun = lengths, 0.0, float("inf")
        else:
            start, begun = time.perf_counter(), time.time()
            features = self.encoder.encode_captions(captions, self.batch_size)
            if features.states.is_cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            states, lengths = features.states, features.lengths
            widths = padded_tokens(lengths, self.batch_size)
        share = seconds / max(len(captions), 1)
        return (batch.append_column(shards.states_column(self.name), shards.states_to_arrow(states, lengths, self.store_dtype))
                .append_column(shards.length_column(self.name), pa.array(lengths.numpy(), pa.int32()))
                .append_column(f"_computed.{self.name}", pa.array(widths.numpy(), pa.int64()))
                .append_column(f"_seconds.{self.name}", pa.array(np.full(len(captions), share), pa.float64()))
                .append_column(f"_begun.{self.name}", pa.array(np.full(len(captions), begun), pa.float64())))


class EncodeImages:
    """Actor: the image codec (identity pixels in [-1, 1], or a VAE's latents), stored as float16."""

    def __init__(self, codec: dict, image_size: int) -> None:
        self.codec = codec_from_config(codec, device_for_actor())
        self.image_size = image_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        size = self.image_size
        pixels = torch.from_numpy(_from_fixed_binary(batch.column(PIXELS), np.uint8, (size, size, 3)).copy())
        with torch.inference_mode():
            latents = self.codec.encode(pixels).to(torch.float16).cpu().numpy()
        index = batch.schema.get_field_index(PIXELS)
        return batch.remove_column(index).append_column(LATENTS, _fixed_binary(latents))


def shard_stem(uri: str) -> str:
    """A file-name stem unique per input URI: its base name plus a short hash of the whole URI."""
    base = uri.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".tar.gz", ".tgz", ".tar"):
        base = base[: -len(ext)] if base.endswith(ext) else base
    return f"{base}-{sha1(uri.encode()).hexdigest()[:8]}"


class WriteShards:
    """CPU task: the rows of a block, split by input shard, each part written as one whole Parquet file.
    Returns one small row per file for the driver, which commits shards in the manifest."""

    def __init__(self, dataset_uri: str, schema: pa.Schema, names: list[str], storage: StorageSpec | None) -> None:
        self.dataset_uri, self.schema, self.names, self.storage = dataset_uri, schema, names, storage
        self.image_shape = tuple(schema.field("image").type.shape)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for uri in pc.unique(batch.column(SHARD)).to_pylist():
            part = batch.filter(pc.equal(batch.column(SHARD), uri))
            latents = _from_fixed_binary(part.column(LATENTS), np.float16, self.image_shape)
            columns = {name: part.column(name) for name in part.column_names}
            columns["image"] = pa.FixedShapeTensorArray.from_numpy_ndarray(latents)
            table = shards.build_table(self.schema, columns)
            path = shards.data_file_name(shard_stem(uri))
            size = shards.write_table(st.join(self.dataset_uri, path), table, self.storage)
            stats = {name: [pc.sum(part.column(shards.length_column(name))).as_py(),
                            pc.sum(part.column(f"_computed.{name}")).as_py(),
                            pc.sum(part.column(f"_seconds.{name}")).as_py(),
                            pc.min(part.column(f"_begun.{name}")).as_py()] for name in self.names}
            out.append({"shard": uri, "path": path, "rows": part.num_rows, "bytes": size,
                        "shard_rows": part.column(SHARD_ROWS)[0].as_py(), "skipped": part.column(SKIPPED)[0].as_py(),
                        "stats": json.dumps(stats)})
        return pa.Table.from_pylist(out, schema=WRITTEN_SCHEMA)


WRITTEN_SCHEMA = pa.schema([("shard", pa.string()), ("path", pa.string()), ("rows", pa.int64()),
                            ("bytes", pa.int64()), ("shard_rows", pa.int64()), ("skipped", pa.string()),
                            ("stats", pa.string())])


@dataclass
class EncoderStats:
    tokens: int = 0  # caption + suffix tokens stored
    computed: int = 0  # tokens run through the LLM, padding included
    seconds: float = 0.0  # actor time inside the encoder
    begun: float = float("inf")  # wall-clock time the first window started (after actor start-up)

    def summary(self, wall_s: float) -> dict:
        return {"tokens": self.tokens, "computed_tokens": self.computed,
                "padding_waste": round(self.computed / self.tokens, 4) if self.tokens else None,
                "tokens_per_s": round(self.tokens / wall_s, 1) if wall_s > 0 else None,
                "tokens_per_actor_s": round(self.tokens / self.seconds, 1) if self.seconds > 0 else None}


@dataclass
class Committer:
    """Driver side of the commit protocol: collects written files per input shard and commits a shard in
    the manifest (atomic rewrite, at most every `interval_s`) once its rows are all in files."""

    dataset_uri: str
    manifest: shards.Manifest
    storage: StorageSpec | None
    interval_s: float
    names: list[str]
    partial: dict[str, dict] = field(default_factory=dict)
    stats: dict[str, EncoderStats] = field(default_factory=dict)
    rows: int = 0
    last_save: float = 0.0
    dirty: bool = False

    def add(self, written: dict) -> None:
        entry = self.partial.setdefault(written["shard"], {"files": [], "rows": 0})
        entry["files"].append({"path": written["path"], "rows": written["rows"], "bytes": written["bytes"]})
        entry["rows"] += written["rows"]
        self.rows += written["rows"]
        for name, (tokens, computed, seconds, begun) in json.loads(written["stats"]).items():
            stat = self.stats.setdefault(name, EncoderStats())
            stat.tokens, stat.computed, stat.seconds = stat.tokens + tokens, stat.computed + computed, stat.seconds + seconds
            stat.begun = min(stat.begun, begun)
        if entry["rows"] == written["shard_rows"]:
            self.commit(written["shard"], entry["files"], json.loads(written["skipped"]))
            del self.partial[written["shard"]]

    def commit(self, shard: str, files: list[dict], skipped: dict[str, int]) -> None:
        self.manifest.commit(shard, files, skipped)
        self.dirty = True
        self.save(force=False)

    def save(self, force: bool = True) -> None:
        if self.dirty and (force or time.monotonic() - self.last_save >= self.interval_s):
            self.manifest.save(self.dataset_uri, self.storage)
            self.last_save, self.dirty = time.monotonic(), False


def _describe_encoder(plan: EncoderPlan, storage: StorageSpec | None) -> torch.Tensor:
    """Ray task with the encoder's resources: the instruction-prefix states [P, D] (stored once)."""
    encoder = LLMPromptEncoder(plan.config(st.local_copy(plan.spec.path, storage)), device_for_actor())
    return encoder.encode_prefix().float().cpu()


def image_shape(codec: dict, image_size: int) -> list[int]:
    """[C, h, w] of the codec's latents for square images of `image_size`."""
    built = codec_from_config(codec)
    if image_size % built.downsample:
        raise LiditError(f"image_size: {image_size} is not a multiple of the codec's downsampling {built.downsample}")
    side = image_size // built.downsample
    return [built.channels, side, side]


def prepare_dataset(output: str, plans: list[EncoderPlan], codec: dict, image_size: int, store_dtype: str,
                    storage: StorageSpec | None = None) -> tuple[str, shards.Manifest]:
    """The fingerprinted dataset folder, its prefix files and manifest (created or reloaded)."""
    import ray

    shape = image_shape(codec, image_size)
    draft = [{"name": p.spec.name, "fingerprint": p.fingerprint, "dtype": store_dtype} for p in plans]
    dataset_uri = st.join(output, shards.dataset_fingerprint(draft, codec, shape))
    manifest = shards.Manifest.load(dataset_uri, storage)
    infos = []
    for plan in plans:
        prefix_uri = st.join(dataset_uri, "prefix", f"{plan.spec.name}.safetensors")
        if st.exists(prefix_uri, storage):
            prefix = shards.load_prefix(dataset_uri, plan.spec.name, storage)
        else:
            task = ray.remote(_describe_encoder).options(num_cpus=plan.spec.num_cpus, num_gpus=plan.spec.num_gpus)
            prefix = ray.get(task.remote(plan, storage)).to(shards.STORED_DTYPES[store_dtype][0])
            shards.save_prefix(dataset_uri, plan.spec.name, prefix, storage)
        config = plan.config(plan.spec.path)
        infos.append(shards.EncoderInfo(plan.spec.name, plan.fingerprint, config.to_dict(), int(prefix.shape[1]),
                                        store_dtype, int(prefix.shape[0])))
    header = shards.header(infos, codec, shape)
    if manifest is None:
        manifest = shards.Manifest(header)
        manifest.save(dataset_uri, storage)
    elif manifest.fingerprint != header["fingerprint"]:
        raise LiditError(f"{dataset_uri}: manifest fingerprint {manifest.fingerprint} != {header['fingerprint']}")
    return dataset_uri, manifest


@dataclass
class PrecomputeResult:
    dataset_uri: str
    inputs: int
    already_committed: int
    rows: int  # written by this run
    skipped: dict[str, int]  # skipped samples of the shards committed by this run, by reason
    bytes: int
    encoders: dict[str, dict]
    wall_s: float
    startup_s: float | None  # until the first encoder window started (actor start-up, model load)
    steady_rows_per_s: float | None  # rows / (last output - that moment): start-up left out
    manifest_totals: dict

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def run_precompute(inputs: str, output: str, encoders: list[EncoderSpec], codec: CodecSpec = CodecSpec(),
                   image_size: int = 32, store_dtype: shards.StoredDtype = "bfloat16", window: int = 1024,
                   read_num_cpus: float = 1.0, write_num_cpus: float = 1.0, storage: StorageSpec | None = None,
                   commit_interval_s: float = 2.0) -> PrecomputeResult:
    """Precompute every input shard not yet committed under `<output>/<dataset fingerprint>/`.

    `window` is the encoder stages' Ray Data batch size (the length-sorting window); each encoder's own
    `batch_size` is its micro-batch. Ray must be initialised by the caller (`lidit.platform.cluster`)."""
    import ray

    codec_config = codec.config()
    if store_dtype not in shards.STORED_DTYPES:
        raise LiditError(f"store_dtype: {store_dtype!r} is not one of {sorted(shards.STORED_DTYPES)}")
    shard_uris = list_shards(inputs, storage)
    if not shard_uris:
        raise LiditError(f"{inputs}: no input shards found")
    plans = [plan_encoder(spec, storage) for spec in encoders]
    dataset_uri, manifest = prepare_dataset(output, plans, codec_config, image_size, store_dtype, storage)
    removed = shards.remove_uncommitted(dataset_uri, manifest, storage)
    if removed:
        log.info("removed %d uncommitted file(s) left by an earlier run", removed)
    pending = [uri for uri in shard_uris if uri not in manifest.shards]
    names = [p.spec.name for p in plans]
    committer = Committer(dataset_uri, manifest, storage, commit_interval_s, names)
    started, started_wall, last_output = time.perf_counter(), time.time(), None
    schema = shards.schema([shards.EncoderInfo(**e) for e in manifest.header["encoders"]], codec_config,
                           manifest.header["image_shape"])
    if pending:
        ds = ray.data.from_items([{"shard": uri} for uri in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(ReadShards(image_size, storage), batch_size=1, batch_format="pyarrow",
                            num_cpus=read_num_cpus)
        for plan in plans:
            ds = ds.map_batches(EncodeCaptions, fn_constructor_args=(plan, store_dtype, storage),
                                compute=ray.data.ActorPoolStrategy(size=plan.spec.actors), batch_size=window,
                                num_cpus=plan.spec.num_cpus, num_gpus=plan.spec.num_gpus, batch_format="pyarrow")
        ds = ds.map_batches(EncodeImages, fn_constructor_args=(codec_config, image_size),
                            compute=ray.data.ActorPoolStrategy(size=codec.actors), batch_size=codec.batch_size,
                            num_cpus=codec.num_cpus, num_gpus=codec.num_gpus, batch_format="pyarrow")
        ds = ds.map_batches(WriteShards(dataset_uri, schema, names, storage), batch_size=None,
                            batch_format="pyarrow", num_cpus=write_num_cpus)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for written in batch.to_pylist():
                    committer.add(written)
                last_output = time.time()
        finally:
            committer.save()
    for uri in pending:  # shards with no valid sample never reach the writer: commit them with their counts
        if uri not in manifest.shards and uri not in committer.partial:
            samples = read_shard(uri, image_size, storage)
            if samples.keys:
                raise RuntimeError(f"{uri}: {len(samples.keys)} valid rows never reached the writer")
            committer.commit(uri, [], samples.skipped)
    if committer.partial:
        raise RuntimeError(f"incomplete shards after the pipeline finished: {sorted(committer.partial)}")
    committer.save()
    wall = time.perf_counter() - started
    skipped: dict[str, int] = {}
    for uri in pending:
        for reason, count in manifest.shards[uri]["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    ready = min((committer.stats[n].begun for n in names if n in committer.stats), default=None)
    steady = None if last_output is None or ready is None else committer.rows / max(last_output - ready, 1e-9)
    return PrecomputeResult(
        dataset_uri=dataset_uri, inputs=len(shard_uris), already_committed=len(shard_uris) - len(pending),
        rows=committer.rows, skipped=dict(sorted(skipped.items())),
        bytes=sum(f["bytes"] for uri in pending for f in manifest.shards[uri]["files"]),
        encoders={n: committer.stats.get(n, EncoderStats()).summary(wall) for n in names}, wall_s=round(wall, 3),
        startup_s=None if ready is None else round(ready - started_wall, 3),
        steady_rows_per_s=None if steady is None else round(steady, 1), manifest_totals=manifest.totals())
