"""`lidit bench train`: the train loop fed from Parquet next to the same model fed from in-memory tensors.

One Ray Train run, one worker process: the same `Trainer` does warm-up steps, then `--steps` steps
streaming the shards (`get_dataset_shard` -> `iter_torch_batches`) and `--steps` steps cycling
batches already collated in memory, alternating in rounds so both feeds see the same machine load.
Printed: images/s, data-wait fraction (time blocked on the next batch / step time) and, on a GPU, MFU
from `lidit.models.flops.flops_per_image` (x3 for forward + backward).

Data: random features written on the fly as a data set of the real format (or `--embeddings`): by
default pixels as latents and two encoders of the tiny LLMs' widths; e.g. `--preset 1b --image-size 256
--latents vae8 --encoder-dims 4096 4096` for 8x VAE latents with 16 channels and two 4096-wide encoders.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from typing import get_args

import torch

from lidit.jobs.train.spec import Precision, Strategy
from lidit.models.presets import PresetName

# latents -> (channels, downsampling, codec config); random latents have no decoder, so the config states them
LATENTS = {"pixels": (3, 1, {"kind": "identity"}),
           "vae8": (16, 8, {"kind": "synthetic", "channels": 16, "downsample": 8})}
# peak dense bf16 FLOP/s by device name fragment (NVIDIA data sheets, SXM parts)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def make_embeddings(out: str, dims: list[int], rows: int, image_shape: list[int], codec: dict, tokens: int = 24,
                    prefix_len: int = 40, files: int = 4, seed: int = 0) -> str:
    """Random features of the given widths (throughput only: nothing to learn), written as a data set."""
    from lidit.pipelines import shards

    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(rows, *image_shape, generator=generator)
    encoders, states, prefixes = [], [], []
    for i, dim in enumerate(dims):
        lengths = torch.randint(tokens // 2, tokens + 1, (rows,), generator=generator)
        encoders.append(shards.EncoderInfo(f"enc{i}", f"synthetic{i:07d}", {"path": "synthetic"}, dim, "bfloat16",
                                           prefix_len))
        states.append((torch.randn(rows, tokens, dim, generator=generator), lengths))
        prefixes.append(torch.randn(prefix_len, dim, generator=generator).to(torch.bfloat16))
    keys = [f"sample-{i:06d}" for i in range(rows)]
    return shards.write_dataset(out, keys, [f"synthetic {i}" for i in range(rows)], images, encoders, states,
                                prefixes, codec, files)


# ---- the benchmark -------------------------------------------------------------------------------------

def bench_loop_per_worker(config: dict) -> None:
    """Ray Train worker: time the Parquet-fed and the in-memory-fed loop of the same Trainer."""
    from lidit.jobs.train.loop import Trainer
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
    from lidit.models.flops import flops_per_image

    return flops_per_image(trainer.model_config, height, width, text_len, starts)


def mfu(result: dict, images_per_s: float) -> float | None:
    name = result["device_name"]
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    if peak is None or not result["bf16"]:
        return None
    return images_per_s * result["flops_per_image"] / (peak * result["world_size"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=get_args(PresetName))
    parser.add_argument("--embeddings", help="existing embedding data set (default: write one to a temp folder)")
    parser.add_argument("--latents", choices=sorted(LATENTS), default="pixels",
                        help="pixels: 3 channels at the image size; vae8: 16 channels at 1/8 of it")
    parser.add_argument("--image-size", type=int, default=32, help="pixels")
    parser.add_argument("--encoder-dims", type=int, nargs="+", default=[64, 96], help="widths of the random features")
    parser.add_argument("--rows", type=int, default=256, help="rows written when making data")
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per feed")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--strategy", default="auto", choices=get_args(Strategy))
    parser.add_argument("--precision", default="auto", choices=get_args(Precision))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--workdir", default=None, help="keep data and outputs here (default: a temp folder)")


def _spec(args: argparse.Namespace, embeddings: str, workdir: str, encoders: list):
    from lidit.jobs.train.spec import TrainSpec

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

    from lidit.jobs.train.driver import build_dataset, checkpoint_info, model_config
    from lidit.pipelines.embeddings import open_embeddings
    from lidit.platform.cluster import init_ray

    embeddings = args.embeddings
    if embeddings is None:
        channels, downsample, codec = LATENTS[args.latents]
        side = args.image_size // downsample
        embeddings = make_embeddings(os.path.join(workdir, "embeddings"), args.encoder_dims, args.rows,
                                     [channels, side, side], codec)
    dataset = open_embeddings(embeddings)
    encoders = [{"name": e.name, "path": e.config.get("path", "-"), "revision": e.config.get("revision") or "-"}
                for e in dataset.encoders]
    spec = _spec(args, embeddings, workdir, encoders)
    result_uri = os.path.join(workdir, "bench-result.json")
    needed = (args.steps + 2 * args.warmup + 4) * args.batch_size * args.workers
    epochs = -(-needed // dataset.num_rows) + 1
    info = checkpoint_info(spec, dataset, model_config(spec, dataset))
    config = {"spec": spec.model_dump(mode="json"), "checkpoint": info.to_config(), "tracking_uri": None, "run_id": None,
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
    result["params"] = _params(info.model)
    result["preset"] = args.preset
    return result


def _params(model) -> int:
    from lidit.models import LiDiT

    with torch.device("meta"):
        return LiDiT(model).num_params()


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
