"""`lidit bench model`: forward+backward images/s and TFLOP/s of LiDiT next to diffusers'
PixArtTransformer2DModel at equal width, depth, image tokens, text tokens, batch and dtype.

Both models are timed in the same run with the same loop, and their FLOPs are counted by the
same counter (`lidit.models.flops.count_flops`: matmuls, convolutions, attention) on the plain,
uncompiled models. LiDiT's count includes its own extra work (token refiners, collaborative refiner,
position ResBlock). On the CPU LiDiT runs with `apply_cpu_kernels` where they pay (AVX-512; `--cpu-kernels
on|off` decides instead).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lidit.models import LiDiT, PromptFeatures, apply_cpu_kernels, count_flops, lidit_config
from lidit.models.encoders import DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="small", help="LiDiT preset (tiny, small, 1b, 10b)")
    parser.add_argument("--latent-size", type=int, default=32, help="latent height = width")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=64, help="caption tokens per encoder")
    parser.add_argument("--instruction-len", type=int, default=32, help="instruction tokens per encoder")
    parser.add_argument("--encoders", type=int, default=2, help="number of LLM streams")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--cpu-kernels", choices=("auto", "on", "off"), default="auto",
                        help="LiDiT's oneDNN CPU kernels: auto = where they pay (AVX-512), on, off")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per model")
    parser.add_argument("--no-peer", action="store_true", help="skip the PixArt peer")


def _time(step, warmup: int, steps: int, device: str) -> float:
    """Seconds per step after `warmup` untimed steps."""
    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / max(steps, 1)


def _lidit_step(args, dtype):
    """LiDiT, its training step and the FLOPs of that step."""
    encoder_dim = 4096 if args.preset in ("1b", "10b") else 1024
    config = lidit_config(args.preset, encoder_dims=[encoder_dim] * args.encoders)
    model = LiDiT(config).to(args.device, dtype)
    for layer in model.adaln_zero_layers():  # non-zero gates so no branch is skipped by autograd shortcuts
        torch.nn.init.normal_(layer.weight, std=0.02)
    length = args.instruction_len + args.text_len
    text = [PromptFeatures(torch.randn(args.batch, length, encoder_dim, device=args.device, dtype=dtype),
                           torch.ones(args.batch, length, dtype=torch.bool, device=args.device), args.instruction_len)
            for _ in range(args.encoders)]
    x = torch.randn(args.batch, config.in_channels, args.latent_size, args.latent_size, device=args.device, dtype=dtype)
    t = torch.randint(0, 1000, (args.batch,), device=args.device)

    def step_of(forward):
        return lambda: forward(x, t, text).float().square().mean().backward()

    flops = count_flops(step_of(model))
    if args.device == "cpu" and args.cpu_kernels != "off":
        apply_cpu_kernels(model, force=args.cpu_kernels == "on")
    return model, config, encoder_dim, step_of(torch.compile(model) if args.compile else model), flops


def _pixart_step(args, config, encoder_dim, dtype):
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(
        num_attention_heads=config.heads, attention_head_dim=config.width // config.heads,
        in_channels=config.in_channels, out_channels=config.in_channels, num_layers=config.depth,
        patch_size=config.patch_size, sample_size=args.latent_size, cross_attention_dim=config.width,
        caption_channels=encoder_dim, norm_type="ada_norm_single", use_additional_conditions=False,
    ).to(args.device, dtype)
    text_tokens = args.encoders * args.text_len  # what LiDiT cross-attends to after fusion
    x = torch.randn(args.batch, config.in_channels, args.latent_size, args.latent_size, device=args.device, dtype=dtype)
    text = torch.randn(args.batch, text_tokens, encoder_dim, device=args.device, dtype=dtype)
    mask = torch.ones(args.batch, text_tokens, device=args.device, dtype=dtype)
    t = torch.randint(0, 1000, (args.batch,), device=args.device)
    conditions = {"resolution": None, "aspect_ratio": None}

    def step_of(forward):
        def step():
            out = forward(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t,
                          added_cond_kwargs=conditions).sample
            out.float().square().mean().backward()

        return step

    flops = count_flops(step_of(model))
    return model, step_of(torch.compile(model) if args.compile else model), flops


def _sig(value: float) -> float:
    return float(f"{value:.4g}")


def _describe(name: str, model, seconds: float, flops: int, batch: int) -> dict:
    return {"model": name, "params_m": _sig(sum(p.numel() for p in model.parameters()) / 1e6),
            "step_s": _sig(seconds), "images_per_s": _sig(batch / seconds),
            "gflop_per_image": _sig(flops / batch / 1e9), "tflops": _sig(flops / seconds / 1e12)}


def run(args: argparse.Namespace) -> int:
    """Time both models in alternating rounds (so load on a shared machine hits both alike) and
    report each model's median step time."""
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    model, config, encoder_dim, step, flops = _lidit_step(args, dtype)
    entries = [(f"LiDiT-{args.preset}", model, step, flops)]
    if not args.no_peer:
        entries.append(("PixArtTransformer2DModel", *_pixart_step(args, config, encoder_dim, dtype)))
    for _, _, fn, _ in entries:
        _time(fn, args.warmup, 0, args.device)
    times: list[list[float]] = [[] for _ in entries]
    for _ in range(args.rounds):
        for i, (_, _, fn, _) in enumerate(entries):
            times[i].append(_time(fn, 0, args.steps, args.device))
    rows = [_describe(name, m, statistics.median(ts), flops, args.batch)
            for (name, m, _, flops), ts in zip(entries, times)]
    result = {"preset": args.preset, "latent_size": args.latent_size, "batch": args.batch, "dtype": args.dtype,
              "device": args.device, "compile": args.compile, "text_tokens_per_encoder": args.text_len,
              "cpu_kernels": args.device == "cpu" and any(type(m).__name__ == "OneDNNLinear" for m in model.modules()),
              "instruction_tokens": args.instruction_len, "encoders": args.encoders, "rounds": args.rounds,
              "threads": torch.get_num_threads(), "rows": rows}
    if len(rows) == 2:
        result["speedup_images_per_s"] = _sig(rows[0]["images_per_s"] / rows[1]["images_per_s"])
        result["speedup_tflops"] = _sig(rows[0]["tflops"] / rows[1]["tflops"])
    print(f"{'model':<26}{'params M':>10}{'step s':>10}{'img/s':>10}{'GFLOP/img':>12}{'TFLOP/s':>10}")
    for row in rows:
        print(f"{row['model']:<26}{row['params_m']:>10}{row['step_s']:>10}{row['images_per_s']:>10}"
              f"{row['gflop_per_image']:>12}{row['tflops']:>10}")
    if "speedup_images_per_s" in result:
        print(f"LiDiT / peer: {result['speedup_images_per_s']}x images/s, {result['speedup_tflops']}x TFLOP/s")
    if args.json:
        print(json.dumps(result))
    return 0
