"""lidit.models: LI-DiT in pure PyTorch + transformers (arXiv 2406.11831)."""

from lidit.models.checkpoint import (
    CheckpointInfo,
    EncoderEntry,
    load_checkpoint,
    load_training_state,
    read_checkpoint_info,
    save_checkpoint,
)
from lidit.models.codecs import IdentityCodec, ImageCodec, VAECodec, codec_from_config
from lidit.models.cpu_kernels import apply_cpu_kernels
from lidit.models.diffusion import DiffusionSchedule, denoising_error, diffusion_loss, sample
from lidit.models.encoders import (
    PAPER_INSTRUCTION,
    CaptionFeatures,
    EncoderConfig,
    LLMPromptEncoder,
    PromptFeatures,
    join_prefix,
)
from lidit.models.flops import count_flops, flops_per_image
from lidit.models.lidit import LiDiT, LiDiTBlock
from lidit.models.presets import PRESETS, LiDiTConfig, lidit_config
from lidit.models.refiners import CollaborativeRefiner, LinguisticTokenRefiner

__all__ = [
    "PAPER_INSTRUCTION",
    "PRESETS",
    "CaptionFeatures",
    "CheckpointInfo",
    "CollaborativeRefiner",
    "DiffusionSchedule",
    "EncoderConfig",
    "EncoderEntry",
    "IdentityCodec",
    "ImageCodec",
    "LLMPromptEncoder",
    "LiDiT",
    "LiDiTBlock",
    "LiDiTConfig",
    "LinguisticTokenRefiner",
    "PromptFeatures",
    "VAECodec",
    "apply_cpu_kernels",
    "codec_from_config",
    "count_flops",
    "denoising_error",
    "diffusion_loss",
    "flops_per_image",
    "join_prefix",
    "lidit_config",
    "load_checkpoint",
    "load_training_state",
    "read_checkpoint_info",
    "sample",
    "save_checkpoint",
]
