"""LLM prompt encoder: a frozen decoder-only LLM turned into a text encoder (LI-DiT, Sec. 3.2).

The prompt is `prefix + caption + suffix`: the prefix holds everything before the caption (chat
template header, system prompt, the paper's instruction), the suffix the template tokens after it.
Under a causal LLM the prefix states do not depend on the caption, so they are computed once and
their key/value cache is reused for every caption (right padding keeps positions exact).
Tokenisation is piecewise (prefix, caption and suffix tokenised separately); the instruction ends
with a newline so that for byte-level BPE this equals tokenising the joined text.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
from torch import nn

PAPER_INSTRUCTION = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "and spatial relationships of the objects:"
)
DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = dict(zip(get_args(DtypeName), (torch.float32, torch.bfloat16, torch.float16)))
# Bump when a code change alters the features an unchanged EncoderConfig produces.
FEATURE_FORMAT = 1
_HASHED_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".jinja", ".txt", ".tiktoken")
_SENTINEL = "\u2063LIDIT_CAPTION\u2063"


@functools.lru_cache(maxsize=64)
def _hash_files(files: tuple[tuple[str, int, int], ...], folder: str) -> str:
    digest = hashlib.sha256()
    for name, _size, _mtime in files:
        digest.update(name.encode() + b"\0")
        with open(os.path.join(folder, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 23), b""):
                digest.update(chunk)
    return digest.hexdigest()[:40]


def folder_revision(path: str) -> str:
    """Content hash of a model folder's weight, config and tokenizer files (cached by size+mtime)."""
    if not os.path.isdir(path):
        raise ValueError(f"EncoderConfig.path: {path!r} is not a local folder")
    files = tuple(
        (name, st.st_size, st.st_mtime_ns)
        for name in sorted(os.listdir(path))
        if name.endswith(_HASHED_SUFFIXES) and os.path.isfile(os.path.join(path, name))
        for st in [os.stat(os.path.join(path, name))]
    )
    if not files:
        raise ValueError(f"EncoderConfig.path: no weight/config/tokenizer files in {path!r}")
    return _hash_files(files, os.path.abspath(path))


@dataclass(frozen=True)
class EncoderConfig:
    """What fixes an encoder's features. `max_tokens` bounds the caption + suffix tokens
    (OPEN in the paper; peers use 256-300)."""

    path: str
    revision: str | None = None
    instruction: str = PAPER_INSTRUCTION
    use_chat_template: bool = True
    system_prompt: str | None = None  # OPEN in the paper: none by default
    layer: int = -3
    max_tokens: int = 128
    dtype: DtypeName = "float32"
    cut_instruction: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"EncoderConfig.dtype: {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.max_tokens < 1:
            raise ValueError(f"EncoderConfig.max_tokens: must be >= 1, got {self.max_tokens}")

    def resolved_revision(self) -> str:
        return self.revision if self.revision is not None else folder_revision(self.path)

    def features(self) -> "EncoderConfig":
        """This config as a plain `EncoderConfig`: subclasses (a pipeline's `EncoderSpec`) add settings that
        do not change the features."""
        return EncoderConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EncoderConfig)})

    def fingerprint(self) -> str:
        """Stable short hex over everything that changes the features (not the path string)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(EncoderConfig) if f.name != "path"}
        fields["revision"] = self.resolved_revision()
        fields["format"] = FEATURE_FORMAT
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        """Plain dict with the revision resolved and the fingerprint added (for YAML/manifests)."""
        out = dataclasses.asdict(self.features())
        out["revision"] = self.resolved_revision()
        out["fingerprint"] = self.fingerprint()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "EncoderConfig":
        data = dict(data)
        expected = data.pop("fingerprint", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"EncoderConfig.{unknown[0]}: unknown field")
        config = cls(**data)
        if expected is not None and config.revision is not None and config.fingerprint() != expected:
            raise ValueError(f"EncoderConfig.fingerprint: {expected} does not match the fields")
        return config


class CaptionFeatures(NamedTuple):
    """States of the caption + suffix tokens, right padded (padding rows are zero)."""

    states: torch.Tensor  # [B, L, D]
    mask: torch.Tensor  # [B, L] bool
    lengths: torch.Tensor  # [B] long
    truncated: list[int]  # caption tokens cut per row


class PromptFeatures(NamedTuple):
    """One encoder's text for the denoiser: tokens `caption_start:` depend on the caption."""

    states: torch.Tensor  # [B, P+L, D]
    mask: torch.Tensor  # [B, P+L] bool
    caption_start: int


def join_prefix(prefix: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> PromptFeatures:
    """Put the shared instruction-prefix states [P, D] in front of per-caption states [B, L, D]."""
    batch = states.shape[0]
    prefix = prefix.to(device=states.device, dtype=states.dtype)
    joined = torch.cat([prefix.unsqueeze(0).expand(batch, -1, -1), states], dim=1)
    prefix_mask = torch.ones(batch, prefix.shape[0], dtype=torch.bool, device=mask.device)
    return PromptFeatures(joined, torch.cat([prefix_mask, mask.bool()], dim=1), prefix.shape[0])


def _truncate_decoder(decoder: nn.Module, layer: int) -> None:
    """Keep the blocks needed for `hidden_states[layer]`; the final norm only if it is the last."""
    config = decoder.config
    total = config.num_hidden_layers
    keep = layer if layer >= 0 else total + 1 + layer
    if not 0 <= keep <= total:
        raise ValueError(f"EncoderConfig.layer: {layer} is out of range for {total} blocks")
    if keep < total:
        del decoder.layers[keep:]
        decoder.norm = nn.Identity()
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = list(config.layer_types[:keep])
        config.num_hidden_layers = keep


class LLMPromptEncoder(nn.Module):
    """Frozen causal LM -> hidden states of layer `config.layer` for instruction + caption."""

    def __init__(self, config: EncoderConfig, device: str | torch.device = "cpu") -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isdir(config.path):
            raise ValueError(f"EncoderConfig.path: {config.path!r} is not a local folder")
        self._config = config
        self._fingerprint = config.fingerprint()
        self.tokenizer = AutoTokenizer.from_pretrained(config.path)
        causal_lm = AutoModelForCausalLM.from_pretrained(config.path, dtype=DTYPES[config.dtype])
        self.decoder = causal_lm.get_decoder()  # the LM head is never used
        _truncate_decoder(self.decoder, config.layer)
        self.decoder.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.prefix_ids, self.suffix_ids = self._template_ids()
        self._prefix: tuple[torch.Tensor, object] | None = None

    @property
    def config(self) -> EncoderConfig:
        return self._config

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def hidden_size(self) -> int:
        return self.decoder.config.hidden_size

    @property
    def prefix_len(self) -> int:
        return len(self.prefix_ids)

    def _template_ids(self) -> tuple[list[int], list[int]]:
        """Token ids before and after the caption."""
        tok, cfg = self.tokenizer, self._config
        user = f"{cfg.instruction}\n{_SENTINEL}" if cfg.instruction else _SENTINEL
        if cfg.use_chat_template and getattr(tok, "chat_template", None):
            messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
            messages.append({"role": "user", "content": user})
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            before, after = text.split(_SENTINEL)
            return (tok(before, add_special_tokens=False).input_ids, tok(after, add_special_tokens=False).input_ids)
        before = f"{cfg.system_prompt}\n{user}" if cfg.system_prompt else user
        before, after = before.split(_SENTINEL)
        # Special tokens the tokenizer adds around a text (BOS, sometimes EOS), found by a probe.
        plain = tok("x", add_special_tokens=False).input_ids
        full = tok("x").input_ids
        start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
        lead, trail = full[:start], full[start + len(plain) :]
        return lead + tok(before, add_special_tokens=False).input_ids, tok(after, add_special_tokens=False).input_ids + trail

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache, start: int) -> torch.Tensor:
        positions = torch.arange(start, start + ids.shape[1], device=self.device).unsqueeze(0)
        out = self.decoder(
            input_ids=ids, attention_mask=mask, position_ids=positions.expand(ids.shape[0], -1),
            past_key_values=cache, use_cache=cache is not None,
        )
        return out.last_hidden_state

    def _prefix_cache(self) -> tuple[torch.Tensor, object]:
        if self._prefix is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.decoder.config)
            ids = torch.tensor([self.prefix_ids], dtype=torch.long, device=self.device)
            with torch.inference_mode():
                states = self._forward(ids, torch.ones_like(ids), cache, 0)[0] if self.prefix_ids else None
            if states is None:
                states = torch.zeros(0, self.hidden_size, dtype=DTYPES[self._config.dtype], device=self.device)
            self._prefix = (states.clone(), cache)
        return self._prefix

    def encode_prefix(self) -> torch.Tensor:
        """Hidden states [P, D] of the instruction prefix (computed once)."""
        return self._prefix_cache()[0]

    def caption_ids(self, captions: list[str]) -> tuple[list[list[int]], list[int]]:
        """Caption + suffix ids per caption, captions truncated to fit `max_tokens`; tokens cut."""
        budget = max(self._config.max_tokens - len(self.suffix_ids), 0)
        rows, cut = [], []
        for caption in captions:
            ids = self.tokenizer(caption.strip(), add_special_tokens=False).input_ids
            cut.append(max(len(ids) - budget, 0))
            rows.append(ids[:budget] + self.suffix_ids)
        if any(cut):
            warnings.warn(
                f"LLMPromptEncoder: {sum(1 for c in cut if c)} caption(s) truncated to "
                f"max_tokens={self._config.max_tokens}, {sum(cut)} token(s) cut", stacklevel=2,
            )
        return rows, cut

    def encode_captions(self, captions: list[str], batch_size: int = 32) -> CaptionFeatures:
        """States of caption + suffix tokens, reusing the prefix KV cache (Sec. 3.2, right padding).

        Captions are run in length-sorted chunks of `batch_size`; the output keeps input order."""
        if not captions:
            raise ValueError("captions: empty list")
        rows, cut = self.caption_ids(captions)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        width = max(int(lengths.max()), 1)
        dtype = DTYPES[self._config.dtype]
        states = torch.zeros(len(rows), width, self.hidden_size, dtype=dtype, device=self.device)
        prefix_states, prefix_cache = self._prefix_cache()
        pad_id = self.tokenizer.pad_token_id or 0
        order = sorted(range(len(rows)), key=lambda i: lengths[i])
        with torch.inference_mode():
            for first in range(0, len(order), batch_size):
                chunk = order[first : first + batch_size]
                chunk_width = int(lengths[chunk].max())
                if chunk_width == 0:
                    continue
                ids = torch.full((len(chunk), chunk_width), pad_id, dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids[row, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
                row_mask = torch.arange(chunk_width) < lengths[chunk].unsqueeze(1)
                mask = torch.cat([torch.ones(len(chunk), self.prefix_len, dtype=torch.long), row_mask.long()], 1)
                cache = None
                if self.prefix_len:
                    cache = copy.deepcopy(prefix_cache)
                    cache.batch_repeat_interleave(len(chunk))
                out = self._forward(ids.to(self.device), mask.to(self.device), cache, self.prefix_len)
                out = out * row_mask.to(self.device).unsqueeze(-1)
                states[torch.tensor(chunk, device=self.device), :chunk_width] = out
        mask = torch.arange(width) < lengths.unsqueeze(1)
        return CaptionFeatures(states, mask.to(self.device), lengths, cut)

    def encode(self, captions: list[str], batch_size: int = 32) -> PromptFeatures:
        """Prefix joined with caption features; caption only when `cut_instruction`."""
        caption = self.encode_captions(captions, batch_size)
        if self._config.cut_instruction:
            return PromptFeatures(caption.states, caption.mask, 0)
        return join_prefix(self.encode_prefix(), caption.states, caption.mask)
