"""Hugging Face `transformers` integration: VLMo behind `AutoConfig` / `AutoModel`.

    import vlmo_fast                     # registers model_type "vlmo_fast" once transformers is imported
    from transformers import AutoModel, AutoTokenizer
    model = AutoModel.from_pretrained("vlmo-hf")          # vlmo_fast.hf.VLMoFastModel
    out = model(pixel_values=images)                       # out.image_embeds [B, D]
    tok = AutoTokenizer.from_pretrained("vlmo-hf")         # the same ids as vlmo_fast's tokenizer

- `VLMoFastConfig` (configuration_vlmo.py): VLMoConfig's fields as a `PretrainedConfig`.
- `VLMoFastModel` (here): a `PreTrainedModel` front over a `vlmo_fast.VLMo`. Its parameters
  ARE the VLMo's (the same tensors under the same names), so transformers' loading,
  saving, dtype and device handling act on the VLMo, and the kernels and backends of
  vlmo_fast run; `.vlmo` is the VLMo itself.
- modeling_vlmo.py: the same model in plain PyTorch, importing only torch and transformers.
  `export_hf` (and `VLMoFastModel.save_pretrained`) copy it and configuration_vlmo.py into the
  folder and name them in config.json's `auto_map`, so that
  `AutoModel.from_pretrained(folder, trust_remote_code=True)` works without vlmo_fast.

A folder written here holds config.json (transformers' format: model_type, architectures,
auto_map, dtype, the VLMo fields), model.safetensors (vlmo_fast's parameter names), the two
code files, the tokenizer's files (BERT WordPiece; `AutoTokenizer` loads them), an image
processor config (`AutoImageProcessor`: resize the shorter side bicubic, centre crop,
normalise to [-1, 1], as vlmo_fast's evaluation transform), README.md (a model card) and
manifest.json (size + SHA-256 of every file, vlmo_fast's integrity record). It is ready for
`push_to_hub` / `huggingface-cli upload` as it is.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from ..config import VLMoConfig
from ..model import VLMo
from .configuration_vlmo import MODEL_TYPE, VLMO_DEFAULTS, VLMoFastConfig
from .modeling_vlmo import VLMoFastOutput, VLMoFastPreTrainedModel, check_token_types

__all__ = ["VLMoFastConfig", "VLMoFastModel", "VLMoFastOutput", "export_hf", "register",
           "hf_config_from_vlmo", "vlmo_config_from_hf", "REMOTE_CODE_FILES"]

PathLike = Union[str, os.PathLike]
HERE = Path(__file__).resolve().parent
# the files a folder carries so that trust_remote_code=True needs no vlmo_fast
REMOTE_CODE_FILES = ("configuration_vlmo.py", "modeling_vlmo.py")
AUTO_MAP = {"AutoConfig": "configuration_vlmo.VLMoFastConfig",
            "AutoModel": "modeling_vlmo.VLMoFastModel"}


# -- configs ---------------------------------------------------------------------------------
def hf_config_from_vlmo(config: VLMoConfig, **kwargs) -> VLMoFastConfig:
    """A `VLMoFastConfig` with the fields of `config` (kwargs: transformers' own options)."""
    if not isinstance(config, VLMoConfig):
        raise TypeError(f"config must be a vlmo_fast.VLMoConfig, got {type(config).__name__}")
    return VLMoFastConfig(**config.to_dict(), **kwargs)


def vlmo_config_from_hf(config) -> VLMoConfig:
    """The `VLMoConfig` of a VLMoFastConfig (in-process or loaded as remote code), checked by
    VLMoConfig's own validation."""
    if getattr(config, "model_type", None) != MODEL_TYPE:
        raise TypeError(f"config must be a VLMoFastConfig (model_type {MODEL_TYPE!r}), got "
                        f"{type(config).__name__} with model_type {getattr(config, 'model_type', None)!r}")
    return VLMoConfig(**{key: getattr(config, key) for key in VLMO_DEFAULTS})


# -- the model -------------------------------------------------------------------------------
class VLMoFastModel(VLMoFastPreTrainedModel):
    """`PreTrainedModel` front over a `vlmo_fast.VLMo` (see the module docstring).

    VLMoFastModel(config, vlmo=None, ffn_backend=None, attn_backend=None): builds a VLMo of
    the config's sizes, or fronts `vlmo` (whose config must equal it; `from_vlmo` does this).
    Outputs: `VLMoFastOutput` (as modeling_vlmo.VLMoFastModel, the remote-code twin).
    """

    def __init__(self, config: VLMoFastConfig, vlmo: Optional[VLMo] = None,
                 ffn_backend: Optional[str] = None, attn_backend: Optional[str] = None):
        super().__init__(config)
        wanted = vlmo_config_from_hf(config)
        built_here = vlmo is None
        if vlmo is None:
            vlmo = VLMo(wanted, ffn_backend=ffn_backend, attn_backend=attn_backend)
        elif not isinstance(vlmo, VLMo):
            raise TypeError(f"vlmo must be a vlmo_fast.VLMo, got {type(vlmo).__name__}")
        elif vlmo.config != wanted:
            raise ValueError(f"vlmo has config {vlmo.config}, which differs from the given config "
                             f"{wanted}; build the front with VLMoFastModel.from_vlmo(vlmo)")
        if self._parameters or self._modules or self._buffers:
            raise RuntimeError("internal error: PreTrainedModel.__init__ registered tensors or modules "
                               f"({list(self._parameters) + list(self._modules) + list(self._buffers)})")
        # One module tree behind two fronts: the registries ARE the VLMo's (same dicts), so a
        # tensor transformers loads, assigns, casts or moves is the VLMo's tensor, and the
        # names it saves are the VLMo's (the names model.safetensors uses everywhere).
        self._parameters = vlmo._parameters
        self._buffers = vlmo._buffers
        self._modules = vlmo._modules
        object.__setattr__(self, "_vlmo", vlmo)   # not a submodule: its children are ours already
        # a VLMo handed in keeps its weights; one built here is initialised by transformers'
        # init pass (which skips every tensor a checkpoint loads)
        self._owns_weights = built_here
        self.post_init()

    @classmethod
    def from_vlmo(cls, vlmo: VLMo, **config_kwargs) -> "VLMoFastModel":
        """A front over an existing VLMo (no copy: both see the same parameters)."""
        if not isinstance(vlmo, VLMo):
            raise TypeError(f"vlmo must be a vlmo_fast.VLMo, got {type(vlmo).__name__}")
        return cls(hf_config_from_vlmo(vlmo.config, **config_kwargs), vlmo=vlmo)

    @property
    def vlmo(self) -> VLMo:
        """The `vlmo_fast.VLMo` behind this front."""
        return self._vlmo

    def train(self, mode: bool = True) -> "VLMoFastModel":
        super().train(mode)
        self._vlmo.training = mode
        return self

    def _init_weights(self, module: nn.Module) -> None:
        """VLMo's own initialisation (`VLMo.reset_parameters`), run once for the whole tree,
        never for a VLMo handed in; transformers guards the init functions so that loaded
        tensors are never overwritten."""
        if module is self and self._owns_weights:
            self._vlmo.reset_parameters()

    def get_input_embeddings(self) -> nn.Module:
        return self._vlmo.text_embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self._vlmo.text_embeddings.word_embeddings = value

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        """L2-normalised ITC image embeddings [B, embed] (images normalised to [-1, 1])."""
        return self._vlmo.encode_image(self._pixels(pixel_values)).features

    def get_text_features(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """L2-normalised ITC text embeddings [B, embed] (attention_mask 1 = real token)."""
        return self._vlmo.encode_text(input_ids, attention_mask).features

    def _pixels(self, pixel_values: Tensor) -> Tensor:
        # image processors return fp32; a bf16/fp16 model takes its own dtype (as HF models do)
        dtype = self._vlmo.patch_embed.proj.weight.dtype
        return pixel_values.to(dtype) if pixel_values.is_floating_point() else pixel_values

    def forward(self, pixel_values: Optional[Tensor] = None, input_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, token_type_ids: Optional[Tensor] = None,
                return_vl: bool = False, return_dict: Optional[bool] = None) -> VLMoFastOutput:
        """Images only: image tower; input_ids only: text tower; both: fusion encoder over
        [text ; image] with ITM logits. return_vl: also the VL-expert branch of a tower.
        token_type_ids (what a BERT tokenizer returns) must be all 0: one text segment."""
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        check_token_types(token_type_ids)
        vlmo = self._vlmo
        if pixel_values is not None and input_ids is not None:
            pair = vlmo.encode_pair(input_ids, self._pixels(pixel_values), attention_mask)
            output = VLMoFastOutput(last_hidden_state=pair.hidden, pooler_output=pair.pooled,
                                    itm_logits=vlmo.itm_logits(pair))
        elif pixel_values is not None:
            enc = vlmo.encode_image(self._pixels(pixel_values), return_vl=return_vl)
            output = VLMoFastOutput(last_hidden_state=enc.hidden, image_embeds=enc.features,
                                    image_vl_embeds=enc.vl_features)
        elif input_ids is not None:
            enc = vlmo.encode_text(input_ids, attention_mask, return_vl=return_vl)
            output = VLMoFastOutput(last_hidden_state=enc.hidden, text_embeds=enc.features,
                                    text_vl_embeds=enc.vl_features)
        else:
            raise ValueError("VLMoFastModel needs pixel_values, input_ids, or both")
        return output if return_dict else output.to_tuple()

    def save_pretrained(self, save_directory: PathLike, *args, **kwargs):
        """transformers' save_pretrained, plus the plain-PyTorch code files and an auto_map
        naming them: the folder loads with trust_remote_code=True where vlmo_fast is absent."""
        self.config.auto_map = dict(AUTO_MAP)
        self.config.architectures = ["VLMoFastModel"]
        # before transformers writes (and, with push_to_hub=True, uploads) the folder
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(HERE / name, Path(save_directory) / name)
        return super().save_pretrained(save_directory, *args, **kwargs)


# -- registration ----------------------------------------------------------------------------
def register() -> None:
    """Register model_type "vlmo_fast" with AutoConfig and AutoModel (idempotent). Runs when
    this module is imported, which `import vlmo_fast` arranges for once transformers is."""
    AutoConfig.register(MODEL_TYPE, VLMoFastConfig, exist_ok=True)
    AutoModel.register(VLMoFastConfig, VLMoFastModel, exist_ok=True)


register()


# -- export ----------------------------------------------------------------------------------
def _model_card(config: VLMoConfig, has_tokenizer: bool) -> str:
    tokenizer = ("tok = AutoTokenizer.from_pretrained(path)\n"
                 f"batch = tok(texts, padding=\"max_length\", truncation=True, max_length={config.max_text_len}, "
                 "return_tensors=\"pt\")\n"
                 "text = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).text_embeds\n"
                 if has_tokenizer else "")
    return (f"---\nlibrary_name: transformers\ntags:\n- vlmo\n- vlmo_fast\n- image-text retrieval\n---\n\n"
            f"# VLMo ({config.name}: {config.depth} x {config.dim}, {config.num_heads} heads, "
            f"VL expert in the top {config.vl_layers} layers)\n\n"
            "A VLMo (Mixture-of-Modality-Experts) model exported by vlmo_fast. It loads with "
            "`trust_remote_code=True` (plain PyTorch code in this folder), or without it after "
            "`import vlmo_fast` (the package's kernels).\n\n"
            "```python\nfrom transformers import AutoImageProcessor, AutoModel, AutoTokenizer\n"
            "model = AutoModel.from_pretrained(path, trust_remote_code=True)\n"
            "pixels = AutoImageProcessor.from_pretrained(path)(images, return_tensors=\"pt\").pixel_values\n"
            "image = model(pixel_values=pixels).image_embeds     # L2-normalised ITC embeddings\n"
            + tokenizer + "```\n\n"
            f"Images: {config.img_size}x{config.img_size}, normalised to [-1, 1]. Texts: at most "
            f"{config.max_text_len} WordPiece tokens ([CLS] ... [SEP]). Both together run the fusion "
            "encoder (`itm_logits`: image-text match).\n")


def export_hf(model, directory: PathLike, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Write a transformers folder for `model` (a vlmo_fast.VLMo): see the module docstring
    for its files. `tokenizer`: a vlmo_fast WordPieceTokenizer (or None). The folder is
    written beside `directory` and swapped in whole; an existing non-empty `directory`
    needs overwrite=True. Returns the folder."""
    from ..export import image_processor_config, staged_directory
    from ..io import atomic_write_json, atomic_write_text, write_manifest
    if not isinstance(model, VLMo):
        raise TypeError(f"model must be a vlmo_fast.VLMo, got {type(model).__name__}")
    config = model.config
    if tokenizer is not None:
        vocab = getattr(tokenizer, "vocab_size", None)
        if not isinstance(vocab, int) or not hasattr(tokenizer, "save"):
            raise TypeError(f"tokenizer must be a vlmo_fast WordPieceTokenizer, got {type(tokenizer).__name__}")
        if vocab > config.vocab_size:
            raise ValueError(f"the tokenizer has {vocab} tokens but the model's vocab_size is "
                             f"{config.vocab_size}: they do not belong together")
    front = VLMoFastModel.from_vlmo(model)
    with staged_directory(directory, overwrite=overwrite) as stage:
        front.save_pretrained(stage)
        if tokenizer is not None:
            tokenizer.save(stage)
            tok_config = json.loads((stage / "tokenizer_config.json").read_text(encoding="utf-8"))
            tok_config.update(model_max_length=config.max_text_len, padding_side="right",
                              truncation_side="right")
            atomic_write_json(stage / "tokenizer_config.json", tok_config)
        atomic_write_json(stage / "preprocessor_config.json", image_processor_config(config))
        atomic_write_text(stage / "README.md", _model_card(config, tokenizer is not None))
        write_manifest(stage)   # last: it vouches for every file above
    return Path(directory)
