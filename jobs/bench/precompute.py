"""`lidit bench precompute`: captions/s and tokens/s per encoder for three ways of embedding the same
captions with the same models, in one run:

- naive: one caption at a time, the full prompt (instruction + caption) through the whole causal LM with
  `output_hidden_states=True`, the way a first script does it;
- batched: the best single-process loop, `LLMPromptEncoder.encode_captions` (instruction-prefix KV cache
  reused, only the blocks up to the chosen layer, length-sorted batches), one encoder after the other;
- pipeline: `lidit.pipelines.precompute` on Ray Data, all encoders at once, actor start-up reported
  separately (until the first encoder window starts) from the steady state.

`--encoders tiny` (default) builds the tiny offline LLMs, `--encoders real` imports SmolLM2 + Gemma-3 (the
encoder presets), `--encoder NAME=PATH` names any HF folder instead; `--encoders 8b` builds an 8B-shaped
Llama with random weights (GPU) and reports MFU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import torch

from lidit.jobs.precompute.presets import PRESETS
from lidit.pipelines.stages import CodecSpec, EncoderSpec
from lidit.platform.config import LiditError

PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0}  # dense bf16
SHAPE_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoders", choices=[*PRESETS, "8b"], default="tiny", help="an encoder preset, or 8b")
    parser.add_argument("--encoder", action="append", default=[], metavar="NAME=PATH",
                        help="an encoder's HF folder (repeatable); replaces the --encoders set")
    parser.add_argument("--captions", type=int, default=4096, help="captions for the batched loop and the pipeline")
    parser.add_argument("--naive-captions", type=int, default=256, help="captions for the naive loop (slow)")
    parser.add_argument("--batch-size", type=int, default=64, help="micro-batch of the batched loop and actors")
    parser.add_argument("--window", type=int, default=512, help="pipeline rows per length-sorted window")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", default=None, help="where models and shards are built (default: a temp dir)")


def make_shaped_llm(folder: str, tokenizer_from: str, shape: dict) -> str:
    """A Llama with the given shape and random bf16 weights, saved as an HF folder (tokenizer borrowed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    config = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **shape)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    return folder


def encoder_paths(args: argparse.Namespace, workdir: str) -> dict[str, str]:
    if args.encoder:
        pairs = [m.partition("=") for m in args.encoder]
        if any(not sep or not name or not path for name, sep, path in pairs):
            raise LiditError("--encoder: expected NAME=PATH")
        return {name: path for name, _, path in pairs}
    from lidit.jobs.precompute.presets import resolve_encoders

    if args.encoders != "8b":  # a preset: built or imported on first use, then cached
        return {spec.name: spec.path for spec in resolve_encoders(args.encoders)}
    tiny = {spec.name: spec.path for spec in resolve_encoders("tiny")}
    return {"llama8b": make_shaped_llm(os.path.join(workdir, "llama-8b-shape"), tiny["tiny_llama"], SHAPE_8B)}


def captions(count: int) -> list[str]:
    from lidit.pipelines.shapes import samples

    return [scene.caption for _, scene in samples("train", count, seed=1)]


def forward_flops_per_token(config, layers: int, context: float) -> float:
    """Matmul FLOPs of one token through `layers` decoder blocks attending to `context` tokens."""
    d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    projections = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * config.intermediate_size
    return layers * (2 * projections + 4 * heads * head_dim * context)


def naive_loop(path: str, texts: list[str], dtype: str, device: str, layer: int = -3) -> dict:
    from transformers import AutoModelForCausalLM

    from lidit.models.encoders import DTYPES, EncoderConfig, LLMPromptEncoder

    encoder = LLMPromptEncoder(EncoderConfig(path, dtype=dtype))  # only for its token ids
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    rows, _ = encoder.caption_ids(texts)
    start = time.perf_counter()
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([encoder.prefix_ids + row], device=device)
            model(ids, output_hidden_states=True).hidden_states[layer].cpu()
    seconds = time.perf_counter() - start
    return {"captions_per_s": len(rows) / seconds, "tokens_per_s": sum(map(len, rows)) / seconds}


def batched_loop(path: str, texts: list[str], dtype: str, device: str, batch_size: int) -> dict:
    from lidit.models.encoders import EncoderConfig, LLMPromptEncoder

    encoder = LLMPromptEncoder(EncoderConfig(path, dtype=dtype), device)
    encoder.encode_captions(texts[:batch_size], batch_size)  # warm-up (prefix cache, kernels)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    features = encoder.encode_captions(texts, batch_size)
    features.states.cpu()
    seconds = time.perf_counter() - start
    tokens = int(features.lengths.sum())
    context = encoder.prefix_len + float(features.lengths.float().mean()) / 2
    flops = tokens * forward_flops_per_token(encoder.decoder.config, encoder.decoder.config.num_hidden_layers, context)
    return {"captions_per_s": len(texts) / seconds, "tokens_per_s": tokens / seconds, "seconds": seconds,
            "tflops": flops / seconds / 1e12, "flops_per_token": flops / tokens}


def write_caption_shards(folder: str, texts: list[str], shard_size: int) -> str:
    """The captions as WebDataset shards with 8x8 images, so the pipeline reads what a job would."""
    import io
    import tarfile

    import numpy as np

    from lidit.pipelines.shapes import encode_png

    png = encode_png(np.zeros((8, 8, 3), np.uint8))
    os.makedirs(folder, exist_ok=True)
    for number, first in enumerate(range(0, len(texts), shard_size)):
        with tarfile.open(os.path.join(folder, f"bench-{number:06d}.tar"), "w") as tar:
            for index, text in enumerate(texts[first : first + shard_size], start=first):
                for ext, data in (("png", png), ("txt", text.encode())):
                    info = tarfile.TarInfo(f"{index:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(folder, "bench-*.tar")


def pipeline(paths: dict[str, str], texts: list[str], dtype: str, device: str, args, workdir: str) -> dict:
    from lidit.pipelines.precompute import run_precompute
    from lidit.platform.cluster import init_ray

    cpus = os.cpu_count() or 2
    if device == "cpu":
        # one single-threaded actor per core for every encoder: the encoders' stages then share the cores
        # by time slices whatever their relative cost (one actor of N threads per encoder leaves the
        # cheaper encoder's cores idle while it waits for the costlier one's windows)
        actors, per_actor_cpus, gpus = cpus, 1.0 / len(paths), 0.0
    else:
        actors, per_actor_cpus, gpus = 1, 1.0, 1.0 / len(paths)
    # the small stages (read, codec, write) get a quarter CPU each on top of the encoders' share
    init_ray(num_cpus=math.ceil(per_actor_cpus * actors * len(paths)) + 1)
    specs = [EncoderSpec(name=name, path=path, dtype=dtype, batch_size=args.batch_size, num_cpus=per_actor_cpus,
                         actors=actors, num_gpus=gpus) for name, path in paths.items()]
    inputs = write_caption_shards(os.path.join(workdir, "shards"), texts, shard_size=args.window)
    store = "bfloat16" if dtype == "bfloat16" else "float16"
    result = run_precompute(inputs, os.path.join(workdir, f"out-{time.time_ns()}"), specs,
                            CodecSpec(num_cpus=0.25, batch_size=args.window), image_size=8, store_dtype=store,
                            window=args.window, read_num_cpus=0.25, write_num_cpus=0.25, commit_interval_s=5.0)
    steady = result.steady_rows_per_s
    return {"result": result.to_dict(), "captions_per_s_steady": steady,
            "captions_per_s_total": result.rows / result.wall_s, "startup_s": result.startup_s}


def run(args: argparse.Namespace) -> int:
    workdir = args.workdir or tempfile.mkdtemp(prefix="lidit-bench-precompute-")
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise LiditError("--device cuda: no GPU visible")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    paths = encoder_paths(args, workdir)
    texts = captions(args.captions)
    report: dict = {"device": device, "dtype": dtype, "captions": len(texts), "encoders": {}}
    for name, path in paths.items():
        naive = naive_loop(path, texts[: args.naive_captions], dtype, device)
        batched = batched_loop(path, texts, dtype, device, args.batch_size)
        report["encoders"][name] = {"path": path, "naive": naive, "batched": batched}
    flow = pipeline(paths, texts, dtype, device, args, workdir)
    report["pipeline"] = {k: v for k, v in flow.items() if k != "result"}
    # all encoders, one after the other, for the single-process loops; at once in the pipeline
    naive_all = 1 / sum(1 / e["naive"]["captions_per_s"] for e in report["encoders"].values())
    batched_all = 1 / sum(1 / e["batched"]["captions_per_s"] for e in report["encoders"].values())
    steady = flow["captions_per_s_steady"] or flow["captions_per_s_total"]
    report["all_encoders"] = {"naive_captions_per_s": naive_all, "batched_captions_per_s": batched_all,
                              "pipeline_captions_per_s_steady": steady,
                              "pipeline_vs_naive": steady / naive_all, "pipeline_vs_batched": steady / batched_all}
    for name, stats in flow["result"]["encoders"].items():
        entry = report["encoders"][name]
        entry["pipeline"] = {"tokens_per_s": stats["tokens"] / (len(texts) / steady),
                             "padding_waste": stats["padding_waste"]}
        if device == "cuda":
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
            flops = entry["batched"]["flops_per_token"]
            entry["batched"]["mfu"] = entry["batched"]["tflops"] / peak if peak else None
            entry["pipeline"]["mfu"] = entry["pipeline"]["tokens_per_s"] * flops / 1e12 / peak if peak else None
    print(format_report(report))
    if args.json:
        print(json.dumps(report))
    return 0


def format_report(report: dict) -> str:
    lines = [f"precompute bench: {report['captions']} captions, {report['device']}, {report['dtype']}",
             f"{'encoder':<10} {'method':<9} {'captions/s':>11} {'tokens/s':>11} {'padding':>8} {'MFU':>6}"]
    for name, entry in report["encoders"].items():
        for method in ("naive", "batched", "pipeline"):
            row = entry.get(method, {})
            caps = row.get("captions_per_s")
            mfu = row.get("mfu")
            lines.append(f"{name:<10} {method:<9} {'' if caps is None else f'{caps:11.1f}':>11} "
                         f"{row.get('tokens_per_s', 0):11.1f} {row.get('padding_waste') or '':>8} "
                         f"{'' if mfu is None else f'{100 * mfu:5.1f}%':>6}")
    total, flow = report["all_encoders"], report["pipeline"]
    lines += [f"all encoders: naive {total['naive_captions_per_s']:.1f} captions/s, batched "
              f"{total['batched_captions_per_s']:.1f}, pipeline steady {total['pipeline_captions_per_s_steady']:.1f} "
              f"(start-up {flow['startup_s']} s, with it {flow['captions_per_s_total']:.1f})",
              f"pipeline / naive = {total['pipeline_vs_naive']:.2f}x (target >= 8), pipeline / batched = "
              f"{total['pipeline_vs_batched']:.2f}x (target >= 0.8)"]
    return "\n".join(lines)
