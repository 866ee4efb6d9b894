"""`VLMoFastConfig`: vlmo_fast's `VLMoConfig` as a Hugging Face `PretrainedConfig`.

This file is copied verbatim into every folder `vlmo_fast.hf.export_hf` writes (with
modeling_vlmo.py), so that `AutoConfig.from_pretrained(folder, trust_remote_code=True)`
works where vlmo_fast is not installed: it imports only `transformers`. Inside vlmo_fast
it is the config class registered with `AutoConfig` for model_type "vlmo_fast".

The fields, their names and defaults are `vlmo_fast.VLMoConfig`'s (a test keeps them
equal); BERT-style aliases (hidden_size, num_attention_heads, num_hidden_layers) read them.
"""
from transformers import PretrainedConfig

MODEL_TYPE = "vlmo_fast"

# VLMoConfig's fields and defaults, in its order
VLMO_DEFAULTS = {
    "dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0, "vl_layers": 2,
    "img_size": 224, "patch_size": 16, "in_chans": 3, "vocab_size": 30522,
    "max_text_len": 40, "type_vocab_size": 2, "relative_position": True,
    "text_relpos_len": 196, "layer_scale_init": 0.1, "drop_path_rate": 0.1,
    "qkv_bias": True, "layer_norm_eps": 1e-6, "text_layer_norm_eps": 1e-12,
    "init_std": 0.02, "num_classes": 0, "itc_vl_head": True, "vl_expert": True,
    "attention": "shared", "name": "custom",
}
ATTENTION_MODES = ("shared", "per_modality")


class VLMoFastConfig(PretrainedConfig):
    """The sizes and switches of a VLMo model (see vlmo_fast.VLMoConfig for each field)."""

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "dim", "num_attention_heads": "num_heads",
                     "num_hidden_layers": "depth"}

    def __init__(self, **kwargs):
        for key, default in VLMO_DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, default))
        # VLMo's MLM decoder is its own matrix, not the word embeddings
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self._check()

    def _check(self) -> None:
        """The checks the model's shapes depend on (vlmo_fast.VLMoConfig checks every field)."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"VLMoFastConfig: {message}")
        for key in ("dim", "depth", "num_heads", "img_size", "patch_size", "in_chans", "vocab_size",
                    "max_text_len", "type_vocab_size", "text_relpos_len"):
            value = getattr(self, key)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{key} must be a positive int, got {value!r}")
        need(self.dim % self.num_heads == 0, f"dim ({self.dim}) must be divisible by num_heads "
                                             f"({self.num_heads})")
        need(0 <= self.vl_layers <= self.depth, f"vl_layers must be in [0, depth={self.depth}], got "
                                                f"{self.vl_layers}")
        need(self.img_size % self.patch_size == 0, f"img_size ({self.img_size}) must be divisible by "
                                                   f"patch_size ({self.patch_size})")
        need(self.attention in ATTENTION_MODES, f"attention must be one of {ATTENTION_MODES}, got "
                                                f"{self.attention!r}")
        if self.relative_position:
            need(self.max_text_len <= self.text_relpos_len,
                 f"max_text_len ({self.max_text_len}) exceeds text_relpos_len ({self.text_relpos_len})")

    # derived sizes, as VLMoConfig names them
    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def vl_start(self) -> int:
        """Index of the first block with a vision-language expert."""
        return self.depth - self.vl_layers

    def num_experts(self, layer: int) -> int:
        return 3 if layer >= self.vl_start else 2

    def vlmo_fields(self) -> dict:
        """The VLMoConfig fields of this config, e.g. for `vlmo_fast.VLMoConfig(**fields)`."""
        return {key: getattr(self, key) for key in VLMO_DEFAULTS}
