"""Fine-tuning pieces that do not depend on the training loop: one step module per task
(`module(batch) -> {"loss", "metrics"}`, the contract of vlmo_fast.training's engine and loop)
and AdamW parameter groups with a head learning-rate multiplier and layer-wise decay.

- VQA (`VQAStep`): fusion encoder over [question ; image] -> pooled [CLS] -> answer
  classifier; soft-score binary cross-entropy over the answer vocabulary, multiplied by the
  number of answers (the reference's scaling, ViLT / VLMo). Batches: the data layer's
  `build_task_loader("vqa", ...)` (images, text_ids, text_mask, vqa_targets).
- NLVR2 (`NLVR2Step`): `NLVR2Model` (both (statement, image) pairs through the fusion encoder,
  pooled vectors concatenated, classifier) with cross-entropy. Batches: images_left,
  images_right, text_ids, text_mask, labels.
- retrieval (`RetrievalStep`): the model as a dual encoder, the fused contrastive loss over
  the global batch (`vlmo_fast.losses.contrastive_loss`, gathered across ranks) on the main
  ITC head only (the reference's fine-tuning drops the VL-expert ITC branch). Batches: the
  pretraining loader's "vl" stage (images, text_ids, text_mask). Hard-negative ITM on top is
  the pretraining step of the vl stage with MLM weighted 0 (train/finetune.py --itm).

`finetune_param_groups`: the head (classifier) gets lr * head_lr_mult; with layer_decay < 1
the encoder's layer i (embeddings 0, blocks 1..depth, final norm / pooler depth + 1) gets
lr * layer_decay ** (depth + 1 - i) (BEiT's layer-wise decay); no weight decay on biases,
norms, layer scales, positions and the bias table, as in pretraining.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .eval.nlvr2 import NLVR2Model
from .eval.vqa import vqa_soft_accuracy

# never decayed besides every 0-/1-d tensor (the pretraining optimiser's list)
NO_DECAY_SUFFIXES = ("cls_token", "pos_embed", "relative_position_bias_table", "logit_scale",
                     "norm_weight", "norm_bias", "fc1_bias", "fc2_bias", "gamma_1", "gamma_2")
# parameters of a VLMo that form layer 0 (below the first block)
_EMBEDDING_PREFIXES = ("text_embeddings.", "token_type_embeddings.", "patch_embed.", "cls_token",
                       "pos_embed", "rel_pos_bias.")


def _external_parameters(model) -> List[nn.Parameter]:
    """Parameters used outside their owner's forward (ZeRO-3 must gather them explicitly)."""
    owners = [model, model.token_type_embeddings, model.rel_pos_bias]
    return [p for owner in owners if owner is not None for p in owner.parameters(recurse=False)]


class RetrievalStep(nn.Module):
    """ITC-only retrieval fine-tuning step (dual encoder, global-batch contrastive loss)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def external_parameters(self):
        return _external_parameters(self.model) + list(self.model.itc.parameters(recurse=False))

    def head_parameter_names(self) -> List[str]:
        return []

    def forward(self, batch: Dict[str, Tensor]) -> Dict[str, object]:
        from .losses import contrastive_loss
        m = self.model
        img = m.encode_image(batch["images"]).features
        txt = m.encode_text(batch["text_ids"], batch.get("text_mask")).features
        loss, stats = contrastive_loss(img, txt, m.itc.logit_scale, return_stats=True,
                                       rank_grad_reduction="mean")
        return {"loss": loss, "metrics": {"itc": loss.detach(), "itc_i2t_acc": stats.i2t_accuracy,
                                          "itc_t2i_acc": stats.t2i_accuracy,
                                          "logit_scale": m.itc.logit_scale.detach().reshape(())}}


class VQAStep(nn.Module):
    """VQA fine-tuning step over a VLMo with `config.num_classes` = number of answers."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if getattr(model, "classifier", None) is None:
            raise ValueError("VQA fine-tuning needs a classifier head: build the model with "
                             "config.num_classes = the answer vocabulary size")
        self.model = model

    def external_parameters(self):
        return _external_parameters(self.model)

    def head_parameter_names(self) -> List[str]:
        return [f"model.{n}" for n, _ in self.model.classifier.named_parameters(prefix="classifier")]

    def forward(self, batch: Dict[str, Tensor]) -> Dict[str, object]:
        targets = batch["vqa_targets"]
        if targets.shape[-1] != self.model.config.num_classes:
            raise ValueError(f"vqa_targets have {targets.shape[-1]} answers, the classifier "
                             f"{self.model.config.num_classes}")
        pair = self.model.encode_pair(batch["text_ids"], batch["images"], batch.get("text_mask"))
        logits = self.model.classify(pair).float()
        loss = F.binary_cross_entropy_with_logits(logits, targets.float()) * targets.shape[-1]
        with torch.no_grad():
            score = targets.float().gather(1, logits.argmax(1, keepdim=True)).mean()
        return {"loss": loss, "metrics": {"vqa_bce": loss.detach(), "vqa_score": score}}


class NLVR2Step(nn.Module):
    """NLVR2 fine-tuning step over an `NLVR2Model`."""

    def __init__(self, model: NLVR2Model):
        super().__init__()
        if not isinstance(model, NLVR2Model):
            raise TypeError(f"NLVR2Step needs an NLVR2Model, got {type(model).__name__}")
        self.model = model

    def external_parameters(self):
        return _external_parameters(self.model.backbone)

    def head_parameter_names(self) -> List[str]:
        return [f"model.{n}" for n, _ in self.model.head.named_parameters(prefix="head")]

    def forward(self, batch: Dict[str, Tensor]) -> Dict[str, object]:
        logits = self.model(batch["text_ids"], batch["images_left"], batch["images_right"],
                            batch.get("text_mask")).float()
        labels = batch["labels"].long()
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            accuracy = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss, "metrics": {"nlvr2_ce": loss.detach(), "nlvr2_acc": accuracy}}


def layer_id(name: str, depth: int) -> int:
    """Layer of a VLMo parameter name (relative to the VLMo): 0 embeddings, 1 + i for
    blocks.i, depth + 1 for everything above (final norm, pooler, heads)."""
    if name.startswith(_EMBEDDING_PREFIXES):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return depth + 1


def finetune_param_groups(step_module: nn.Module, lr: float, weight_decay: float, *,
                          head_lr_mult: float = 1.0, layer_decay: float = 1.0,
                          backbone_prefix: Optional[str] = None) -> List[Dict]:
    """AdamW groups of the trainable parameters, each with its own "lr" (and "lr_scale").

    backbone_prefix: where the VLMo sits inside `step_module` ("model." for VQA /
    retrieval steps, "model.backbone." for NLVR2; found automatically when None)."""
    if lr <= 0 or head_lr_mult <= 0 or not 0 < layer_decay <= 1:
        raise ValueError(f"need lr > 0, head_lr_mult > 0 and layer_decay in (0, 1], got {lr}, "
                         f"{head_lr_mult}, {layer_decay}")
    if backbone_prefix is None:
        backbone_prefix = "model.backbone." if isinstance(getattr(step_module, "model", None), NLVR2Model) \
            else "model."
    backbone = step_module.get_submodule(backbone_prefix.rstrip(".")) if backbone_prefix else step_module
    depth = backbone.config.depth
    heads = set(getattr(step_module, "head_parameter_names", lambda: [])())
    no_decay_names = {backbone_prefix + n for n in getattr(backbone, "no_weight_decay", lambda: set())()}
    groups: Dict[tuple, Dict] = {}
    for name, p in step_module.named_parameters():
        if not p.requires_grad:
            continue
        if name in heads:
            scale, layer = head_lr_mult, "head"
        elif name.startswith(backbone_prefix):
            lid = layer_id(name[len(backbone_prefix):], depth)
            scale, layer = layer_decay ** (depth + 1 - lid), lid
        else:   # step-module parameters outside the VLMo (none today): top layer
            scale, layer = 1.0, depth + 1
        decay = not (p.dim() <= 1 or name in no_decay_names or name.endswith(NO_DECAY_SUFFIXES))
        key = (layer, decay)
        group = groups.setdefault(key, {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                        "lr": lr * scale, "lr_scale": scale,
                                        "name": f"{'head' if layer == 'head' else f'layer{layer}'}"
                                                f"_{'decay' if decay else 'no_decay'}"})
        group["params"].append(p)
    if not groups:
        raise ValueError("no trainable parameters")
    return list(groups.values())
