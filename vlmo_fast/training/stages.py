"""What each pretraining stage trains, and the FFN layouts that make the frozen sets exact.

VLMo's stage recipe (see the reference notes):
- "vision": masked image modelling; trains attention, norm1, layer scales, the VISION expert,
  patch embedding, CLS token, positions, the relative bias table and the final norm.
- "text": text-only MLM; trains text embeddings, token-type embeddings, the LANGUAGE expert,
  the MLM head, the relative bias table and the final norm. Frozen: attention, norm1, layer
  scales, vision expert, patch embedding, CLS token (as the reference).
- "vl": everything trains (the VL experts start from their random init).

The experts of a block are stored stacked (`MoMEFeedForward`: fc1_weight [E, d, h], ...), so
"freeze the vision expert, train the language expert" cannot be said with requires_grad on
one tensor (and AdamW's decoupled weight decay would move a frozen slice even with a zero
gradient). For the stages that train part of a bank the bank is converted to
`SplitExpertFeedForward`: one module per expert, each with its own parameters and
requires_grad; forward stacks them and calls the same `mome_ffn` op. DeepSpeed then sees
real frozen parameters (left out of the optimizer) that stay bitwise unchanged.
`export_state_dict` turns any of these layouts back into the plain `VLMo` state_dict.

`--ffn shared` (the paper's ablation): one FFN for every modality (`SharedFeedForward`);
exported as E identical experts, so the weights load into a plain `VLMo`. For freezing it
counts as the vision expert (it is the one the vision stage trained).

Per-modality attention (`VLMoConfig.attention="per_modality"`, the Table 7 ablation): the
vision stage trains the vision attention `attn` (the language one, `attn_text`, sees no
token and stays frozen). The text stage starts `attn_text` as a copy of `attn` and keeps both
frozen, as the reference keeps its shared attention, so entering the vl stage the model
computes exactly what the shared-attention model does; only the vl stage, which trains
everything, lets the two modalities' attention diverge. (`--skip-text-stage` therefore
starts the vl stage with a randomly initialised language attention.)
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor, nn

from ..mome import LANGUAGE, VISION, MoMEFeedForward, mome_ffn

STAGES = ("vision", "text", "vl")
FFN_MODES = ("mome", "shared")
_EXPERT_FIELDS = ("norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")

# Experts trained per stage (None = all).
STAGE_EXPERTS = {"vision": (VISION,), "text": (LANGUAGE,), "vl": None}


class _Expert(nn.Module):
    """The parameters of one expert (the [e] slice of a MoMEFeedForward)."""

    def __init__(self, bank: MoMEFeedForward, expert: int):
        super().__init__()
        for name in _EXPERT_FIELDS:
            setattr(self, name, nn.Parameter(getattr(bank, name).detach()[expert].clone()))


class SplitExpertFeedForward(nn.Module):
    """A MoMEFeedForward whose experts are separate parameters (so each can be frozen).

    forward has MoMEFeedForward's signature and numerics (the same `mome_ffn` op on the
    stacked weights; torch.stack routes gradients back to the trainable experts only)."""

    def __init__(self, bank: MoMEFeedForward):
        super().__init__()
        self.dim, self.hidden_dim, self.num_experts = bank.dim, bank.hidden_dim, bank.num_experts
        self.eps, self.backend = bank.eps, bank.backend
        self.experts = nn.ModuleList([_Expert(bank, e) for e in range(bank.num_experts)])

    def stacked(self) -> List[Tensor]:
        return [torch.stack([getattr(e, name) for e in self.experts]) for name in _EXPERT_FIELDS]

    def forward(self, x: Tensor, modality_ids: Tensor, gamma: Optional[Tensor] = None,
                drop_path_scale: Optional[Tensor] = None) -> Tensor:
        return mome_ffn(x, modality_ids, *self.stacked(), gamma, drop_path_scale, self.eps,
                        backend=self.backend)

    def no_weight_decay(self) -> set:
        """MoMEFeedForward's names, per expert (what MoMEBlock.no_weight_decay asks for)."""
        return {f"experts.{e}.{name}" for e in range(self.num_experts)
                for name in MoMEFeedForward.no_weight_decay(self)}

    def export(self) -> Dict[str, Tensor]:
        return {name: t.detach() for name, t in zip(_EXPERT_FIELDS, self.stacked())}


class SharedFeedForward(nn.Module):
    """One FFN for every token (the `--ffn shared` ablation), exported as E equal experts."""

    def __init__(self, bank: MoMEFeedForward, source_expert: int = VISION):
        super().__init__()
        self.num_experts, self.eps, self.backend = bank.num_experts, bank.eps, bank.backend
        self.ffn = MoMEFeedForward(bank.dim, bank.hidden_dim, 1, eps=bank.eps, backend=bank.backend)
        with torch.no_grad():
            for name in _EXPERT_FIELDS:
                getattr(self.ffn, name).copy_(getattr(bank, name)[source_expert:source_expert + 1])

    def forward(self, x: Tensor, modality_ids: Tensor, gamma: Optional[Tensor] = None,
                drop_path_scale: Optional[Tensor] = None) -> Tensor:
        return self.ffn(x, torch.zeros_like(modality_ids), gamma=gamma, drop_path_scale=drop_path_scale)

    def no_weight_decay(self) -> set:
        return {f"ffn.{name}" for name in self.ffn.no_weight_decay()}

    def export(self) -> Dict[str, Tensor]:
        return {name: getattr(self.ffn, name).detach().expand(self.num_experts, *getattr(self.ffn, name).shape[1:])
                for name in _EXPERT_FIELDS}


FFN_MODULE_TYPES = (MoMEFeedForward, SplitExpertFeedForward, SharedFeedForward)


def _as_bank(module: nn.Module) -> MoMEFeedForward:
    """Any FFN layout -> a plain stacked MoMEFeedForward (a new module, same values)."""
    if isinstance(module, MoMEFeedForward):
        return module
    tensors = module.export()
    e, d, h = tensors["fc1_weight"].shape
    bank = MoMEFeedForward(d, h, e, eps=module.eps, backend=module.backend)
    with torch.no_grad():
        for name in _EXPERT_FIELDS:
            getattr(bank, name).copy_(tensors[name])
    return bank.to(tensors["fc1_weight"].device)


def prepare_stage(model: nn.Module, stage: str, ffn: str = "mome") -> None:
    """Put `model` (a VLMo) in the FFN layout and requires_grad pattern of `stage`, in place."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if ffn not in FFN_MODES:
        raise ValueError(f"ffn must be one of {FFN_MODES}, got {ffn!r}")
    experts = STAGE_EXPERTS[stage]
    for blk in model.blocks:
        bank = _as_bank(blk.mlp)
        if ffn == "shared":
            # the shared FFN keeps whatever the vision expert (slot 0) holds
            blk.mlp = SharedFeedForward(bank, VISION)
        elif experts is None:
            blk.mlp = bank
        else:
            blk.mlp = SplitExpertFeedForward(bank)
    if stage == "text":
        _copy_vision_attention_to_language(model)
    for p in model.parameters():
        p.requires_grad_(stage == "vl")
    if stage == "vl":
        return
    trainable = _stage_trainable_names(model, stage)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    if ffn == "mome":
        for blk in model.blocks:
            for e, expert in enumerate(blk.mlp.experts):
                for p in expert.parameters():
                    p.requires_grad_(e in experts)
    elif stage == "vision":
        for blk in model.blocks:
            blk.mlp.requires_grad_(True)


@torch.no_grad()
def _copy_vision_attention_to_language(model: nn.Module) -> None:
    """Per-modality attention entering the text stage: the language attention of every block
    becomes the vision attention (what the shared model's text tokens use). No-op otherwise."""
    for blk in model.blocks:
        language = getattr(blk, "attn_text", None)
        if language is not None:
            for target, source in zip(language.parameters(), blk.attn.parameters()):
                target.copy_(source)


def _stage_trainable_names(model: nn.Module, stage: str) -> set:
    """Non-FFN parameters trained by a partial stage."""
    if stage == "vision":
        prefixes = ("patch_embed.", "cls_token", "pos_embed", "rel_pos_bias.", "norm.")
        block_parts = ("norm1.", "attn.", "gamma_1", "gamma_2")
    else:  # text
        prefixes = ("text_embeddings.", "token_type_embeddings.", "mlm_head.", "rel_pos_bias.", "norm.")
        block_parts = ()
    names = set()
    for name, _ in model.named_parameters():
        if name.startswith(prefixes):
            names.add(name)
        elif name.startswith("blocks.") and name.split(".", 2)[2].startswith(block_parts) and block_parts:
            names.add(name)
    return names


def export_state_dict(model: nn.Module, values: Optional[Dict[str, Tensor]] = None) -> Dict[str, Tensor]:
    """The plain `VLMo` state_dict of a model in any stage layout.

    values: tensors by the model's own state_dict names (e.g. fp32 master weights gathered
    from the optimizer); default: the model's current tensors (detached, same device)."""
    state = values if values is not None else {k: v.detach() for k, v in model.state_dict().items()}
    converted = {f"blocks.{i}.mlp.": blk.mlp for i, blk in enumerate(model.blocks)
                 if not isinstance(blk.mlp, MoMEFeedForward)}
    out = {name: t for name, t in state.items() if not any(name.startswith(p) for p in converted)}
    for prefix, module in converted.items():
        for field in _EXPERT_FIELDS:
            if isinstance(module, SplitExpertFeedForward):
                t = torch.stack([state[f"{prefix}experts.{e}.{field}"] for e in range(module.num_experts)])
            else:  # SharedFeedForward: one FFN -> every expert slot
                one = state[f"{prefix}ffn.{field}"]
                t = one.expand(module.num_experts, *one.shape[1:])
            out[prefix + field] = t.contiguous()
    return out


def frozen_parameters(module: nn.Module) -> Dict[str, Tensor]:
    return {n: p for n, p in module.named_parameters() if not p.requires_grad}


def trainable_parameters(module: nn.Module) -> Iterable[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
