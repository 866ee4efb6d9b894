"""VLMoConfig: every size and switch of a VLMo model, with the published presets.

Presets follow the paper / reference implementation (see docs/ARCHITECTURE.md):
`base` (12 x 768, VL expert in the top 2 layers), `large` (24 x 1024, top 3),
`base_plus` (24 x 544, top 3, absolute positions, no layer scale) and `tiny` for tests.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union


@dataclass
class VLMoConfig:
    dim: int = 768                      # hidden size
    depth: int = 12                     # number of MoME blocks
    num_heads: int = 12
    mlp_ratio: float = 4.0
    vl_layers: int = 2                  # top layers that also carry the vision-language expert
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 30522             # BERT uncased WordPiece
    max_text_len: int = 40              # longest text the model accepts
    type_vocab_size: int = 2            # BERT token types inside the text embeddings
    relative_position: bool = True      # shared relative-position-bias table (else absolute positions)
    text_relpos_len: int = 196          # text length the 1D relative index is sized for
    layer_scale_init: Optional[float] = 0.1   # gamma_1/gamma_2 init; None disables layer scale
    drop_path_rate: float = 0.1         # rises linearly 0 -> rate over depth
    qkv_bias: bool = True               # q_bias and v_bias (k has none)
    layer_norm_eps: float = 1e-6
    text_layer_norm_eps: float = 1e-12
    init_std: float = 0.02              # truncated-normal std of Linear/Embedding weights (BEiT's 0.02)
    num_classes: int = 0                # > 0 adds a classification head (fine-tuning)
    itc_vl_head: bool = True            # the second ITC head on the VL-expert branch
    name: str = "custom"

    def __post_init__(self):
        self.validate()

    # -- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def num_image_tokens(self) -> int:
        return self.num_patches + 1

    @property
    def vl_start(self) -> int:
        """Index of the first block with a vision-language expert."""
        return self.depth - self.vl_layers

    def num_experts(self, layer: int) -> int:
        return 3 if layer >= self.vl_start else 2

    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"VLMoConfig: {msg}")
        for field in ("dim", "depth", "num_heads", "img_size", "patch_size", "in_chans",
                      "vocab_size", "max_text_len", "type_vocab_size"):
            v = getattr(self, field)
            need(isinstance(v, int) and v > 0, f"{field} must be a positive int, got {v!r}")
        need(self.dim % self.num_heads == 0,
             f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        need(self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        need(0 <= self.vl_layers <= self.depth,
             f"vl_layers must be in [0, depth={self.depth}], got {self.vl_layers}")
        need(self.img_size % self.patch_size == 0,
             f"img_size ({self.img_size}) must be divisible by patch_size ({self.patch_size})")
        need(0.0 <= self.drop_path_rate < 1.0, f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.relative_position:
            need(self.max_text_len <= self.text_relpos_len,
                 f"max_text_len ({self.max_text_len}) exceeds text_relpos_len "
                 f"({self.text_relpos_len}), the text length the relative index is sized for")
            need(self.text_relpos_len >= 2, "text_relpos_len must be >= 2")
        need(self.init_std > 0, f"init_std must be > 0, got {self.init_std}")
        need(self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}")

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VLMoConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"VLMoConfig: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def to_json(self, path: Union[str, Path, None] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: Union[str, Path]) -> "VLMoConfig":
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text()
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> "VLMoConfig":
        return dataclasses.replace(self, **changes)

    # -- presets -------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "VLMoConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], "name": name, **overrides})


PRESETS = {
    # Seconds on a CPU: 2x2 patches, 4 layers (top 2 with the VL expert), short text.
    # init_std ~ dim**-0.5: with BEiT's 0.02 at dim 64 every block starts as a near-identity
    # and a from-scratch run sits at the contrastive saddle (all features alike) for long.
    "tiny": dict(dim=64, depth=4, num_heads=4, vl_layers=2, img_size=32, patch_size=16,
                 max_text_len=16, text_relpos_len=32, drop_path_rate=0.1, init_std=0.125),
    "base": dict(dim=768, depth=12, num_heads=12, vl_layers=2),
    "large": dict(dim=1024, depth=24, num_heads=16, vl_layers=3),
    "base_plus": dict(dim=544, depth=24, num_heads=16, vl_layers=3, relative_position=False,
                      layer_scale_init=None),
}
