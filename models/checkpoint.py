"""Checkpoint directories: safetensors weights (+ EMA), `config.yaml`, resumable training state.

Layout: model.safetensors, ema.safetensors, config.yaml, train_state.json, optimizer.safetensors +
optimizer.json. Nothing is ever read through pickle. `config.yaml` says what the weights mean; it is
written and read through `CheckpointInfo` only (docs/contracts.md), so training, evaluation and serving
agree on it: the model config, the encoders, the codec, the diffusion schedule and the image size.
"""

from __future__ import annotations

import json
import os
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from lidit.models.codecs import codec_geometry
from lidit.models.diffusion import DiffusionSchedule
from lidit.models.encoders import EncoderConfig
from lidit.models.lidit import LiDiT
from lidit.models.presets import LiDiTConfig


@dataclass(frozen=True)
class EncoderEntry:
    """One LLM the model was trained with: its feature config, and the dtype its training features were
    stored in (inference rounds to it, so the model sees what it was trained on)."""

    name: str
    config: EncoderConfig
    stored_dtype: str | None = None
    hidden_size: int | None = None
    prefix_len: int | None = None

    def to_dict(self) -> dict:
        extra = {"stored_dtype": self.stored_dtype, "hidden_size": self.hidden_size, "prefix_len": self.prefix_len}
        return {"name": self.name, **self.config.to_dict(), **{k: v for k, v in extra.items() if v is not None}}


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's weights mean, typed. `image_size` is (height, width) in pixels: the size the
    model was trained at, which evaluation and serving generate by default."""

    model: LiDiTConfig
    encoders: tuple[EncoderEntry, ...]
    codec: dict
    image_size: tuple[int, int]
    schedule: dict = field(default_factory=lambda: DiffusionSchedule().config())
    dataset: dict | None = None

    @property
    def latent_size(self) -> tuple[int, int]:
        downsample = codec_geometry(self.codec)[1]
        return self.image_size[0] // downsample, self.image_size[1] // downsample

    def diffusion_schedule(self) -> DiffusionSchedule:
        return DiffusionSchedule(**self.schedule)

    def to_config(self) -> dict:
        """The `config.yaml` mapping."""
        out = {"model": self.model.to_dict(), "encoders": [e.to_dict() for e in self.encoders], "codec": self.codec,
               "image_size": list(self.image_size), "schedule": self.schedule}
        return out | ({"dataset": self.dataset} if self.dataset is not None else {})

    @classmethod
    def from_config(cls, config: dict) -> "CheckpointInfo":
        """Parse a `config.yaml` mapping; a field at fault raises `ValueError` naming it. Checkpoints written
        before `image_size` was the one key recorded the latent `image_shape` [C, h, w] instead."""
        if not isinstance(config, dict):
            raise ValueError("config: not a mapping")
        for key in ("model", "encoders", "codec"):
            if key not in config:
                raise ValueError(f"config.{key}: missing (a checkpoint records the {key} it was trained with)")
        model = LiDiTConfig.from_dict(config["model"])
        codec = dict(config["codec"])
        return cls(model, _encoder_entries(config["encoders"]), codec, _image_size(config, codec),
                   dict(config.get("schedule") or DiffusionSchedule().config()), config.get("dataset"))


def _encoder_entries(entries) -> tuple[EncoderEntry, ...]:
    """Encoder entries: a list of dicts with a `name` and the flat EncoderConfig fields (+ `fingerprint`,
    `stored_dtype`, `hidden_size`, `prefix_len`), or a mapping name -> fields."""
    if isinstance(entries, dict):
        entries = [{"name": name, **fields} for name, fields in entries.items()]
    if not entries:
        raise ValueError("config.encoders: the checkpoint lists no encoders")
    names = {f.name for f in dataclasses.fields(EncoderConfig)} | {"fingerprint"}
    out = []
    for index, entry in enumerate(entries):
        entry = dict(entry)
        name = str(entry.pop("name", f"encoder{index}"))
        try:
            config = EncoderConfig.from_dict({k: v for k, v in entry.items() if k in names})
        except (TypeError, ValueError) as err:
            raise ValueError(f"config.encoders.{index} ({name}): {err}") from None
        out.append(EncoderEntry(name, config, entry.get("stored_dtype"), entry.get("hidden_size"),
                                entry.get("prefix_len")))
    return tuple(out)


def _image_size(config: dict, codec: dict) -> tuple[int, int]:
    size = config.get("image_size")
    if size is None and config.get("image_shape"):  # older checkpoints: latent [C, h, w]
        downsample = codec_geometry(codec)[1]
        return tuple(int(n) * downsample for n in config["image_shape"][-2:])
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(n, int) and n > 0 for n in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"config.image_size: expected [height, width] in pixels, got {size!r}")


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
    dirpath: str, model: LiDiT, ema: LiDiT | dict | None, info: CheckpointInfo,
    train_state: dict | None = None, optimizer_state: dict | None = None,
) -> None:
    """Write a checkpoint directory (local); `config.yaml` is `info` with the model's own config."""
    config = dataclasses.replace(info, model=model.config).to_config()
    os.makedirs(dirpath, exist_ok=True)
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


def read_checkpoint_info(dirpath: str) -> CheckpointInfo:
    """The `CheckpointInfo` of a local checkpoint folder (its config.yaml; no weights are read)."""
    path = os.path.join(dirpath, "config.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no config.yaml in {dirpath!r}")
    with open(path) as f:
        return CheckpointInfo.from_config(yaml.safe_load(f))


def load_checkpoint(dirpath: str, use_ema: bool = True,
                    device: str | torch.device = "cpu") -> tuple[LiDiT, CheckpointInfo]:
    """Rebuild the model from config.yaml and load the EMA weights (if present and asked) or the raw ones."""
    config = read_checkpoint_info(dirpath)
    model = LiDiT(config.model)
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
