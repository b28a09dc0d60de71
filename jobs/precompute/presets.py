"""Encoder presets for job specs: `encoders: real` (the default), `encoders: tiny`, or an explicit list.

- `real`: the two real LLMs that install offline from PyPI, mirroring the paper's pair of one
  instruction-tuned and one base LLM (LI-DiT Sec. 4.3, "+ instruction"): SmolLM2-135M-Instruct
  gets the paper's instruction inside its chat template, Gemma-3-270M (base) as a plain prefix
  after its BOS token. Both give `hidden_states[-3]`, computed in bfloat16 (the weights are stored
  in bf16, and on this CPU as on a GPU bf16 is the fast path: docs/real_llms.md).
- `tiny`: two tiny random Llama/Qwen2 LLMs built offline in a second, for fast tests and smoke runs.

The models are built or imported into `models_dir` on first use (`lidit models import-bundled`
does the same ahead of time); later runs find them there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Callable, Union

from pydantic import AfterValidator

from lidit.pipelines.stages import EncoderSpec
from lidit.platform.config import SpecError, parse_spec


def default_models_dir() -> Path:
    """Where presets put their models unless a job says otherwise: `$LIDIT_CACHE/models`."""
    from lidit.platform.storage import cache_dir

    return cache_dir() / "models"


def _real(models_dir: Path) -> list[EncoderSpec]:
    from lidit.models.gguf import import_bundled

    paths = import_bundled(models_dir)
    return [
        EncoderSpec(name="smollm2", path=paths["smollm2"], use_chat_template=True, dtype="bfloat16"),
        EncoderSpec(name="gemma3", path=paths["gemma3"], use_chat_template=False, dtype="bfloat16"),
    ]


def _tiny(models_dir: Path) -> list[EncoderSpec]:
    from lidit.models.tiny_llms import make_tiny_llms

    paths = make_tiny_llms(models_dir / "tiny")
    return [
        EncoderSpec(name="tiny_llama", path=paths["tiny-llama"], use_chat_template=False),
        EncoderSpec(name="tiny_qwen2", path=paths["tiny-qwen2"], use_chat_template=True),
    ]


PRESETS: dict[str, Callable[[Path], list[EncoderSpec]]] = {"real": _real, "tiny": _tiny}
# which preset each encoder name comes from, so a list may name single encoders: [smollm2]
PRESET_OF = {"smollm2": "real", "gemma3": "real", "tiny_llama": "tiny", "tiny_qwen2": "tiny"}


def _choices() -> str:
    return ", ".join([*PRESETS, *PRESET_OF])


def _known_presets(value: str | list) -> str | list:
    """Preset names are checked when a spec loads; their models are built or imported only when used."""
    items = [value] if isinstance(value, str) else value
    if not items:
        raise ValueError(f"expected a preset name ({', '.join(PRESETS)}) or a non-empty list of encoders")
    for item in items:
        if isinstance(item, str) and item not in PRESETS and item not in PRESET_OF:
            raise ValueError(f"unknown encoder preset {item!r} (choose from {_choices()}, or give a spec)")
    return value


# A spec field naming encoders: a preset, a preset encoder's name, or a list of names and encoder specs.
EncodersValue = Annotated[Union[str, list[Union[str, EncoderSpec]]], AfterValidator(_known_presets)]


def resolve_encoders(value: EncodersValue, models_dir: str | os.PathLike | None = None,
                     field: str = "encoders") -> list[EncoderSpec]:
    """Encoder specs for a preset name (`real`, `tiny`), one preset encoder's name (`smollm2`), or a
    list of such names and explicit encoder specs; builds or imports preset models on first use.

    Raises `SpecError` naming `field` (e.g. `encoders.1.path: Field required`) for a bad value."""
    root = Path(models_dir) if models_dir is not None else default_models_dir()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise SpecError(f"{field}: expected a preset name ({', '.join(PRESETS)}) or a non-empty list of encoders")
    built: dict[str, list[EncoderSpec]] = {}

    def preset(name: str) -> list[EncoderSpec]:
        if name not in built:
            built[name] = PRESETS[name](root)
        return built[name]

    specs: list[EncoderSpec] = []
    for index, item in enumerate(items):
        where = field if isinstance(value, str) else f"{field}.{index}"
        if isinstance(item, EncoderSpec):
            specs.append(item)
        elif isinstance(item, dict):
            specs.append(parse_spec(EncoderSpec, item, source=where))
        elif isinstance(item, str) and item in PRESETS:
            specs.extend(preset(item))
        elif isinstance(item, str) and item in PRESET_OF:
            specs.extend(s for s in preset(PRESET_OF[item]) if s.name == item)
        else:
            raise SpecError(f"{where}: unknown encoder preset {item!r} (choose from {_choices()}, or give a spec)")
    names = [s.name for s in specs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise SpecError(f"{field}: encoder name {duplicate!r} appears twice; names must be unique")
    return specs

