"""timm model names for VLMo's vision tower.

    import timm, vlmo_fast          # registers the names once timm is imported
    tower = timm.create_model("vlmo_base_patch16_224", pretrained=True,
                              pretrained_cfg_overlay=dict(file="ckpt/model.safetensors"))
    features = tower(images)                     # = VLMo.encode_image(images).features
    tokens = tower.forward_features(images)      # = VLMo.encode_image(images).hidden
    tower.reset_classifier(1000)                 # a linear head on the ITC embedding
    maps = timm.create_model(..., features_only=True, out_indices=(3, 7, 11))  # NCHW per block

`VLMoVisionTower` is the image pass of `vlmo_fast.VLMo` as a timm backbone: patch embedding,
[CLS], the image token-type embedding, VLMo's `MoMEBlock`s keeping only the vision expert
(so no parameter goes unused in fine-tuning), the final LayerNorm and the ITC image
projection, with timm's conventions (`forward_features`, `forward_head(pre_logits=)`,
`reset_classifier`, `forward_intermediates` for `features_only`, `set_grad_checkpointing`,
`no_weight_decay`, `group_matcher`). Its backends are vlmo_fast's (`ffn_backend=`,
`attn_backend=` pass through `create_model`).

Weights (`pretrained_cfg_overlay=dict(file=...)`, or `load_vlmo_weights`): a vlmo_fast
checkpoint (model.safetensors of `save_pretrained`), a VLMo state_dict, a reference
(microsoft/unilm) VLMo checkpoint, or this tower's own state_dict. Names: vlmo_{tiny,base,
large,base_plus}_patch16_{size}; any other size takes the fields as keyword arguments, or
`vision_tower_from_pretrained(folder)` reads them from the checkpoint's config.json. No
weights are downloaded: `pretrained=True` needs a file. The loader checks depth, width,
heads, patch size and position kind against the weights; the image size is not in the
weights (only a bias table too small for the model's grid is caught): pick the name or
img_size= the checkpoint was trained at, or let vision_tower_from_pretrained read it.

The relative position table keeps VLMo's layout (the image rows of every layer, plus the
few text rows of a 2-token text table that an image never reads), so the attention
backends look it up exactly as in VLMo.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from timm.models import build_model_with_cfg, register_model
from timm.models._features import feature_take_indices
from timm.models._registry import generate_default_cfgs

from .block import MoMEBlock
from .checkpoint import CheckpointMismatchError, read_config, reference_to_vlmo, unwrap_state_dict
from .config import VLMoConfig
from .embeddings import PatchEmbed, RelativePositionBias
from .mome import VISION

__all__ = ["VLMoVisionTower", "checkpoint_filter_fn", "load_vlmo_weights", "tower_kwargs",
           "vision_tower_from_pretrained"]

# text rows of the tower's table: the smallest text table RelativePositionBias builds
_TOWER_TEXT_LEN = 2
_EXPERT_FIELDS = ("norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


class VLMoVisionTower(nn.Module):
    """VLMo's image pass as a timm model (see the module docstring).

    Args (VLMoConfig's names in brackets): img_size, patch_size, in_chans, embed_dim [dim],
    depth, num_heads, mlp_ratio, qkv_bias, layer_scale (False: layer_scale_init=None) and
    layer_scale_init, relative_position,
    drop_path_rate, layer_norm_eps, init_std; embed_proj_dim: size of the ITC image
    projection (default embed_dim; 0: none, the head sits on the pooled token);
    num_classes (0: no head, the model returns the L2-normalised ITC embedding),
    global_pool ("token" = [CLS] as VLMo, "avg" = mean of the patch tokens, "" = none),
    ffn_backend / attn_backend (vlmo_fast backend names).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 0, global_pool: str = "token", embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 layer_scale: bool = True, layer_scale_init: float = 0.1, relative_position: bool = True,
                 drop_path_rate: float = 0.0, layer_norm_eps: float = 1e-6, init_std: float = 0.02,
                 embed_proj_dim: Optional[int] = None, ffn_backend: Optional[str] = None,
                 attn_backend: Optional[str] = None):
        super().__init__()
        if global_pool not in ("", "avg", "token"):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        # timm.create_model drops None arguments, so layer scale is switched by a bool here
        layer_scale_init = float(layer_scale_init) if layer_scale else None
        # VLMoConfig checks every size (divisibility, ranges) with messages naming the field
        VLMoConfig(dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                   img_size=img_size, patch_size=patch_size, in_chans=in_chans, qkv_bias=qkv_bias,
                   layer_scale_init=layer_scale_init, relative_position=relative_position,
                   drop_path_rate=drop_path_rate, layer_norm_eps=layer_norm_eps, init_std=init_std,
                   vl_layers=0)
        self.num_classes, self.global_pool = num_classes, global_pool
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 1
        self.init_std = init_std
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.type_embed = nn.Parameter(torch.zeros(embed_dim))   # VLMo's image token type
        if relative_position:
            self.pos_embed = None
            self.rel_pos_bias = RelativePositionBias(grid, _TOWER_TEXT_LEN, num_heads, depth)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
            self.rel_pos_bias = None
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            MoMEBlock(embed_dim, num_heads, num_experts=1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      layer_scale_init=layer_scale_init, drop_path=rates[i], eps=layer_norm_eps,
                      ffn_backend=ffn_backend, attn_backend=attn_backend)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        proj_dim = embed_dim if embed_proj_dim is None else embed_proj_dim
        self.image_proj = nn.Linear(embed_dim, proj_dim, bias=False) if proj_dim > 0 else None
        self.head_hidden_size = proj_dim if proj_dim > 0 else embed_dim
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size)
                             for i in range(depth)]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """VLMo's initialisation of the same tensors (VLMo.reset_parameters)."""
        std = self.init_std
        self.patch_embed.reset_parameters()
        nn.init.trunc_normal_(self.cls_token, std=std)
        nn.init.normal_(self.type_embed, std=std)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=std)
        if self.rel_pos_bias is not None:
            self.rel_pos_bias.reset_parameters()
        for blk in self.blocks:
            blk.reset_parameters(std=std)
        self.norm.reset_parameters()
        for linear in (self.image_proj, self.head):
            if isinstance(linear, nn.Linear):
                nn.init.trunc_normal_(linear.weight, std=std)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)

    # -- timm conventions --------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        names = {"cls_token", "type_embed", "pos_embed", "rel_pos_bias.relative_position_bias_table"}
        for i, blk in enumerate(self.blocks):
            names |= {f"blocks.{i}.{n}" for n in blk.no_weight_decay()}
        present = dict(self.named_parameters())
        return {n for n in names if n in present}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|^type_embed|^pos_embed|^patch_embed|^rel_pos_bias",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new Linear head (num_classes > 0) on the ITC embedding, or none (0)."""
        if global_pool is not None:
            if global_pool not in ("", "avg", "token"):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.cls_token
        self.head = (nn.Linear(self.head_hidden_size, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=self.init_std)
            nn.init.zeros_(self.head.bias)
        self.head.train(self.training)

    # -- passes ------------------------------------------------------------------------------
    def _embed(self, x: Tensor) -> Tensor:
        patches = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x + self.type_embed

    def _layer_biases(self, x: Tensor) -> list:
        if self.rel_pos_bias is None:
            return [None] * len(self.blocks)
        length = x.shape[1]
        is_text = torch.zeros(length, dtype=torch.bool, device=x.device)
        return self.rel_pos_bias.layer_biases(is_text, torch.arange(length, device=x.device))

    def _block(self, i: int, x: Tensor, ids: Tensor, bias) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self.blocks[i], x, ids, attn_bias=bias, use_reentrant=False)
        return self.blocks[i](x, ids, attn_bias=bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """[B, 1 + P, embed_dim] after the final LayerNorm (VLMo.encode_image(x).hidden)."""
        x = self._embed(x)
        ids = torch.full(x.shape[:2], VISION, dtype=torch.long, device=x.device)
        biases = self._layer_biases(x)
        for i in range(len(self.blocks)):
            x = self._block(i, x, ids, biases[i])
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool ([CLS] or mean of patches), project and L2-normalise as VLMo's ITC head, then
        the classifier (pre_logits=True stops before it)."""
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        if self.image_proj is not None and self.global_pool:
            x = F.normalize(self.image_proj(x), dim=-1)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's feature API: the outputs of the blocks `indices` (int: the last n) as
        NCHW maps (or NLC tokens); norm=True passes them through the final LayerNorm."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = feature_take_indices(len(self.blocks), indices)
        b, _, height, width = x.shape
        x = self._embed(x)
        ids = torch.full(x.shape[:2], VISION, dtype=torch.long, device=x.device)
        biases = self._layer_biases(x)
        intermediates = []
        for i in range(last + 1 if stop_early else len(self.blocks)):
            x = self._block(i, x, ids, biases[i])
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            p = self.patch_embed.patch_size
            intermediates = [y.reshape(b, height // p, width // p, -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take, last = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        self.feature_info = self.feature_info[:last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.image_proj = None
            self.reset_classifier(0, "")
        return take


# -- weights ---------------------------------------------------------------------------------
def _is_reference(sd: Dict[str, Tensor]) -> bool:
    return any(k.startswith("transformer.") for k in sd)


def checkpoint_filter_fn(state_dict, model: VLMoVisionTower) -> Dict[str, Tensor]:
    """A VLMo checkpoint (vlmo_fast names, or the reference's) -> this tower's names: the vision
    expert of every block, the image rows of the bias table, the image token type, the ITC
    image projection; everything else is left out (the text and VL experts, the language
    attention `attn_text` of a per-modality-attention model: images use `attn`, as in
    VLMo's image pass). A tower state_dict passes through. Sizes are checked first:
    CheckpointMismatchError says which differ and nothing is loaded."""
    sd = unwrap_state_dict(state_dict)
    if "type_embed" in sd:   # already this tower's names
        return dict(sd)
    if _is_reference(sd):
        sd, _ = reference_to_vlmo(sd)
    if "token_type_embeddings.weight" not in sd or "patch_embed.proj.weight" not in sd:
        raise CheckpointMismatchError(
            "not a VLMo checkpoint: it has no token_type_embeddings.weight / patch_embed.proj.weight "
            f"(first names: {sorted(sd)[:5]}); expected a vlmo_fast model.safetensors, a VLMo state_dict "
            "or a reference VLMo checkpoint")
    depth = len(model.blocks)
    found_depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    found_dim = int(sd["cls_token"].shape[-1])
    found_patch = int(sd["patch_embed.proj.weight"].shape[-1])
    problems = []
    if found_depth != depth:
        problems.append(f"depth {found_depth} (model {depth})")
    if found_dim != model.embed_dim:
        problems.append(f"dim {found_dim} (model {model.embed_dim})")
    if found_patch != model.patch_embed.patch_size:
        problems.append(f"patch_size {found_patch} (model {model.patch_embed.patch_size})")
    if (model.pos_embed is None) != ("pos_embed" not in sd):
        problems.append("relative positions" if "pos_embed" not in sd else "absolute positions (pos_embed)")
    table_name = "rel_pos_bias.relative_position_bias_table"
    if model.rel_pos_bias is not None and table_name in sd:
        table = sd[table_name]
        heads = table.shape[1] // max(found_depth, 1)
        if heads != model.rel_pos_bias.num_heads:
            problems.append(f"num_heads {heads} (model {model.rel_pos_bias.num_heads})")
        # rows = image rows (from the grid) + 2 + 2 * text rows. The grid is not in the weights:
        # a table whose rows no text length completes for the model's grid is refused; one that
        # some text length completes cannot be told apart (config.json knows the grid)
        text_rows = (table.shape[0] - model.rel_pos_bias.num_image_distances - 2) / 2
        if text_rows < 2 or text_rows != int(text_rows):
            problems.append(f"a bias table of {table.shape[0]} rows, which no text length completes for "
                            f"the model's {model.patch_embed.grid_size}x{model.patch_embed.grid_size} "
                            f"patch grid (img_size {model.patch_embed.img_size}): another img_size")
    if problems:
        raise CheckpointMismatchError(
            "the VLMo checkpoint does not fit this vision tower; nothing was loaded: checkpoint "
            + ", ".join(problems) + ". Create the tower with the checkpoint's sizes "
            "(vision_tower_from_pretrained(folder), or the matching keyword arguments)")
    out = {k: sd[k] for k in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token",
                              "norm.weight", "norm.bias") if k in sd}
    if "pos_embed" in sd:
        out["pos_embed"] = sd["pos_embed"]
    out["type_embed"] = sd["token_type_embeddings.weight"][1]
    if model.rel_pos_bias is not None:
        table = sd[table_name]
        rows = model.rel_pos_bias.num_image_distances
        ours = torch.zeros_like(model.rel_pos_bias.relative_position_bias_table, dtype=table.dtype)
        ours[:rows] = table[:rows]
        out[table_name] = ours
    for i in range(depth):
        for name in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias",
                     "attn.proj.weight", "attn.proj.bias", "gamma_1", "gamma_2"):
            key = f"blocks.{i}.{name}"
            if key in sd:
                out[key] = sd[key]
        for field in _EXPERT_FIELDS:
            out[f"blocks.{i}.mlp.{field}"] = sd[f"blocks.{i}.mlp.{field}"][VISION:VISION + 1]
    if model.image_proj is not None and "itc.image_proj.weight" in sd:
        out["image_proj.weight"] = sd["itc.image_proj.weight"]
    return out


def load_vlmo_weights(model: VLMoVisionTower, path_or_state_dict, strict: bool = True):
    """Load a VLMo checkpoint into a tower: a file (.safetensors or a torch checkpoint), a
    vlmo_fast checkpoint folder (its model.safetensors), or a state_dict. Returns
    load_state_dict's result (missing keys: the head when the tower has one)."""
    sd = path_or_state_dict
    if isinstance(sd, (str, os.PathLike)):
        path = Path(sd)
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint file (expected a vlmo_fast checkpoint "
                                    "folder, a model.safetensors or a torch checkpoint)")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    result = model.load_state_dict(checkpoint_filter_fn(sd, model), strict=False)
    head = {k for k in result.missing_keys if k.startswith("head.") or k == "image_proj.weight"}
    if strict and (set(result.missing_keys) - head or result.unexpected_keys):
        raise CheckpointMismatchError(f"tower weights: missing {result.missing_keys}, unexpected "
                                      f"{result.unexpected_keys}")
    return result


def tower_kwargs(config: VLMoConfig) -> dict:
    """The VLMoVisionTower keyword arguments of a VLMoConfig (the image pass's sizes)."""
    return dict(img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans,
                embed_dim=config.dim, depth=config.depth, num_heads=config.num_heads,
                mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias,
                layer_scale=config.layer_scale_init is not None,
                layer_scale_init=0.1 if config.layer_scale_init is None else config.layer_scale_init,
                relative_position=config.relative_position,
                layer_norm_eps=config.layer_norm_eps, init_std=config.init_std)


def vision_tower_from_pretrained(directory, **kwargs) -> VLMoVisionTower:
    """`timm.create_model` of a tower with the sizes of a vlmo_fast checkpoint folder
    (config.json; save_pretrained's or export_hf's) and its weights (model.safetensors);
    kwargs go to create_model (num_classes, features_only, drop_path_rate, ...)."""
    import timm
    directory = Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}: expected a vlmo_fast checkpoint folder "
                                    "(written by save_pretrained)")
    config = read_config(directory / "config.json")
    return timm.create_model("vlmo_base_patch16_224", pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(directory / "model.safetensors"),
                                                         input_size=(config.in_chans, config.img_size,
                                                                     config.img_size)),
                             **{**tower_kwargs(config), **kwargs})


# -- registration ----------------------------------------------------------------------------
def _create(variant: str, pretrained: bool = False, **kwargs) -> VLMoVisionTower:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(VLMoVisionTower, variant, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                                **kwargs)


def _cfg(img_size: int) -> dict:
    # no url: weights come from a file (pretrained_cfg_overlay=dict(file=...))
    return {"url": "", "num_classes": 0, "input_size": (3, img_size, img_size), "pool_size": None,
            "crop_pct": 1.0, "interpolation": "bicubic", "fixed_input_size": True,
            "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "first_conv": "patch_embed.proj",
            "classifier": "head", "license": "mit"}


def _preset_kwargs(name: str, **overrides) -> dict:
    return {**tower_kwargs(VLMoConfig.preset(name)), **overrides}


default_cfgs = generate_default_cfgs({
    "vlmo_tiny_patch16_32": _cfg(32),
    "vlmo_base_patch16_224": _cfg(224),
    "vlmo_base_patch16_384": _cfg(384),
    "vlmo_large_patch16_224": _cfg(224),
    "vlmo_base_plus_patch16_224": _cfg(224),
})


@register_model
def vlmo_tiny_patch16_32(pretrained: bool = False, **kwargs) -> VLMoVisionTower:
    """vlmo_fast's `tiny` preset (tests, CPU demos)."""
    return _create("vlmo_tiny_patch16_32", pretrained, **_preset_kwargs("tiny", **kwargs))


@register_model
def vlmo_base_patch16_224(pretrained: bool = False, **kwargs) -> VLMoVisionTower:
    """VLMo-Base: 12 x 768, 12 heads, relative positions, layer scale 0.1."""
    return _create("vlmo_base_patch16_224", pretrained, **_preset_kwargs("base", **kwargs))


@register_model
def vlmo_base_patch16_384(pretrained: bool = False, **kwargs) -> VLMoVisionTower:
    """VLMo-Base at 384 (the reference's fine-tuning resolution)."""
    return _create("vlmo_base_patch16_384", pretrained, **_preset_kwargs("base", img_size=384, **kwargs))


@register_model
def vlmo_large_patch16_224(pretrained: bool = False, **kwargs) -> VLMoVisionTower:
    """VLMo-Large: 24 x 1024, 16 heads."""
    return _create("vlmo_large_patch16_224", pretrained, **_preset_kwargs("large", **kwargs))


@register_model
def vlmo_base_plus_patch16_224(pretrained: bool = False, **kwargs) -> VLMoVisionTower:
    """VLMo-Base+: 24 x 544, 16 heads, absolute positions, no layer scale."""
    return _create("vlmo_base_plus_patch16_224", pretrained, **_preset_kwargs("base_plus", **kwargs))
