"""Exponential moving average of the parameters, laid out like them (sharded under FSDP2)."""

from __future__ import annotations

import torch
from torch import nn

from lidit.jobs.train import parallelize as parallel


class EMA:
    """Exponential moving average of the parameters (DiT: decay 0.9999), kept in float32 and laid
    out like the parameters (sharded under FSDP2)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [name for name, _ in parallel.unwrap(model).named_parameters()]
        self.shadow = [p.detach().clone().float() for p in parallel.unwrap(model).parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Average in the parameters after optimizer step `step` (0-based). The decay warms up as
        (1 + step) / (10 + step) up to `decay` (the usual EMA warm-up), so a short run's average is
        not mostly the initial weights: with 0.9999 and no warm-up, 600 steps keep 94 % of them."""
        decay = min(self.decay, (1 + step) / (10 + step))
        params = [p.detach().float() for p in parallel.unwrap(model).parameters()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - decay)

    def full_state_dict(self, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`model_state` with the parameters replaced by their averages (collective under FSDP2)."""
        from torch.distributed.tensor import DTensor

        out = dict(model_state)
        for name, value in zip(self.names, self.shadow):
            out[name] = (value.full_tensor() if isinstance(value, DTensor) else value).cpu()
        return out

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        for name, value in zip(self.names, self.shadow):
            full = state[name].to(value.device if not isinstance(value, DTensor) else value.to_local().device)
            value.copy_(distribute_tensor(full, value.device_mesh, value.placements) if isinstance(value, DTensor) else full)
