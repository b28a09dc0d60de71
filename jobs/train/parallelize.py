"""Parallelisms applied to a plain LI-DiT from outside (torchtitan style): the model code knows
nothing of how it is distributed.

Order, as in torchtitan: CPU kernels -> activation checkpointing -> torch.compile (per block) -> FSDP2
`fully_shard` (per block, then the root) or DDP. Every function keeps parameter names unchanged,
so checkpoints written from any strategy load into a plain `LiDiT`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from lidit.jobs.train.spec import Strategy
from lidit.models import LiDiT
from lidit.models.cpu_kernels import apply_cpu_kernels


def repeated_blocks(model: LiDiT) -> list[nn.Module]:
    """The units that checkpointing, compilation and sharding act on: backbone blocks and refiners."""
    units: list[nn.Module] = list(model.blocks)
    for refiner in model.token_refiners:
        units.extend(refiner.blocks)
    if model.collaborative_refiner is not None:
        units.extend(model.collaborative_refiner.blocks)
    return units


def apply_activation_checkpointing(model: LiDiT) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    The block's `forward` is wrapped in place (no wrapper module), so state-dict keys stay the same."""
    for block in repeated_blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: LiDiT) -> None:
    """`torch.compile` each repeated block in place (identical blocks share one compiled graph)."""
    for block in repeated_blocks(model):
        block.compile()


def apply_fsdp(model: LiDiT, bf16: bool, reshard_after_forward: bool = True) -> LiDiT:
    """FSDP2: shard every repeated block, then the root (embedders, null text, final layer).

    Parameters stay float32 (the optimizer's master copy); with `bf16` they are gathered in
    bfloat16 for compute and gradients reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in repeated_blocks(model):
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def apply_ddp(model: LiDiT, device: torch.device) -> nn.Module:
    """Replicate the model, all-reduce gradients. The null caption is unused when text dropout is 0."""
    unused = model.config.text_dropout == 0
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=unused)


def resolve_strategy(strategy: Strategy, world_size: int) -> Strategy:
    """'auto': DDP when there are several workers, nothing for one."""
    if strategy == "auto":
        return "ddp" if world_size > 1 else "none"
    if strategy in ("ddp", "fsdp") and not dist.is_initialized():
        raise RuntimeError(f"train.strategy: {strategy} needs torch.distributed to be initialised")
    return strategy


def parallelize(
    model: LiDiT, strategy: Strategy, device: torch.device, bf16: bool = False,
    compile: bool = False, activation_checkpointing: bool = False,
) -> nn.Module:
    """Apply the chosen parallelisms to a model already on `device`; returns the module to train."""
    if device.type == "cpu":
        apply_cpu_kernels(model)  # eager float32 GEMMs through oneDNN; a no-op under autocast or compile
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if strategy == "fsdp":
        return apply_fsdp(model, bf16)
    if strategy == "ddp":
        return apply_ddp(model, device)
    return model


def unwrap(model: nn.Module) -> LiDiT:
    """The LiDiT inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module, active: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on the micro-batches of an accumulation that are not the last."""
    if not active:
        yield
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    if is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def autocast(device: torch.device, bf16: bool, sharded: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast for DDP / single-worker runs; FSDP2 casts through its mixed-precision policy."""
    if not bf16 or sharded:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on CPU (gathered from every rank for FSDP; collective there)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state into a plain, DDP or FSDP2 model."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    unwrap(model).load_state_dict(state)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def sharded_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """This rank's part of an FSDP2 optimizer state as (tensors, JSON index): no gather, no pickle."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    index: dict = {"param_groups": state["param_groups"], "state": {}}
    for param_id, values in state["state"].items():
        entry = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                key = f"state.{param_id}.{name}"
                tensors[key] = _local(value).detach().contiguous().cpu()
                entry[name] = {"tensor": key}
            else:
                entry[name] = {"value": value}
        index["state"][str(param_id)] = entry
    return tensors, index


def load_sharded_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], index: dict) -> None:
    """Inverse of `sharded_optimizer_state` on the same world size: local shards back into DTensors
    laid out like their parameters."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for param_id, entry in index["state"].items():
        param = params[int(param_id)]
        values = {}
        for name, item in entry.items():
            if "value" in item:
                values[name] = item["value"]
                continue
            local = tensors[item["tensor"]]
            if isinstance(param, DTensor) and local.shape == param.to_local().shape:  # moments, not `step`
                local = DTensor.from_local(local.to(param.to_local().device), param.device_mesh, param.placements,
                                           run_check=False, shape=param.shape, stride=param.stride())
            values[name] = local
        state[int(param_id)] = values
    optimizer.load_state_dict({"state": state, "param_groups": index["param_groups"]})
