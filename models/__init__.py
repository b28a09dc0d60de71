"""lidit.models: LI-DiT in pure PyTorch + transformers (arXiv 2406.11831)."""

from lidit.models.encoders import (
    PAPER_INSTRUCTION,
    CaptionFeatures,
    EncoderConfig,
    LLMPromptEncoder,
    PromptFeatures,
    join_prefix,
)

__all__ = [
    "PAPER_INSTRUCTION",
    "CaptionFeatures",
    "EncoderConfig",
    "LLMPromptEncoder",
    "PromptFeatures",
    "join_prefix",
]
