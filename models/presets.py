"""LiDiTConfig and the size presets (LI-DiT Sec. 4: 1B = 28 x 1152, 16 heads; 10B = 48 x 2816, 44 heads)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Literal, get_args

POOLED_TEXT = ("refined", "none")
GELU_APPROXIMATIONS = ("tanh", "none")


@dataclass
class LiDiTConfig:
    """Everything that fixes the trainable model's shape. Paper OPEN points and the choices here:
    pooled text for adaLN = masked mean of the fused refined caption tokens ("refined"; "none" =
    timestep only); text width = backbone width; refiner heads = backbone heads; CFG text dropout 0.1."""

    in_channels: int = 16  # 8x VAE with 16 latent channels (paper); 3 for identity pixels
    patch_size: int = 2
    width: int = 1152
    depth: int = 28
    heads: int = 16
    mlp_ratio: float = 4.0
    text_dim: int = 1152
    text_heads: int = 16
    refiner_depth: int = 2
    encoder_dims: list[int] = field(default_factory=lambda: [4096, 4096])
    refiner_causal: bool = False
    use_refiner: bool = True
    use_collaborative: bool = True
    pooled_text: str = "refined"
    qk_norm: bool = True
    text_dropout: float = 0.1
    # the MLPs' GELU, as F.gelu's `approximate`: "tanh" (DiT's choice, and what configs saved before this
    # field existed used) or "none" (exact erf), which every preset takes: PyTorch's CPU tanh is not
    # vectorised, so the tanh GELU costs as much as the GEMM before it (docs/models.md, "Speed")
    gelu: str = "tanh"

    def __post_init__(self) -> None:
        for name in ("in_channels", "patch_size", "width", "depth", "heads", "text_dim", "text_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"LiDiTConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"LiDiTConfig.heads: width {self.width} is not divisible by {self.heads}")
        if self.text_dim % self.text_heads:
            raise ValueError(f"LiDiTConfig.text_heads: text_dim {self.text_dim} is not divisible by {self.text_heads}")
        if not self.encoder_dims or min(self.encoder_dims) < 1:
            raise ValueError(f"LiDiTConfig.encoder_dims: need at least one positive width, got {self.encoder_dims}")
        if self.pooled_text not in POOLED_TEXT:
            raise ValueError(f"LiDiTConfig.pooled_text: {self.pooled_text!r} is not one of {POOLED_TEXT}")
        if self.gelu not in GELU_APPROXIMATIONS:
            raise ValueError(f"LiDiTConfig.gelu: {self.gelu!r} is not one of {GELU_APPROXIMATIONS}")
        if not 0.0 <= self.text_dropout < 1.0:
            raise ValueError(f"LiDiTConfig.text_dropout: must be in [0, 1), got {self.text_dropout}")
        self.encoder_dims = [int(d) for d in self.encoder_dims]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LiDiTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"LiDiTConfig.{unknown[0]}: unknown field")
        return cls(**data)


def _preset(width: int, depth: int, heads: int, **defaults) -> Callable[..., LiDiTConfig]:
    def make(**overrides) -> LiDiTConfig:
        values = {"width": width, "depth": depth, "heads": heads, "text_dim": width, "text_heads": heads, "gelu": "none",
                  **defaults}
        return LiDiTConfig(**{**values, **overrides})

    return make


PresetName = Literal["tiny", "mini", "small", "1b", "10b"]
PRESETS: dict[str, Callable[..., LiDiTConfig]] = {
    "tiny": _preset(64, 2, 4, in_channels=3, encoder_dims=[64, 96]),  # CPU tests (tiny LLM widths)
    # the CPU demo at 32 px pixels: 8x8 patches of 4 px keep a step cheap on 2 cores; narrower text width
    "mini": _preset(96, 3, 4, in_channels=3, patch_size=4, text_dim=64, text_heads=4),
    "small": _preset(384, 12, 6, in_channels=4),  # DiT-S width/depth
    "1b": _preset(1152, 28, 16),
    "10b": _preset(2816, 48, 44),
}
assert tuple(PRESETS) == get_args(PresetName)  # one name set: the factories and the type agree


def lidit_config(preset: str, **overrides) -> LiDiTConfig:
    """`lidit_config("1b", encoder_dims=[4096])`: a preset with field overrides."""
    if preset not in PRESETS:
        raise ValueError(f"preset: {preset!r} is not one of {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(LiDiTConfig)})
    if unknown:
        raise ValueError(f"LiDiTConfig.{unknown[0]}: unknown field")
    return PRESETS[preset](**overrides)
