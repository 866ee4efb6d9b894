"""Checkpoints: the reference VLMo state_dict, timm BEiT, and our own safetensors format.

Every loader works the same way (timm's `checkpoint_filter_fn` style):
1. check the checkpoint against the layout the model needs, in the checkpoint's own names
   (names, shapes, dtypes); any problem raises `CheckpointMismatchError` before a single
   tensor is copied, so an error leaves the model untouched, and says what differs (e.g.
   "depth 2 checkpoint, model depth 4");
2. translate names and shapes with a pure dict -> dict function (`reference_to_vlmo`,
   `beit_to_vlmo`; `vlmo_to_reference` the other way);
3. one `model.load_state_dict` of the translated dict.
Both loaders return a `LoadResult(missing_keys, unexpected_keys)` in the checkpoint's names.

- `load_reference_state_dict` / `export_reference_state_dict`: the published implementation's
  names (microsoft/unilm `vlmo`), both ways, exactly. Per-expert Linear weights (out, in) are
  rows of our stacked (in, out) expert tensors; 0-d logit scales are our [1].
  `text_embeddings.position_embeddings.weight` is never used by relative-position presets:
  the loader drops it when the model has no such parameter, the exporter writes zeros so the
  reference implementation can load our export strictly. The reference has shared attention
  and the VL expert only: a per-modality-attention model is refused both ways, a model
  without the VL expert (config.vl_expert=False) is refused on export (the reference would
  route its pairs to the VL expert) and loads (strict=False: it has no itc_vl head; every
  other weight fits, VL expert included, only the routing differs).
- `load_beit_state_dict`: a timm BEiT (`beit_base_patch16_224` layout) into the attention and
  the vision expert; its per-layer bias tables fill the image rows of the shared table.
- `save_pretrained` / `from_pretrained`: model.safetensors + config.json + manifest.json
  (size and SHA-256 of both), the directory replaced as a whole (`vlmo_fast.io.atomic_directory`):
  a process killed at any moment leaves the old checkpoint or the new one, never a mix.
  `from_pretrained` also reads a transformers folder written by `vlmo_fast.hf.export_hf`
  (same weights file; its config.json adds transformers' keys: `read_config`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .config import PRESETS, VLMoConfig
from .io import (MANIFEST_NAME, CorruptFileError, atomic_directory, atomic_write, read_manifest, resolve_directory,
                 verify_manifest, write_manifest)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, MANIFEST_NAME)
# the model_type of the transformers folders vlmo_fast.hf writes (its configuration_vlmo.MODEL_TYPE,
# kept equal by tests/test_hf.py; named here so that reading one needs no transformers)
TRANSFORMERS_MODEL_TYPE = "vlmo_fast"

# expert index in our stacked tensors <- reference module suffix
EXPERT_SUFFIX = {0: "imag", 1: "text", 2: "vl"}
_EXPERT_FROM_SUFFIX = {v: k for k, v in EXPERT_SUFFIX.items()}

# our name <-> reference name, for parameters that are not per-block
_TOP_LEVEL = {
    "patch_embed.proj.weight": "transformer.patch_embed.proj.weight",
    "patch_embed.proj.bias": "transformer.patch_embed.proj.bias",
    "cls_token": "transformer.cls_token",
    "pos_embed": "transformer.pos_embed",
    "norm.weight": "transformer.norm.weight",
    "norm.bias": "transformer.norm.bias",
    "rel_pos_bias.relative_position_bias_table": "relative_position_bias_table",
    "itc.text_proj.weight": "itc_text_proj.fc.weight",
    "itc.image_proj.weight": "itc_image_proj.fc.weight",
    "itc.logit_scale": "logit_scale",
    "itc_vl.text_proj.weight": "itc_vl_text_proj.fc.weight",
    "itc_vl.image_proj.weight": "itc_vl_image_proj.fc.weight",
    "itc_vl.logit_scale": "logit_vl_scale",
    "itm_head.weight": "itm_score.fc.weight",
    "itm_head.bias": "itm_score.fc.bias",
    "mlm_head.dense.weight": "mlm_score.transform.dense.weight",
    "mlm_head.dense.bias": "mlm_score.transform.dense.bias",
    "mlm_head.norm.weight": "mlm_score.transform.LayerNorm.weight",
    "mlm_head.norm.bias": "mlm_score.transform.LayerNorm.bias",
    "mlm_head.decoder.weight": "mlm_score.decoder.weight",
    "mlm_head.bias": "mlm_score.bias",
    "classifier.fc1.weight": "vqa_classifier.0.weight",
    "classifier.fc1.bias": "vqa_classifier.0.bias",
    "classifier.norm.weight": "vqa_classifier.1.weight",
    "classifier.norm.bias": "vqa_classifier.1.bias",
    "classifier.fc2.weight": "vqa_classifier.3.weight",
    "classifier.fc2.bias": "vqa_classifier.3.bias",
}
_REF_TO_OURS = {v: k for k, v in _TOP_LEVEL.items()}
_LOGIT_SCALES = ("itc.logit_scale", "itc_vl.logit_scale")  # [1] here, 0-d in the reference
# names that are the same on both sides
_SAME_PREFIXES = ("text_embeddings.", "token_type_embeddings.", "pooler.")
# per-block parameters whose names are the same on both sides (under blocks.N / transformer.blocks.N)
_BLOCK_SAME = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias",
               "attn.proj.weight", "attn.proj.bias", "gamma_1", "gamma_2")
# our stacked expert field -> (reference name under transformer.blocks.N with the expert
# suffix, whether the per-expert tensor is transposed: Linear (out, in) vs our (in, out))
_EXPERT_FIELDS = {
    "norm_weight": ("norm2_{}.weight", False), "norm_bias": ("norm2_{}.bias", False),
    "fc1_weight": ("mlp_{}.fc1.weight", True), "fc1_bias": ("mlp_{}.fc1.bias", False),
    "fc2_weight": ("mlp_{}.fc2.weight", True), "fc2_bias": ("mlp_{}.fc2.bias", False),
}
_REF_EXPERT_FIELDS = {pattern.format(sfx): (field, e, transpose)
                      for field, (pattern, transpose) in _EXPERT_FIELDS.items()
                      for e, sfx in EXPERT_SUFFIX.items()}
_OUR_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_REF_BLOCK = re.compile(r"^transformer\.blocks\.(\d+)\.(.+)$")
# buffers some reference checkpoints carry that we rebuild ourselves
_IGNORED_REFERENCE_KEYS = re.compile(
    r"^(text_embeddings\.position_ids|relative_position_index|text_relative_position_index|"
    r"text_imag_relative_position_index)$")
# the BERT absolute text positions: in every reference checkpoint, used only without relative
# positions (our relative-position models may have no such parameter)
TEXT_POSITIONS = "text_embeddings.position_embeddings.weight"


class CheckpointMismatchError(KeyError):
    """A checkpoint does not fit the model (names, shapes or dtypes); nothing was loaded."""

    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class LoadResult(NamedTuple):
    """What a loader did not use, like torch's `_IncompatibleKeys`, in the checkpoint's names.

    missing_keys: tensors the model needs that the checkpoint lacks (their model values
        were kept); unexpected_keys: checkpoint tensors the model has no place for."""
    missing_keys: List[str]
    unexpected_keys: List[str]


# -- input handling ---------------------------------------------------------------------------
def read_state_file(path, argument: str = "path", trust_pickle: bool = False):
    """What a checkpoint FILE holds, without running code from it: `.safetensors` through
    safetensors, anything else through `torch.load(weights_only=True)` (tensors, containers,
    numbers, strings). A legacy pickle that needs more is refused with a message naming
    `argument` and the `--trust-pickle` opt-in; `trust_pickle=True` then unpickles it fully
    (which runs whatever code the file carries: only for files you trust)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument} {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise ValueError(f"{argument} {path}: not a readable safetensors file ({exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not trust_pickle:
            first = (str(exc).splitlines() or [""])[0][:200]
            raise ValueError(f"{argument} {path} could not be read as plain tensors ({type(exc).__name__}: "
                             f"{first}); if you trust the file, pass --trust-pickle to unpickle it "
                             f"fully (that runs code stored in the file)") from None
    return torch.load(path, map_location="cpu", weights_only=False)


def unwrap_state_dict(obj: Mapping) -> Dict[str, Tensor]:
    """Accept a raw state_dict or one wrapped as {'state_dict'|'module'|'model': ...};
    strip a DeepSpeed/DDP 'module.' prefix."""
    for key in ("state_dict", "module", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    return {(k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k): v
            for k, v in obj.items()}


def _as_state_dict(obj, argument: str) -> Dict[str, Tensor]:
    """A state_dict from a mapping (possibly wrapped) or from an nn.Module's state_dict()."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(f"{argument} must be a state_dict (a mapping of name -> tensor, e.g. "
                        f"torch.load(path)) or an nn.Module whose state_dict() is used; got "
                        f"{type(obj).__name__}")
    sd = unwrap_state_dict(obj)
    for k, v in sd.items():
        if not isinstance(k, str):
            raise TypeError(f"{argument}: keys must be str, got {type(k).__name__} {k!r}")
        if not isinstance(v, Tensor):
            raise TypeError(f"{argument}[{k!r}] must be a tensor, got {type(v).__name__}")
    return sd


def _unwrap_model(model) -> nn.Module:
    inner = getattr(model, "module", None)
    if not isinstance(getattr(model, "config", None), VLMoConfig) and isinstance(inner, nn.Module):
        model = inner  # DDP / DeepSpeed engine
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "config", None), VLMoConfig):
        raise TypeError(f"model must be a vlmo_fast.VLMo (or a DDP/DeepSpeed wrapper of one), got "
                        f"{type(model).__name__}")
    return model


# -- checking before copying -----------------------------------------------------------------
def _same_shape(a: Tuple[int, ...], b: Tuple[int, ...]) -> bool:
    # a 0-d scalar and a [1] tensor are the same value (the logit scales)
    return a == b or (len(a) <= 1 and len(b) <= 1 and a in ((), (1,)) and b in ((), (1,)))


def _fmt_list(label: str, names: List[str], limit: int = 12) -> str:
    more = f" ... (+{len(names) - limit})" if len(names) > limit else ""
    return f"  {label} ({len(names)}): {', '.join(names[:limit])}{more}"


def _check_fit(given: Mapping[str, Tensor], expected: Mapping[str, Tensor], *, strict: bool,
               what: str, optional: Iterable[str] = (), tolerated: Callable[[str], bool] = lambda k: False,
               hint: str = "") -> LoadResult:
    """Compare a checkpoint with the tensors (or meta tensors) the model needs under the same
    names. Shape or dtype problems always raise; missing/unexpected names raise with strict
    (except unexpected names `tolerated` accepts). Nothing is modified here."""
    optional = set(optional)
    missing = sorted(k for k in expected if k not in given and k not in optional)
    unexpected = sorted(k for k in given if k not in expected and k not in optional)
    problems = []
    for k, v in given.items():
        want = expected.get(k)
        if want is None:
            continue
        if not _same_shape(tuple(v.shape), tuple(want.shape)):
            problems.append(f"{k}: checkpoint {tuple(v.shape)}, model {tuple(want.shape)}")
        elif want.is_floating_point() and not v.is_floating_point():
            problems.append(f"{k}: checkpoint dtype {v.dtype}, the model needs a floating point tensor")
    blocking = [k for k in unexpected if not tolerated(k)]
    if problems or (strict and (missing or blocking)):
        lines = [f"{what} does not fit the model; nothing was loaded, the model is unchanged"]
        if hint:
            lines.append(f"  {hint}")
        if problems:
            lines.append(_fmt_list("shape/dtype mismatch", problems, 8))
        if missing:
            lines.append(_fmt_list("missing", missing))
        if blocking:
            lines.append(_fmt_list("unexpected", blocking))
        if not problems:
            lines.append("  (strict=False loads the matching part and returns what was not used)")
        raise CheckpointMismatchError("\n".join(lines))
    return LoadResult(missing, unexpected)


def _config_hint(inferred: Dict[str, object], config: VLMoConfig, kind: str) -> str:
    """"depth 2 checkpoint, model depth 4; ..." plus the preset the checkpoint looks like."""
    diffs = [f"{kind} checkpoint {k}={v!r}, model {k}={getattr(config, k)!r}"
             for k, v in inferred.items() if v != getattr(config, k)]
    if not diffs:
        return ""
    text = "; ".join(diffs)
    defaults = {f.name: f.default for f in dataclasses.fields(VLMoConfig)}
    for name, preset in PRESETS.items():
        values = {**defaults, **preset}
        if all(values.get(k) == v for k, v in inferred.items()):
            return f"{text} (the checkpoint looks like preset {name!r})"
    return text


def _meta(sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Shape/dtype-only copies: a layout without copying data."""
    return {k: v.detach().to("meta") for k, v in sd.items()}


# -- reference VLMo ---------------------------------------------------------------------------
def vlmo_to_reference(state_dict: Mapping[str, Tensor], config: Optional[VLMoConfig] = None) -> Dict[str, Tensor]:
    """Our state_dict -> the reference implementation's names and shapes (views where possible).
    With `config`, a model without text position embeddings gets a zero table of the
    reference's shape [max_text_len, dim] (relative-position presets never use it)."""
    out: Dict[str, Tensor] = {}
    for k, v in state_dict.items():
        if k in _TOP_LEVEL:
            out[_TOP_LEVEL[k]] = v.reshape(()) if k in _LOGIT_SCALES else v
        elif k.startswith(_SAME_PREFIXES):
            out[k] = v
        elif (m := _OUR_BLOCK.match(k)) and m.group(2) in _BLOCK_SAME:
            out[f"transformer.blocks.{m.group(1)}.{m.group(2)}"] = v
        elif m and m.group(2).startswith("mlp.") and m.group(2)[4:] in _EXPERT_FIELDS:
            pattern, transpose = _EXPERT_FIELDS[m.group(2)[4:]]
            for e in range(v.shape[0]):
                ref = f"transformer.blocks.{m.group(1)}." + pattern.format(EXPERT_SUFFIX[e])
                out[ref] = v[e].t() if transpose else v[e]
        else:
            raise CheckpointMismatchError(f"{k}: no reference VLMo name for this parameter")
    if config is not None and TEXT_POSITIONS not in out:
        like = state_dict["text_embeddings.word_embeddings.weight"]
        out[TEXT_POSITIONS] = torch.zeros(config.max_text_len, config.dim, dtype=like.dtype, device=like.device)
    return out


def reference_to_vlmo(state_dict: Mapping[str, Tensor], fill: Optional[Mapping[str, Tensor]] = None
                      ) -> Tuple[Dict[str, Tensor], List[str]]:
    """The reference's names and shapes -> ours. Per-block experts are stacked in our order
    (vision, language, vision-language); an expert the checkpoint lacks comes from `fill`
    (our current state_dict) when given. Returns (translated, reference names not translated)."""
    out: Dict[str, Tensor] = {}
    untranslated: List[str] = []
    stacks: Dict[str, Dict[int, Tuple[str, Tensor]]] = {}
    for k, v in state_dict.items():
        if k in _REF_TO_OURS:
            name = _REF_TO_OURS[k]
            out[name] = v.reshape(1) if name in _LOGIT_SCALES else v
        elif k.startswith(_SAME_PREFIXES):
            out[k] = v
        elif (m := _REF_BLOCK.match(k)) and m.group(2) in _BLOCK_SAME:
            out[f"blocks.{m.group(1)}.{m.group(2)}"] = v
        elif m and m.group(2) in _REF_EXPERT_FIELDS:
            field, e, transpose = _REF_EXPERT_FIELDS[m.group(2)]
            stacks.setdefault(f"blocks.{m.group(1)}.mlp.{field}", {})[e] = (k, v.t() if transpose else v)
        else:
            untranslated.append(k)
    for name, experts in stacks.items():
        base = fill.get(name) if fill is not None else None
        count = base.shape[0] if base is not None else max(experts) + 1
        rows = []
        for e in range(count):
            if e in experts:
                rows.append(experts[e][1] if base is None else experts[e][1].to(base.dtype))
            elif base is not None:
                rows.append(base[e])
            else:
                break
        if len(rows) < count:  # a gap in the experts and nothing to fill it from
            untranslated.extend(k for k, _ in experts.values())
            continue
        untranslated.extend(k for e, (k, _) in experts.items() if e >= count)
        out[name] = torch.stack(rows)
    return out, untranslated


def infer_reference_config(state_dict: Mapping[str, Tensor]) -> Dict[str, object]:
    """The VLMoConfig fields a reference state_dict determines (for error messages)."""
    sd, found = state_dict, {}
    blocks = [int(m.group(1)) for k in sd if (m := _REF_BLOCK.match(k))]
    if blocks:
        found["depth"] = max(blocks) + 1
        found["vl_layers"] = len({int(m.group(1)) for k in sd
                                  if (m := _REF_BLOCK.match(k)) and m.group(2) == "mlp_vl.fc1.weight"})
    if "transformer.cls_token" in sd:
        found["dim"] = int(sd["transformer.cls_token"].shape[-1])
    if "text_embeddings.word_embeddings.weight" in sd:
        found["vocab_size"] = int(sd["text_embeddings.word_embeddings.weight"].shape[0])
    fc1 = sd.get("transformer.blocks.0.mlp_imag.fc1.weight")
    if fc1 is not None and fc1.dim() == 2 and fc1.shape[1]:
        found["mlp_ratio"] = fc1.shape[0] / fc1.shape[1]
    found["relative_position"] = "relative_position_bias_table" in sd
    if not found["relative_position"] and TEXT_POSITIONS in sd:  # used (so sized) only then
        found["max_text_len"] = int(sd[TEXT_POSITIONS].shape[0])
    table = sd.get("relative_position_bias_table")
    if table is not None and table.dim() == 2 and found.get("depth"):
        found["num_heads"] = int(table.shape[1]) // found["depth"]
    found["layer_scale_init"] = "transformer.blocks.0.gamma_1" in sd  # compared as a bool below
    classifier = sd.get("vqa_classifier.3.weight")
    found["num_classes"] = int(classifier.shape[0]) if classifier is not None else 0
    return found


def _reference_hint(sd: Mapping[str, Tensor], config: VLMoConfig) -> str:
    found = infer_reference_config(sd)
    has_scale = found.pop("layer_scale_init")
    hint = _config_hint(found, config, "reference")
    if has_scale != (config.layer_scale_init is not None):
        extra = (f"reference checkpoint {'has' if has_scale else 'has no'} layer scale (gamma_1/2), "
                 f"model layer_scale_init={config.layer_scale_init!r}")
        hint = f"{hint}; {extra}" if hint else extra
    return hint


def _parameters(model: nn.Module) -> Dict[str, Tensor]:
    """The model's state_dict without buffers: every buffer of ours is rebuilt from the config."""
    names = {n for n, _ in model.named_parameters()}
    return {k: v for k, v in model.state_dict().items() if k in names}


def _refuse_reference_layout(config: VLMoConfig, action: str, *, vl_expert_matters: bool) -> None:
    """The reference VLMo has one shared attention per block and routes pairs to the VL
    expert: a model built otherwise cannot be written in (or, per-modality, read from) its
    layout without silently changing what the model computes."""
    if config.attention != "shared":
        raise CheckpointMismatchError(
            f"cannot {action}: the model has attention={config.attention!r} (a language attention "
            "`attn_text` beside the vision one in every block), the reference VLMo has one shared "
            "attention per block; use save_pretrained / from_pretrained for this ablation model")
    if vl_expert_matters and not config.vl_expert:
        raise CheckpointMismatchError(
            f"cannot {action}: the model has vl_expert=False (pairs use the vision/language experts "
            "in the top layers), the reference VLMo always routes them to its VL expert there and "
            "would compute something else with these weights; use save_pretrained for this ablation model")


def export_reference_state_dict(model) -> Dict[str, Tensor]:
    """Our VLMo -> the reference implementation's state_dict (new contiguous tensors).
    Refused (CheckpointMismatchError) for the ablation models the reference cannot express:
    config.attention="per_modality" or config.vl_expert=False."""
    model = _unwrap_model(model)
    _refuse_reference_layout(model.config, "export a reference VLMo state_dict", vl_expert_matters=True)
    ref = vlmo_to_reference({k: v.detach() for k, v in _parameters(model).items()}, model.config)
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in ref.items()}


def load_reference_state_dict(model, state_dict, strict: bool = True, assign: bool = False) -> LoadResult:
    """Load a reference VLMo state_dict (a mapping, possibly wrapped, or a module) into `model`.

    Everything is checked before anything is copied: with strict=True any missing or
    unexpected name raises; a shape or dtype mismatch always raises; on error the model is
    unchanged. `text_embeddings.position_embeddings.weight` is dropped when the model has no
    such parameter (relative positions). Returns LoadResult in the reference's names.
    A per-modality-attention model is refused (the reference has one attention per block);
    a model with vl_expert=False takes every weight, its unused VL expert included, except the
    itc_vl head's, which it does not have (unexpected: load it with strict=False)."""
    model = _unwrap_model(model)
    _refuse_reference_layout(model.config, "load a reference VLMo state_dict", vl_expert_matters=False)
    given = {k: v for k, v in _as_state_dict(state_dict, "state_dict").items()
             if not _IGNORED_REFERENCE_KEYS.match(k)}
    ours = _parameters(model)
    expected = vlmo_to_reference(_meta(ours))  # the reference layout of this model
    optional = (TEXT_POSITIONS,) if model.config.relative_position or TEXT_POSITIONS not in ours else ()
    result = _check_fit(given, expected, strict=strict, what="reference VLMo state_dict",
                        optional=optional, hint=_reference_hint(given, model.config))
    usable = {k: v for k, v in given.items() if k in expected}
    translated, untranslated = reference_to_vlmo(usable, fill=ours)
    if untranslated:  # cannot happen: every name of the model's reference layout translates
        raise RuntimeError(f"internal error: reference names not translated: {untranslated}")
    model.load_state_dict(translated, strict=False, assign=assign)
    return result


# -- timm BEiT --------------------------------------------------------------------------------
_BEIT_IMAGE_EXPERT = {"norm2.weight": ("norm_weight", False), "norm2.bias": ("norm_bias", False),
                      "mlp.fc1.weight": ("fc1_weight", True), "mlp.fc1.bias": ("fc1_bias", False),
                      "mlp.fc2.weight": ("fc2_weight", True), "mlp.fc2.bias": ("fc2_bias", False)}
_BEIT_SAME = ("cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed",
              "norm.weight", "norm.bias")
_BEIT_TABLE = "attn.relative_position_bias_table"
_BEIT_SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
_BEIT_NOT_LOADED = re.compile(r"^(head\.|fc_norm\.)|relative_position_index$")  # classifier, buffers


def _beit_layout(ours: Mapping[str, Tensor], config: VLMoConfig) -> Tuple[Dict[str, Tensor], set]:
    """The BEiT tensors (meta) a model of this shape takes, and which of them are optional."""
    layout, optional = {}, set()
    for k in _BEIT_SAME:
        if k in ours:
            layout[k] = ours[k]
    optional |= {"norm.weight", "norm.bias", "pos_embed"}  # BEiT with avg pooling / no abs pos
    heads = config.num_heads
    table = ours.get("rel_pos_bias.relative_position_bias_table")
    image_rows = (2 * config.grid_size - 1) ** 2 + 3
    for i in range(config.depth):
        for s in _BLOCK_SAME:
            if f"blocks.{i}.{s}" in ours:
                layout[f"blocks.{i}.{s}"] = ours[f"blocks.{i}.{s}"]
        for s, (field, transpose) in _BEIT_IMAGE_EXPERT.items():
            row = ours[f"blocks.{i}.mlp.{field}"][0]
            layout[f"blocks.{i}.{s}"] = row.t() if transpose else row
        if table is not None:
            layout[f"blocks.{i}.{_BEIT_TABLE}"] = table[:image_rows, i * heads:(i + 1) * heads]
    if table is not None:
        layout[_BEIT_SHARED_TABLE] = table[:image_rows, :heads]
    return layout, optional


def beit_to_vlmo(state_dict: Mapping[str, Tensor], fill: Mapping[str, Tensor], config: VLMoConfig
                 ) -> Dict[str, Tensor]:
    """BEiT names and shapes -> ours: BEiT's `mlp`/`norm2` become expert 0 (vision) of the
    stacked expert tensors, its bias tables (per layer, or BEiT's shared one for every layer)
    the image rows of layer i's columns of the shared table. Tensors BEiT fills only in part
    start as copies of `fill` (our current state_dict)."""
    out: Dict[str, Tensor] = {}
    heads = config.num_heads
    image_rows = (2 * config.grid_size - 1) ** 2 + 3
    table_name = "rel_pos_bias.relative_position_bias_table"

    def partial(name: str) -> Tensor:
        if name not in out:
            out[name] = fill[name].detach().clone()
        return out[name]

    for k, v in state_dict.items():
        m = _OUR_BLOCK.match(k)
        rest = m.group(2) if m else None
        if k in _BEIT_SAME:
            out[k] = v
        elif k == _BEIT_SHARED_TABLE:
            for i in range(config.depth):
                partial(table_name)[:image_rows, i * heads:(i + 1) * heads] = v
        elif rest in _BLOCK_SAME:
            out[k] = v
        elif rest in _BEIT_IMAGE_EXPERT:
            field, transpose = _BEIT_IMAGE_EXPERT[rest]
            partial(f"blocks.{m.group(1)}.mlp.{field}")[0] = v.t() if transpose else v
        elif rest == _BEIT_TABLE:
            i = int(m.group(1))
            partial(table_name)[:image_rows, i * heads:(i + 1) * heads] = v
    return out


def _beit_hint(sd: Mapping[str, Tensor], config: VLMoConfig) -> str:
    found = {}
    blocks = [int(m.group(1)) for k in sd if (m := _OUR_BLOCK.match(k))]
    if blocks:
        found["depth"] = max(blocks) + 1
    if "cls_token" in sd:
        found["dim"] = int(sd["cls_token"].shape[-1])
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None and fc1.dim() == 2 and fc1.shape[1]:
        found["mlp_ratio"] = fc1.shape[0] / fc1.shape[1]
    table = sd.get(f"blocks.0.{_BEIT_TABLE}", sd.get(_BEIT_SHARED_TABLE))
    if table is not None and table.dim() == 2:
        found["num_heads"] = int(table.shape[1])
    hint = _config_hint(found, config, "BEiT")
    if table is not None and not config.relative_position:
        extra = "the BEiT checkpoint has relative position bias tables, the model uses absolute positions"
        hint = f"{hint}; {extra}" if hint else extra
    return hint


def load_beit_state_dict(model, state_dict, strict: bool = True, assign: bool = False) -> LoadResult:
    """Load a timm BEiT into the attention, vision expert, patch embedding, CLS token (and
    final norm / pos_embed when present). `state_dict` is a state_dict or a timm module (its
    state_dict() is used).

    Checked before anything is copied (an error leaves the model unchanged): with strict=True
    a BEiT tensor the model needs but the checkpoint lacks (e.g. fewer blocks), or one the
    model has no place for, raises; the classifier (`head.*`, `fc_norm.*`) and index buffers
    are never loaded and never raise (they are listed in unexpected_keys). Either per-layer
    bias tables or BEiT's shared one are accepted. assign=True is passed to `load_state_dict`.
    Returns LoadResult in BEiT's names."""
    model = _unwrap_model(model)
    given = _as_state_dict(state_dict, "state_dict")
    ours = model.state_dict()
    layout, optional = _beit_layout(_meta(ours), model.config)
    if _BEIT_SHARED_TABLE in given:  # BEiT's shared table replaces the per-layer ones
        optional |= {k for k in layout if k.endswith(_BEIT_TABLE)}
    else:
        optional.add(_BEIT_SHARED_TABLE)
    result = _check_fit(given, layout, strict=strict, what="BEiT state_dict", optional=optional,
                        tolerated=lambda k: bool(_BEIT_NOT_LOADED.search(k)),
                        hint=_beit_hint(given, model.config))
    usable = {k: v for k, v in given.items() if k in layout}
    model.load_state_dict(beit_to_vlmo(usable, ours, model.config), strict=False, assign=assign)
    return result


# -- our own format ---------------------------------------------------------------------------
def save_pretrained(model, directory: Union[str, os.PathLike]) -> Path:
    """Write model.safetensors (tensors in the model's dtypes), config.json and manifest.json
    (size + SHA-256 of both) into `directory`, replacing a previous checkpoint there as a whole:
    a process killed at any moment leaves the old checkpoint or the new one (see
    `vlmo_fast.io.atomic_directory`). Other files already in `directory` are kept."""
    from safetensors.torch import save_file
    model = _unwrap_model(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config_text = model.config.to_json() + "\n"
    with atomic_directory(directory, keep=lambda name: name not in CHECKPOINT_FILES) as tmp:
        # through atomic_write for its permissions: safetensors creates files 0600
        atomic_write(tmp / WEIGHTS_NAME,
                     lambda p: save_file(tensors, p, metadata={"format": "pt", "library": "vlmo_fast"}))
        (tmp / CONFIG_NAME).write_text(config_text, encoding="utf-8")
        write_manifest(tmp, [CONFIG_NAME, WEIGHTS_NAME])
    return Path(directory)


_MODEL_KWARGS = ("ffn_backend", "attn_backend")


def _resolve_dtype(torch_dtype) -> Optional[torch.dtype]:
    if torch_dtype is None or torch_dtype == "auto":
        return None
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype, torch_dtype)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise TypeError(f"torch_dtype must be 'auto' or a floating torch.dtype (e.g. torch.bfloat16), "
                        f"got {torch_dtype!r}")
    return torch_dtype


def _read_weights(path: Path) -> Dict[str, Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError / OSError from a torn or corrupted file
        raise CorruptFileError(path, f"not a readable safetensors file ({type(e).__name__}: {e})") from None


def read_config(path: Union[str, os.PathLike]) -> VLMoConfig:
    """The VLMoConfig of a checkpoint's config.json. vlmo_fast's own (save_pretrained) holds
    exactly VLMoConfig's fields, and any other key is refused; a transformers folder
    (`vlmo_fast.hf.export_hf`: `"model_type": "vlmo_fast"`) holds them beside transformers'
    keys (architectures, auto_map, dtype, ...), which are left out. Errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        data = None   # VLMoConfig.from_json below says what is wrong with it
    if not isinstance(data, dict) or "model_type" not in data:
        return VLMoConfig.from_json(path)
    if data["model_type"] != TRANSFORMERS_MODEL_TYPE:
        raise ValueError(f"{path}: a transformers config of model_type {data['model_type']!r}, not a VLMo "
                         f"(expected model_type {TRANSFORMERS_MODEL_TYPE!r}, or vlmo_fast's own config.json)")
    fields = {f.name for f in dataclasses.fields(VLMoConfig)}
    try:
        return VLMoConfig.from_dict({k: v for k, v in data.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise type(e)(f"{path}: {e}") from None


def from_pretrained(directory: Union[str, os.PathLike], map_location="cpu", *, torch_dtype="auto",
                    verify: bool = True, **kwargs):
    """Load a directory written by `save_pretrained` (or `vlmo_fast.hf.export_hf`: see
    `read_config`), HF-style: the model is returned in eval
    mode; torch_dtype="auto" keeps the checkpoint's dtypes (a bf16 checkpoint loads as bf16),
    a dtype casts to it; keyword arguments that are VLMoConfig fields override the saved
    config (`drop_path_rate=0.0`), `ffn_backend` / `attn_backend` go to the model.

    verify=True checks every file's SHA-256 against manifest.json (sizes are always checked);
    a damaged file raises CorruptFileError naming it. map_location: the model's device."""
    from .model import VLMo
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path (str or os.PathLike), got {type(directory).__name__}")
    dtype = _resolve_dtype(torch_dtype)
    model_kwargs = {k: kwargs.pop(k) for k in _MODEL_KWARGS if k in kwargs}
    fields = {f.name for f in dataclasses.fields(VLMoConfig)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(f"from_pretrained() got unexpected keyword argument(s) {unknown}: neither "
                        f"VLMoConfig fields (overrides) nor VLMo arguments {list(_MODEL_KWARGS)}")
    requested = Path(directory)
    directory = resolve_directory(requested)  # the complete old copy if a save was interrupted
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise FileNotFoundError(f"{requested} {what}: expected a checkpoint directory written by "
                                "save_pretrained (config.json, model.safetensors, manifest.json)")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}: not a vlmo_fast checkpoint directory "
                                    "(written by save_pretrained)")
    if (directory / MANIFEST_NAME).is_file():
        listed = read_manifest(directory)["files"]
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if name not in listed:
                raise CorruptFileError(directory / MANIFEST_NAME, f"does not list {name}")
        verify_manifest(directory, verify_hashes=verify)
    else:
        warnings.warn(f"{directory} has no {MANIFEST_NAME} (checkpoints written before integrity "
                      "manifests): the files' integrity is not verified", stacklevel=2)
    config = read_config(directory / CONFIG_NAME)
    if kwargs:
        config = config.replace(**kwargs)
    state = _read_weights(directory / WEIGHTS_NAME)
    model = VLMo(config, **model_kwargs)
    ours = model.state_dict()
    # buffers are rebuilt from the config (kept when a checkpoint lacks one); the text
    # positions are never used with relative positions
    parameters = _parameters(model)
    optional = {k for k in ours if k not in parameters}
    if config.relative_position:
        optional.add(TEXT_POSITIONS)
    _check_fit(state, _meta(ours), strict=True, what=str(directory / WEIGHTS_NAME), optional=optional,
               hint=f"(written for the config in {directory / CONFIG_NAME}"
                    + (f" with overrides {kwargs})" if kwargs else ")"))
    if dtype is None:  # "auto": each parameter takes the checkpoint's dtype
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in state and state[name].dtype != param.dtype:
                    param.data = param.data.to(state[name].dtype)
    else:
        model.to(dtype)
    model.load_state_dict({k: v for k, v in state.items() if k in ours}, strict=False)
    return model.to(map_location).eval()
