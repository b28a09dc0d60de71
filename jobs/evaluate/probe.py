"""Positional-bias probe (LI-DiT Sec. 3.2 and its appendix diagnostic).

Under a decoder-only LLM's causal mask a caption token never sees the words after it, so the features
of "a red circle" in "a red circle to the left of a blue square" cannot depend on "square". The probe
measures exactly that: for caption pairs that differ only in their last word, the relative change of
the features of the tokens before that word, mean over tokens and pairs,

    change = mean_k ||f_A[k] - f_B[k]|| / ||f_A[k]||     (k: caption tokens before the changed word)

for the raw LLM states (0 for a causal LLM), after the model's linguistic token refiner (bidirectional:
> 0 once its gates have opened in training) and after the collaborative refiner's fusion.
"""

from __future__ import annotations

import random

import torch

from lidit.models.encoders import LLMPromptEncoder, PromptFeatures
from lidit.models.lidit import LiDiT
from lidit.pipelines.shapes import PALETTE, RELATIONS, SHAPES


def caption_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """Spatial captions and their twin with the last word (the second shape) changed."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        first, second = rng.sample(list(PALETTE), 2)
        shape, last = rng.choice(SHAPES), rng.choice(SHAPES)
        other = rng.choice([s for s in SHAPES if s != last])
        relation = {"left of": "to the left of", "right of": "to the right of"}.get(r := rng.choice(RELATIONS), r)
        stem = f"a {first} {shape} {relation} a {second}"
        pairs.append((f"{stem} {last}", f"{stem} {other}"))
    return pairs


def _shared_tokens(encoder: LLMPromptEncoder, pairs: list[tuple[str, str]]) -> list[int]:
    """Per pair, how many leading caption tokens the two captions share (the tokens before the change)."""
    a, _ = encoder.caption_ids([p[0] for p in pairs])
    b, _ = encoder.caption_ids([p[1] for p in pairs])
    shared = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        shared.append(n)
    return shared


def _change(a: torch.Tensor, b: torch.Tensor, offsets: list[int], shared: list[int]) -> float:
    """Mean relative change of rows offsets[i] : offsets[i] + shared[i] of pair i."""
    values = []
    for i, (start, n) in enumerate(zip(offsets, shared)):
        fa, fb = a[i, start : start + n].float(), b[i, start : start + n].float()
        values.append(((fa - fb).norm(dim=-1) / fa.norm(dim=-1).clamp(min=1e-12)).mean())
    return float(torch.stack(values).mean()) if values else float("nan")


@torch.inference_mode()
def positional_bias(
    encoders: dict[str, LLMPromptEncoder], model: LiDiT | None = None, pairs: list[tuple[str, str]] | None = None,
    timestep: int = 500,
) -> list[dict]:
    """One row per encoder: `raw` change, and with a model `refined` (its linguistic token refiner) and
    `fused` (after the collaborative refiner, or the plain concatenation when it has none)."""
    pairs = pairs or caption_pairs(16)
    captions = [p[0] for p in pairs] + [p[1] for p in pairs]
    n = len(pairs)
    features: list[PromptFeatures] = []
    rows = []
    for name, encoder in encoders.items():
        text = encoder.encode(captions)  # one batch: both halves get the same padding
        features.append(text)
        shared = _shared_tokens(encoder, pairs)
        rows.append({"encoder": name, "tokens": sum(shared) / n, "_shared": shared, "_start": text.caption_start,
                     "raw": _change(text.states[:n], text.states[n:], [text.caption_start] * n, shared)})
    if model is None:
        return [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    device = next(model.parameters()).device
    features = [PromptFeatures(f.states.float().to(device), f.mask.to(device), f.caption_start) for f in features]
    t = torch.full((2 * n,), timestep, dtype=torch.long, device=device)
    text_t = model.text_t_embedder(t)
    offset = 0
    fused, _ = model.encode_text(features, t)
    for row, refiner, f in zip(rows, model.token_refiners, features):
        refined, _ = refiner(f.states, f.mask, text_t)
        row["refined"] = _change(refined[:n], refined[n:], [row["_start"]] * n, row["_shared"])
        row["fused"] = _change(fused[:n], fused[n:], [offset] * n, row["_shared"])
        offset += f.states.shape[1] - f.caption_start
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]


def format_rows(rows: list[dict]) -> str:
    """A small text table of probe rows."""
    columns = [c for c in ("encoder", "tokens", "raw", "refined", "fused") if any(c in r for r in rows)]
    lines = ["  ".join(f"{c:>12}" for c in columns)]
    for row in rows:
        cells = [row.get(c, "") for c in columns]
        lines.append("  ".join(f"{v:>12.4g}" if isinstance(v, float) else f"{v!s:>12}" for v in cells))
    return "\n".join(lines)
