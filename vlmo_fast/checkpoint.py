"""Checkpoints: the reference VLMo state_dict, timm BEiT, and our own safetensors format.

- `load_reference_state_dict(model, sd)` / `export_reference_state_dict(model)`: the
  published implementation's parameter names (microsoft/unilm `vlmo`), both ways, exactly.
  Per-expert Linear weights (out, in) become rows of our stacked (in, out) expert tensors.
- `load_beit_state_dict(model, sd)`: a timm BEiT (`beit_base_patch16_224` layout) into the
  attention + vision expert; its per-layer bias tables go into the shared table.
- `save_pretrained(model, dir)` / `from_pretrained(dir)`: model.safetensors + config.json.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Mapping, Tuple, Union

import torch
from torch import Tensor

from .config import VLMoConfig
from .io import atomic_write

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
# per-block parameters whose names are the same on both sides (under blocks.N / transformer.blocks.N)
_BLOCK_SAME = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias",
               "attn.proj.weight", "attn.proj.bias", "gamma_1", "gamma_2")
# buffers some reference checkpoints carry that we rebuild ourselves
_IGNORED_REFERENCE_KEYS = re.compile(
    r"^(text_embeddings\.position_ids|relative_position_index|text_relative_position_index|"
    r"text_imag_relative_position_index)$")


class CheckpointMismatchError(KeyError):
    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def unwrap_state_dict(obj: Mapping) -> Dict[str, Tensor]:
    """Accept a raw state_dict or one wrapped as {'state_dict'|'module'|'model': ...};
    strip a DeepSpeed/DDP 'module.' prefix."""
    for key in ("state_dict", "module", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _report(missing: List[str], unexpected: List[str], strict: bool, what: str):
    if strict and (missing or unexpected):
        lines = [f"{what} does not match the model"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing[:12])}" + (" ..." if len(missing) > 12 else ""))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected[:12])}" + (" ..." if len(unexpected) > 12 else ""))
        lines.append("  (pass strict=False to load the matching part)")
        raise CheckpointMismatchError("\n".join(lines))
    return missing, unexpected


def _copy(dst: Tensor, src: Tensor, name: str) -> None:
    if src.dim() == 0 and dst.shape == (1,):
        src = src.reshape(1)  # the reference's 0-d logit scales; ours are [1] (DeepSpeed)
    if tuple(dst.shape) != tuple(src.shape):
        raise CheckpointMismatchError(f"{name}: checkpoint has shape {tuple(src.shape)}, the model "
                                      f"expects {tuple(dst.shape)}; check the config/preset")
    with torch.no_grad():
        dst.copy_(src.to(dst.dtype))


# -- reference VLMo ------------------------------------------------------------------------
def export_reference_state_dict(model) -> Dict[str, Tensor]:
    """Our VLMo -> the reference implementation's state_dict (new tensors, same values)."""
    ours = model.state_dict()
    out: Dict[str, Tensor] = {}
    for name, ref in _TOP_LEVEL.items():
        if name in ours:
            value = ours[name].clone()
            out[ref] = value.reshape(()) if name.endswith("logit_scale") else value
    for k in ours:
        if k.startswith("text_embeddings.") or k.startswith("token_type_embeddings."):
            out[k] = ours[k].clone()
        if k.startswith("pooler."):
            out[k] = ours[k].clone()
    for i, blk in enumerate(model.blocks):
        p, r = f"blocks.{i}.", f"transformer.blocks.{i}."
        for s in _BLOCK_SAME:
            if p + s in ours:
                out[r + s] = ours[p + s].clone()
        mlp = blk.mlp
        for e in range(mlp.num_experts):
            sfx = EXPERT_SUFFIX[e]
            out[f"{r}norm2_{sfx}.weight"] = mlp.norm_weight.detach()[e].clone()
            out[f"{r}norm2_{sfx}.bias"] = mlp.norm_bias.detach()[e].clone()
            out[f"{r}mlp_{sfx}.fc1.weight"] = mlp.fc1_weight.detach()[e].t().contiguous()
            out[f"{r}mlp_{sfx}.fc1.bias"] = mlp.fc1_bias.detach()[e].clone()
            out[f"{r}mlp_{sfx}.fc2.weight"] = mlp.fc2_weight.detach()[e].t().contiguous()
            out[f"{r}mlp_{sfx}.fc2.bias"] = mlp.fc2_bias.detach()[e].clone()
    return out


def load_reference_state_dict(model, state_dict: Mapping, strict: bool = True) -> Tuple[List[str], List[str]]:
    """Load a reference VLMo state_dict into `model`. Returns (missing, unexpected) names
    (ours for missing, theirs for unexpected); with strict=True any mismatch raises."""
    sd = unwrap_state_dict(state_dict)
    ours = dict(model.named_parameters())
    loaded = set()
    unexpected = []
    ref_to_ours = {v: k for k, v in _TOP_LEVEL.items()}
    block_re = re.compile(r"^transformer\.blocks\.(\d+)\.(.+)$")
    expert_re = re.compile(r"^(norm2|mlp)_(imag|text|vl)\.(weight|bias|fc1\.weight|fc1\.bias|fc2\.weight|fc2\.bias)$")
    for key, value in sd.items():
        if _IGNORED_REFERENCE_KEYS.match(key):
            continue
        if key in ref_to_ours and ref_to_ours[key] in ours:
            name = ref_to_ours[key]
            _copy(ours[name], value, key)
            loaded.add(name)
            continue
        if (key.startswith(("text_embeddings.", "token_type_embeddings.", "pooler."))) and key in ours:
            _copy(ours[key], value, key)
            loaded.add(key)
            continue
        m = block_re.match(key)
        if m and int(m.group(1)) < len(model.blocks):
            i, rest = int(m.group(1)), m.group(2)
            if rest in _BLOCK_SAME and f"blocks.{i}.{rest}" in ours:
                _copy(ours[f"blocks.{i}.{rest}"], value, key)
                loaded.add(f"blocks.{i}.{rest}")
                continue
            em = expert_re.match(rest)
            mlp = model.blocks[i].mlp
            if em and _EXPERT_FROM_SUFFIX[em.group(2)] < mlp.num_experts:
                e, kind, field = _EXPERT_FROM_SUFFIX[em.group(2)], em.group(1), em.group(3)
                target_name = {("norm2", "weight"): "norm_weight", ("norm2", "bias"): "norm_bias",
                               ("mlp", "fc1.weight"): "fc1_weight", ("mlp", "fc1.bias"): "fc1_bias",
                               ("mlp", "fc2.weight"): "fc2_weight", ("mlp", "fc2.bias"): "fc2_bias"}.get((kind, field))
                if target_name is not None:
                    src = value.t() if target_name in ("fc1_weight", "fc2_weight") else value
                    _copy(getattr(mlp, target_name)[e], src, key)
                    loaded.add(f"blocks.{i}.mlp.{target_name}[{e}]")
                    continue
        unexpected.append(key)
    expected = set()
    for name in ours:
        m = re.match(r"^blocks\.(\d+)\.mlp\.(\w+)$", name)
        if m:
            for e in range(model.blocks[int(m.group(1))].mlp.num_experts):
                expected.add(f"{name}[{e}]")
        else:
            expected.add(name)
    missing = sorted(expected - loaded)
    return _report(missing, unexpected, strict, "reference VLMo state_dict")


# -- timm BEiT -----------------------------------------------------------------------------
def load_beit_state_dict(model, state_dict: Mapping, strict: bool = True) -> Tuple[List[str], List[str]]:
    """Load a timm BEiT state_dict into the attention, vision expert, patch embedding,
    CLS token (and norm / pos_embed when present). Returns (loaded, ignored) names.

    BEiT's `mlp`/`norm2` become expert 0 (vision); its per-layer relative position tables
    fill the image rows of the shared table, layer by layer. Heads (`head`, `fc_norm`) are
    ignored. With strict=True, a BEiT block the model cannot hold raises."""
    sd = unwrap_state_dict(state_dict)
    ours = dict(model.named_parameters())
    rel = model.rel_pos_bias
    loaded, ignored = [], []
    heads = model.config.num_heads
    block_re = re.compile(r"^blocks\.(\d+)\.(.+)$")
    for key, value in sd.items():
        m = block_re.match(key)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if i >= len(model.blocks):
                if strict:
                    raise CheckpointMismatchError(f"{key}: the BEiT checkpoint has more blocks than the "
                                                  f"model ({len(model.blocks)})")
                ignored.append(key)
                continue
            mlp = model.blocks[i].mlp
            if rest in _BLOCK_SAME:
                _copy(ours[f"blocks.{i}.{rest}"], value, key)
            elif rest == "attn.relative_position_bias_table":
                if rel is None:
                    raise CheckpointMismatchError(f"{key}: the model uses absolute positions "
                                                  "(relative_position=False) but BEiT has relative bias")
                _copy(rel.relative_position_bias_table[:rel.num_image_distances, i * heads:(i + 1) * heads],
                      value, key)
            elif rest in ("norm2.weight", "norm2.bias"):
                _copy((mlp.norm_weight if rest.endswith("weight") else mlp.norm_bias)[0], value, key)
            elif rest in ("mlp.fc1.weight", "mlp.fc2.weight"):
                target = mlp.fc1_weight if "fc1" in rest else mlp.fc2_weight
                _copy(target[0], value.t(), key)
            elif rest in ("mlp.fc1.bias", "mlp.fc2.bias"):
                _copy((mlp.fc1_bias if "fc1" in rest else mlp.fc2_bias)[0], value, key)
            else:
                ignored.append(key)  # buffers such as relative_position_index / k_bias
                continue
            loaded.append(key)
        elif key == "rel_pos_bias.relative_position_bias_table":  # BEiT's shared-bias variant
            if rel is None:
                raise CheckpointMismatchError(f"{key}: the model has no relative position bias")
            for i in range(len(model.blocks)):
                _copy(rel.relative_position_bias_table[:rel.num_image_distances, i * heads:(i + 1) * heads],
                      value, key)
            loaded.append(key)
        elif key in ("cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                     "norm.bias") or (key == "pos_embed" and "pos_embed" in ours):
            _copy(ours[key], value, key)
            loaded.append(key)
        else:
            ignored.append(key)
    if strict and not any(k.endswith("mlp.fc1.weight") for k in loaded):
        raise CheckpointMismatchError("no BEiT block weights found in the state_dict "
                                      "(expected keys like blocks.0.mlp.fc1.weight)")
    return loaded, ignored


# -- our own format ------------------------------------------------------------------------
def save_pretrained(model, directory: Union[str, Path]) -> Path:
    """model.safetensors (weights) + config.json, each written atomically."""
    from safetensors.torch import save_file
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / "model.safetensors",
                  lambda p: save_file(tensors, p, metadata={"format": "pt", "library": "vlmo_fast"}))
    atomic_write(directory / "config.json",
                  lambda p: Path(p).write_text(model.config.to_json() + "\n"))
    return directory


def from_pretrained(directory: Union[str, Path], map_location="cpu", **model_kwargs):
    from safetensors.torch import load_file
    from .model import VLMo
    directory = Path(directory)
    for f in ("config.json", "model.safetensors"):
        if not (directory / f).is_file():
            raise FileNotFoundError(f"{directory} has no {f}: not a vlmo_fast checkpoint directory "
                                    "(written by save_pretrained)")
    config = VLMoConfig.from_json(directory / "config.json")
    model = VLMo(config, **model_kwargs)
    state = load_file(str(directory / "model.safetensors"), device=str(map_location))
    model.load_state_dict(state, strict=True)
    return model
