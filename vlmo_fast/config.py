"""VLMoConfig: every size and switch of a VLMo model, with the published presets.

Presets follow the paper / reference implementation (see docs/ARCHITECTURE.md):
`base` (12 x 768, VL expert in the top 2 layers), `large` (24 x 1024, top 3),
`base_plus` (24 x 544, top 3, absolute positions, no layer scale) and `tiny` for tests.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .io import atomic_write_text

# VLMoConfig.attention: one self-attention for all tokens, or one per modality (Table 7)
ATTENTION_MODES = ("shared", "per_modality")


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
    # Ablation switches (the paper's Tables 5 and 7); the defaults are VLMo.
    # vl_expert=False: image-text pairs use the vision / language experts by token type in the
    # top vl_layers too (no token reaches the VL expert, whose weights stay in the bank so the
    # checkpoint layout is unchanged: they get no gradient, only AdamW's weight decay), and
    # there is no itc_vl head (no VL-expert branch).
    vl_expert: bool = True
    # "shared": one self-attention per block for every token (VLMo). "per_modality": each
    # block has a vision attention (`attn`) and a language attention (`attn_text`); every
    # token is projected (q, k, v and output) by its own modality's weights, and all tokens
    # of a sequence still attend to each other (a pair's image and text tokens jointly).
    attention: str = "shared"
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
        """Check every field's type (bool is bool, int is int and not bool, float accepts an
        int) and range, naming the field; normalises int -> float for float fields."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(f.name, getattr(self, f.name), hints[f.name]))

        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"VLMoConfig: {msg}")
        for field in ("dim", "depth", "num_heads", "img_size", "patch_size", "in_chans",
                      "vocab_size", "max_text_len", "type_vocab_size", "text_relpos_len"):
            v = getattr(self, field)
            need(v > 0, f"{field} must be a positive int, got {v!r}")
        need(self.dim % self.num_heads == 0,
             f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        need(math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0,
             f"mlp_ratio must be a finite number > 0, got {self.mlp_ratio}")
        need(self.mlp_hidden_dim >= 1, f"mlp_ratio ({self.mlp_ratio}) gives an FFN hidden size of "
                                       f"int(dim * mlp_ratio) = {self.mlp_hidden_dim}; it must be >= 1")
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
        if self.layer_scale_init is not None:
            need(math.isfinite(self.layer_scale_init),
                 f"layer_scale_init must be finite (None disables layer scale), got {self.layer_scale_init}")
        for field in ("layer_norm_eps", "text_layer_norm_eps", "init_std"):
            v = getattr(self, field)
            need(math.isfinite(v) and v > 0, f"{field} must be a finite number > 0, got {v!r}")
        need(self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}")
        need(self.attention in ATTENTION_MODES,
             f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        need(len(self.name) > 0, "name must be a non-empty str")

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def _check_names(cls, names, what: str) -> None:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(names) - known)
        if unknown:
            raise TypeError(f"{what}: unknown VLMoConfig field(s) {unknown}; fields: {sorted(known)}")

    @classmethod
    def from_dict(cls, data: dict) -> "VLMoConfig":
        if not isinstance(data, dict):
            raise TypeError(f"VLMoConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"VLMoConfig: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def to_json(self, path: Union[str, Path, None] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_json_string(cls, text: str, source: str = "config JSON") -> "VLMoConfig":
        """Parse a JSON text; errors name `source` (e.g. the file it came from)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object of VLMoConfig fields, "
                             f"got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path_or_text: Union[str, Path]) -> "VLMoConfig":
        """From a config.json path, or from JSON text (a str starting with '{' that is not an
        existing file's name). A Path is always a path."""
        if isinstance(path_or_text, str) and path_or_text.lstrip().startswith("{") \
                and not os.path.exists(path_or_text):
            return cls.from_json_string(path_or_text)
        path = Path(path_or_text)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from None
        return cls.from_json_string(text, source=str(path))

    def replace(self, **changes) -> "VLMoConfig":
        self._check_names(changes, "VLMoConfig.replace")
        return dataclasses.replace(self, **changes)

    # -- presets -------------------------------------------------------------------------
    @classmethod
    def preset(cls, preset_name: str, /, **overrides) -> "VLMoConfig":
        """A published preset with field overrides. `name` defaults to the preset's name and
        may be overridden like any field (`preset("tiny", name="my-tiny")`)."""
        if preset_name not in PRESETS:
            raise ValueError(f"unknown preset {preset_name!r}; expected one of {sorted(PRESETS)}")
        cls._check_names(overrides, f"VLMoConfig.preset({preset_name!r})")
        return cls(**{**PRESETS[preset_name], "name": preset_name, **overrides})


def _type_name(value) -> str:
    return f"{type(value).__name__} {value!r}"


def _checked(field: str, value, hint):
    """`value` as the type `hint` names (int, float, bool, str, Optional[float]), or TypeError."""
    if typing.get_origin(hint) is Union:  # Optional[X]
        if value is None:
            return None
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        expected_none = " or None"
    else:
        expected_none = ""
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"VLMoConfig.{field} must be a bool (True/False){expected_none}, got "
                        f"{_type_name(value)}")
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise TypeError(f"VLMoConfig.{field} must be an int{expected_none}, got {_type_name(value)}")
    if hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"VLMoConfig.{field} must be a float (an int is accepted){expected_none}, "
                        f"got {_type_name(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"VLMoConfig.{field} must be a str{expected_none}, got {_type_name(value)}")
    raise AssertionError(f"VLMoConfig.{field}: no type check for {hint}")  # a new field's type


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
