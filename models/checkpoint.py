"""Checkpoint directories: safetensors weights (+ EMA), `config.yaml`, resumable training state.

Layout: model.safetensors, ema.safetensors, config.yaml (keys `model`, `encoders`, `codec`, ...),
train_state.json, optimizer.safetensors + optimizer.json. Nothing is ever read through pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from lidit.models.lidit import LiDiT
from lidit.models.presets import LiDiTConfig

REQUIRED_KEYS = ("encoders", "codec")


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}


def _write(path: str, write) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
    _write(path, lambda tmp: Path(tmp).write_text(text))


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors, JSON index) without pickle."""
    tensors, index = {}, {"param_groups": state["param_groups"], "state": {}}
    for param_id, values in state["state"].items():
        entry = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                key = f"state.{param_id}.{name}"
                tensors[key] = value.detach().contiguous().cpu()
                entry[name] = {"tensor": key}
            else:
                entry[name] = {"value": value}
        index["state"][str(param_id)] = entry
    return tensors, index


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], index: dict) -> dict:
    state = {
        int(param_id): {name: tensors[v["tensor"]] if "tensor" in v else v["value"] for name, v in entry.items()}
        for param_id, entry in index["state"].items()
    }
    return {"state": state, "param_groups": index["param_groups"]}


def save_checkpoint(
    dirpath: str, model: LiDiT, ema: LiDiT | dict | None, config: dict,
    train_state: dict | None = None, optimizer_state: dict | None = None,
) -> None:
    """Write a checkpoint directory (local). `config` needs `encoders` (encoder dicts with
    fingerprints) and `codec`; `model` is filled from the model's own config."""
    for key in REQUIRED_KEYS:
        if key not in config:
            raise ValueError(f"config.{key}: missing (a checkpoint records the {key} it was trained with)")
    os.makedirs(dirpath, exist_ok=True)
    config = {**config, "model": model.config.to_dict()}
    _write(os.path.join(dirpath, "model.safetensors"), lambda p: save_file(_tensors(model.state_dict()), p))
    if ema is not None:
        ema_state = ema.state_dict() if isinstance(ema, torch.nn.Module) else ema
        _write(os.path.join(dirpath, "ema.safetensors"), lambda p: save_file(_tensors(ema_state), p))
    if optimizer_state is not None:
        tensors, index = _flatten_optimizer(optimizer_state)
        _write(os.path.join(dirpath, "optimizer.safetensors"), lambda p: save_file(tensors, p))
        _write_text(os.path.join(dirpath, "optimizer.json"), json.dumps(index))
    if train_state is not None:
        _write_text(os.path.join(dirpath, "train_state.json"), json.dumps(train_state))
    # config.yaml last: its presence marks a complete checkpoint
    _write_text(os.path.join(dirpath, "config.yaml"), yaml.safe_dump(config, sort_keys=False))


def load_config(dirpath: str) -> dict:
    path = os.path.join(dirpath, "config.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no config.yaml in {dirpath!r}")
    with open(path) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"config.model: missing in {path}")
    return config


def load_checkpoint(dirpath: str, use_ema: bool = True, device: str | torch.device = "cpu") -> tuple[LiDiT, dict]:
    """Rebuild the model from config.yaml and load the EMA weights (if present and asked) or the raw ones."""
    config = load_config(dirpath)
    model = LiDiT(LiDiTConfig.from_dict(config["model"]))
    ema_path = os.path.join(dirpath, "ema.safetensors")
    path = ema_path if use_ema and os.path.isfile(ema_path) else os.path.join(dirpath, "model.safetensors")
    model.load_state_dict(load_file(path, device=str(device)))
    return model.to(device).eval(), config


def load_training_state(dirpath: str) -> dict:
    """{'train_state': dict | None, 'optimizer_state': dict | None, 'model': state dict, 'ema': state dict | None}."""
    out: dict = {"train_state": None, "optimizer_state": None, "ema": None}
    path = os.path.join(dirpath, "train_state.json")
    if os.path.isfile(path):
        with open(path) as f:
            out["train_state"] = json.load(f)
    if os.path.isfile(os.path.join(dirpath, "optimizer.json")):
        with open(os.path.join(dirpath, "optimizer.json")) as f:
            index = json.load(f)
        out["optimizer_state"] = _unflatten_optimizer(load_file(os.path.join(dirpath, "optimizer.safetensors")), index)
    out["model"] = load_file(os.path.join(dirpath, "model.safetensors"))
    if os.path.isfile(os.path.join(dirpath, "ema.safetensors")):
        out["ema"] = load_file(os.path.join(dirpath, "ema.safetensors"))
    return out
