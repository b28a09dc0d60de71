"""`lidit bench train`: the train loop fed from Parquet next to the same model fed from in-memory tensors.

One Ray Train run, one worker process: the same `Trainer` does warm-up steps, then `--steps` steps
streaming the shards (`get_dataset_shard` -> `iter_torch_batches`) and `--steps` steps cycling
batches already collated in memory, alternating in rounds so both feeds see the same machine load. Printed: images/s, data-wait fraction (time blocked on the next
batch / step time) and, on a GPU, MFU from `LiDiT.flops_per_image` (x3 for forward + backward).

Data: by default tiny shards written on the fly (tiny LLM features of synthetic shapes captions,
pixels as latents); `--synthetic` writes random features of the preset's widths instead, e.g.
`--preset 1b --image-size 256 --synthetic` (8x VAE latents, 16 channels, two 4096-wide encoders).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

# peak dense bf16 FLOP/s by device name fragment (NVIDIA data sheets, SXM parts)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


# ---- tiny embedding shards (also used by the tests) ----------------------------------------------------

def write_embeddings(out: str, captions: list[str], images: torch.Tensor, encoders: list[dict],
                     states: list[tuple[torch.Tensor, torch.Tensor]], prefixes: list[torch.Tensor],
                     codec: dict, files: int = 4) -> str:
    """Write a committed embedding data set with `lidit.pipelines.shards`; returns its folder."""
    from lidit.pipelines import shards

    infos = [shards.EncoderInfo(**e) for e in encoders]
    schema = shards.schema(infos, codec, list(images.shape[1:]))
    manifest = shards.Manifest(shards.header(infos, codec, list(images.shape[1:])))
    folder = os.path.join(out, manifest.fingerprint)
    rows = len(captions)
    for number in range(files):
        part = list(range(number * rows // files, (number + 1) * rows // files))
        columns = {"key": [f"sample-{i:06d}" for i in part], "caption": [captions[i] for i in part],
                   "image": shards.images_to_arrow(images[part])}
        for info, (values, lengths) in zip(infos, states):
            columns[shards.states_column(info.name)] = shards.states_to_arrow(values[part], lengths[part], info.dtype)
            columns[shards.length_column(info.name)] = lengths[part].to(torch.int32).numpy()
        import pyarrow as pa

        table = shards.build_table(schema, {k: v if isinstance(v, pa.Array) else pa.array(v) for k, v in columns.items()})
        name = shards.data_file_name(f"part-{number:05d}")
        size = shards.write_table(os.path.join(folder, name), table)
        manifest.commit(f"part-{number:05d}", [{"path": name, "rows": len(part), "bytes": size}], {})
    for info, prefix in zip(infos, prefixes):
        shards.save_prefix(folder, info.name, prefix)
    manifest.save(folder)
    return folder


def make_tiny_embeddings(out: str, llms: dict[str, str], rows: int = 64, size: int = 32, files: int = 4) -> str:
    """Shapes captions through the tiny LLMs (names 'llama', 'qwen'), pixels as latents; returns the folder."""
    from lidit.models import EncoderConfig, IdentityCodec, LLMPromptEncoder
    from lidit.pipelines.shapes import render, samples

    scenes = [scene for _, scene in samples("train", rows)]
    captions = [scene.caption for scene in scenes]
    codec = IdentityCodec()
    images = codec.encode(torch.from_numpy(__import__("numpy").stack([render(s, size) for s in scenes])))
    encoders, states, prefixes = [], [], []
    for name, path in zip(("llama", "qwen"), (llms["tiny-llama"], llms["tiny-qwen2"])):
        encoder = LLMPromptEncoder(EncoderConfig(path=path))
        features = encoder.encode_captions(captions)
        encoders.append({"name": name, "fingerprint": encoder.fingerprint, "config": encoder.config.to_dict(),
                         "hidden_size": encoder.hidden_size, "dtype": "float16", "prefix_len": encoder.prefix_len})
        states.append((features.states, features.lengths))
        prefixes.append(encoder.encode_prefix().to(torch.float16))
    return write_embeddings(out, captions, images, encoders, states, prefixes, codec.config(), files)


def make_synthetic_embeddings(out: str, dims: list[int], rows: int, image_shape: list[int], tokens: int = 24,
                              prefix_len: int = 40, files: int = 4, seed: int = 0) -> str:
    """Random features of the given widths (throughput only: nothing to learn)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(rows, *image_shape, generator=generator)
    encoders, states, prefixes = [], [], []
    for i, dim in enumerate(dims):
        lengths = torch.randint(tokens // 2, tokens + 1, (rows,), generator=generator)
        encoders.append({"name": f"enc{i}", "fingerprint": f"synthetic{i:07d}", "config": {"path": "synthetic"},
                         "hidden_size": dim, "dtype": "bfloat16", "prefix_len": prefix_len})
        states.append((torch.randn(rows, tokens, dim, generator=generator), lengths))
        prefixes.append(torch.randn(prefix_len, dim, generator=generator).to(torch.bfloat16))
    return write_embeddings(out, [f"synthetic {i}" for i in range(rows)], images, encoders, states, prefixes,
                            {"kind": "synthetic", "channels": image_shape[0]}, files)


# ---- the benchmark -------------------------------------------------------------------------------------

def bench_loop_per_worker(config: dict) -> None:
    """Ray Train worker: time the Parquet-fed and the in-memory-fed loop of the same Trainer."""
    from lidit.jobs.train_loop import Trainer
    from lidit.platform import storage

    trainer = Trainer(config)
    steps, warmup = config["bench_steps"], config["bench_warmup"]
    accum = trainer.spec.train.grad_accum

    def sync() -> None:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()

    stream = trainer.batches()
    cached = [next(stream) for _ in range(accum * 4)]
    cursor = iter(range(10**9))
    feeds = {"parquet": lambda: [next(stream) for _ in range(accum)],
             "memory": lambda: [cached[next(cursor) % len(cached)] for _ in range(accum)]}
    totals = {name: {"elapsed": 0.0, "wait": 0.0, "steps": 0} for name in feeds}
    for feed in feeds.values():
        for _ in range(warmup):
            trainer.train_step(feed())
    rounds = max(1, min(5, steps))  # feeds alternate in rounds, so both see the same machine load
    for round_index in range(rounds):
        for name, feed in feeds.items():
            count = steps // rounds + (1 if round_index < steps % rounds else 0)
            sync()
            start = time.perf_counter()
            for _ in range(count):
                t0 = time.perf_counter()
                micro = feed()
                totals[name]["wait"] += time.perf_counter() - t0
                trainer.train_step(micro)
            sync()
            totals[name]["elapsed"] += time.perf_counter() - start
            totals[name]["steps"] += count
    timings = {name: {"images_per_s": t["steps"] * trainer.global_batch / t["elapsed"],
                      "data_wait_fraction": t["wait"] / t["elapsed"], "step_ms": 1000 * t["elapsed"] / t["steps"]}
               for name, t in totals.items()}
    text_len = [int(t.mask.sum(1).float().mean()) for t in cached[0].text]
    starts = [t.caption_start for t in cached[0].text]
    _, _, height, width = cached[0].images.shape
    flops = 3 * forward_flops(trainer, height, width, text_len, starts)
    out = {**timings, "flops_per_image": flops, "device": str(trainer.device),
           "device_name": torch.cuda.get_device_name() if trainer.device.type == "cuda" else "cpu",
           "world_size": trainer.world_size, "strategy": trainer.strategy, "bf16": trainer.bf16,
           "global_batch": trainer.global_batch}
    if trainer.rank == 0:
        storage.write_text_atomic(config["bench_result_uri"], json.dumps(out), trainer.spec.storage)


def forward_flops(trainer, height: int, width: int, text_len: list[int], starts: list[int]) -> int:
    from lidit.models import LiDiT

    with torch.device("meta"):
        model = LiDiT(trainer.model_config)
    return model.flops_per_image(height, width, text_len, starts)


def mfu(result: dict, images_per_s: float) -> float | None:
    name = result["device_name"]
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    if peak is None or not result["bf16"]:
        return None
    return images_per_s * result["flops_per_image"] / (peak * result["world_size"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=["tiny", "mini", "small", "1b", "10b"])
    parser.add_argument("--embeddings", help="existing embedding data set (default: write one to a temp folder)")
    parser.add_argument("--synthetic", action="store_true", help="random features of the preset's widths")
    parser.add_argument("--image-size", type=int, default=32, help="pixels; latents are /8 (x16 ch) with --synthetic")
    parser.add_argument("--encoder-dims", type=int, nargs="+", default=[4096, 4096], help="with --synthetic")
    parser.add_argument("--rows", type=int, default=256, help="rows written when making data")
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per feed")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--strategy", default="auto", choices=["auto", "none", "ddp", "fsdp"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--workdir", default=None, help="keep data and outputs here (default: a temp folder)")


def _spec(args: argparse.Namespace, embeddings: str, workdir: str, encoders: list):
    from lidit.jobs.train import TrainSpec

    return TrainSpec.model_validate({
        "name": "bench-train", "output": os.path.join(workdir, "runs"), "workdir": workdir,
        "encoders": encoders, "model": {"preset": args.preset},
        "data": {"embeddings": embeddings, "batch_size": args.batch_size},
        "train": {"steps": args.steps, "strategy": args.strategy, "precision": args.precision,
                  "compile": args.compile, "activation_checkpointing": args.activation_checkpointing},
        "samples": {"prompts": 0},
        "scaling": {"num_workers": args.workers, "use_gpu": args.gpu, "cpus_per_worker": 1},
    })


def measure(args: argparse.Namespace, workdir: str) -> dict:
    """Make or open the data, run one Ray Train bench run, return its timings."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lidit.jobs.train import build_dataset, checkpoint_metadata, model_config
    from lidit.pipelines.shards import open_embeddings
    from lidit.platform.cluster import init_ray

    embeddings = args.embeddings
    if embeddings is None:
        data = os.path.join(workdir, "embeddings")
        if args.synthetic:
            latent = args.image_size // 8
            embeddings = make_synthetic_embeddings(data, args.encoder_dims, args.rows, [16, latent, latent])
        else:
            from lidit.models.tiny_llms import make_tiny_llms

            llms = make_tiny_llms(os.path.join(workdir, "llms"))
            embeddings = make_tiny_embeddings(data, llms, rows=args.rows, size=args.image_size)
    dataset = open_embeddings(embeddings)
    encoders = [{"name": e.name, "path": e.config.get("path", "-"), "revision": e.config.get("revision") or "-"}
                for e in dataset.encoders]
    spec = _spec(args, embeddings, workdir, encoders)
    result_uri = os.path.join(workdir, "bench-result.json")
    needed = (args.steps + 2 * args.warmup + 4) * args.batch_size * args.workers
    epochs = -(-needed // dataset.num_rows) + 1
    config = {"spec": spec.model_dump(mode="json"), "model": model_config(spec, dataset),
              "metadata": checkpoint_metadata(dataset), "tracking_uri": None, "run_id": None,
              "data": {"first_epoch": 0, "epochs": epochs, "rows": dataset.num_rows},
              "bench_steps": args.steps, "bench_warmup": args.warmup, "bench_result_uri": result_uri}
    init_ray()
    resources = {"CPU": 1, **({"GPU": 1} if args.gpu else {})}
    TorchTrainer(
        bench_loop_per_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"bench-{int(time.time())}", storage_path=os.path.join(workdir, "runs")),
        datasets={"train": build_dataset(spec, dataset, 0, epochs)},
    ).fit()
    with open(result_uri) as f:
        result = json.load(f)
    result["params"] = _params(config["model"])
    result["preset"] = args.preset
    return result


def _params(model: dict) -> int:
    from lidit.models import LiDiT, LiDiTConfig

    with torch.device("meta"):
        return LiDiT(LiDiTConfig.from_dict(model)).num_params()


def run(args: argparse.Namespace) -> int:
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        result = measure(args, os.path.abspath(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="lidit-bench-train-") as workdir:
            result = measure(args, workdir)
    print(f"lidit bench train: preset {result['preset']} ({result['params'] / 1e6:.1f}M params), "
          f"{result['world_size']} worker(s) on {result['device_name']}, strategy {result['strategy']}, "
          f"bf16 {result['bf16']}, global batch {result['global_batch']}")
    print(f"{'feed':<10}{'images/s':>12}{'step ms':>10}{'data wait':>11}{'MFU':>8}")
    for feed in ("parquet", "memory"):
        row = result[feed]
        value = mfu(result, row["images_per_s"])
        row["mfu"] = value
        print(f"{feed:<10}{row['images_per_s']:>12.1f}{row['step_ms']:>10.1f}{row['data_wait_fraction']:>10.1%}"
              f"{'-' if value is None else format(value, '.1%'):>8}")
    ratio = result["parquet"]["images_per_s"] / result["memory"]["images_per_s"]
    result["parquet_over_memory"] = ratio
    print(f"parquet / memory images/s: {ratio:.2f}")
    if args.json:
        print(json.dumps(result))
    return 0
