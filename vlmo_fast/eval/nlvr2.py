"""NLVR2: one statement, two images, true/false.

The model encodes (statement, left image) and (statement, right image) with the fusion
encoder, concatenates the two pooled [CLS] vectors and classifies them (the reference's
`nlvr2_classifier` shape: Linear(2d, 2d) -> LayerNorm -> GELU -> Linear(2d, 2)).
Metrics: accuracy, and consistency (share of statements whose examples are ALL right:
NLVR2 pairs each statement with several image pairs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..env import INTEGER_DTYPES


def _as_predictions(logits_or_predictions: Tensor) -> Tensor:
    x = logits_or_predictions
    if x.dim() == 2:
        if x.shape[1] != 2:
            raise ValueError(f"NLVR2 logits must be [N, 2], got {tuple(x.shape)}")
        return x.argmax(1)
    if x.dim() == 1 and (x.dtype in INTEGER_DTYPES or x.dtype == torch.bool):
        return x.long()
    raise ValueError("expected [N, 2] logits or [N] integer/bool predictions")


def _labels(labels) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or not (labels.dtype in INTEGER_DTYPES or labels.dtype == torch.bool):
        raise ValueError(f"labels must be a 1-D bool/integer tensor, got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 1):
        raise ValueError("NLVR2 labels must be 0 (false) or 1 (true): unknown label "
                         f"{int(labels.max()) if int(labels.max()) > 1 else int(labels.min())}")
    return labels


def nlvr2_accuracy(logits_or_predictions: Tensor, labels) -> float:
    pred, labels = _as_predictions(logits_or_predictions), _labels(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"{pred.shape[0]} predictions for {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("nlvr2_accuracy needs at least one example")
    return float((pred.cpu() == labels.cpu()).double().mean())


def nlvr2_consistency(logits_or_predictions: Tensor, labels, statement_ids: Sequence) -> float:
    """Share of distinct statements (`statement_ids`, any hashable) with every example right."""
    pred, labels = _as_predictions(logits_or_predictions).cpu(), _labels(labels).cpu()
    if not (pred.shape[0] == labels.shape[0] == len(statement_ids)):
        raise ValueError(f"predictions ({pred.shape[0]}), labels ({labels.shape[0]}) and "
                         f"statement_ids ({len(statement_ids)}) must have the same length")
    if labels.numel() == 0:
        raise ValueError("nlvr2_consistency needs at least one example")
    all_right: Dict[object, bool] = {}
    for sid, ok in zip(statement_ids, (pred == labels).tolist()):
        all_right[sid] = all_right.get(sid, True) and ok
    return sum(all_right.values()) / len(all_right)


class NLVR2Head(nn.Module):
    """Classifier over the two pooled pair vectors (2 * dim -> 2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(2 * dim, 2 * dim)
        self.norm = nn.LayerNorm(2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, 2)

    def forward(self, pooled_left: Tensor, pooled_right: Tensor) -> Tensor:
        return self.fc2(self.act(self.norm(self.fc1(torch.cat([pooled_left, pooled_right], -1)))))


HEAD_FILE = "nlvr2_head.safetensors"


class NLVR2Model(nn.Module):
    """A VLMo backbone + `NLVR2Head`: logits [B, 2] for (statement, left, right).
    Saved as the backbone's save_pretrained folder plus nlvr2_head.safetensors."""

    def __init__(self, backbone: nn.Module, head: Optional[NLVR2Head] = None):
        super().__init__()
        self.backbone = backbone
        self.head = head if head is not None else NLVR2Head(backbone.config.dim)

    @property
    def config(self):
        return self.backbone.config

    def save_pretrained(self, directory) -> Path:
        from safetensors.torch import save_file
        from ..io import atomic_write
        directory = Path(directory)
        self.backbone.save_pretrained(directory)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        atomic_write(directory / HEAD_FILE, lambda p: save_file(tensors, p))
        return directory

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu") -> "NLVR2Model":
        from safetensors.torch import load_file
        from ..model import VLMo
        directory = Path(directory)
        if not (directory / HEAD_FILE).is_file():
            raise FileNotFoundError(f"{directory} has no {HEAD_FILE}: not an NLVR2 fine-tuned checkpoint "
                                    "(fine-tune one with train/finetune.py --task nlvr2)")
        backbone = VLMo.from_pretrained(directory, map_location=map_location)
        model = cls(backbone)
        model.head.load_state_dict(load_file(str(directory / HEAD_FILE), device=str(map_location)))
        return model

    def forward(self, text_ids: Tensor, images_left: Tensor, images_right: Tensor,
                text_mask: Optional[Tensor] = None) -> Tensor:
        return nlvr2_logits(self.backbone, self.head, text_ids, images_left, images_right, text_mask)


def nlvr2_logits(backbone: nn.Module, head: NLVR2Head, text_ids: Tensor, images_left: Tensor,
                 images_right: Tensor, text_mask: Optional[Tensor] = None) -> Tensor:
    """[B, 2] logits: both (statement, image) pairs in ONE fusion pass, pooled vectors to the head."""
    if images_left.shape != images_right.shape:
        raise ValueError(f"images_left {tuple(images_left.shape)} and images_right "
                         f"{tuple(images_right.shape)} must have the same shape")
    b = text_ids.shape[0]
    ids = torch.cat([text_ids, text_ids])
    mask = None if text_mask is None else torch.cat([text_mask, text_mask])
    pooled = backbone.encode_pair(ids, torch.cat([images_left, images_right]), mask).pooled
    return head(pooled[:b], pooled[b:])


@torch.no_grad()
def evaluate_nlvr2_batches(model: NLVR2Model, batches: Iterable[dict], *, device=None,
                           statement_ids: Optional[Sequence] = None) -> Dict[str, float]:
    """Accuracy (and consistency given `statement_ids` in batch order) over batches with
    `images_left`, `images_right`, `text_ids`, `text_mask`, `labels` (the data layer's task
    loader)."""
    from .retrieval import _model_device, _model_dtype
    device = torch.device(device) if device is not None else _model_device(model)
    dtype = _model_dtype(model)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in batches:
            mask = batch.get("text_mask")
            logits.append(model(batch["text_ids"].to(device), batch["images_left"].to(device, dtype),
                                batch["images_right"].to(device, dtype),
                                None if mask is None else mask.to(device)).float().cpu())
            labels.append(_labels(batch["labels"]))
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("evaluate_nlvr2 needs at least one example")
    logits, labels = torch.cat(logits), torch.cat(labels)
    out = {"accuracy": nlvr2_accuracy(logits, labels), "num_examples": int(labels.numel())}
    if statement_ids is not None:
        out["consistency"] = nlvr2_consistency(logits, labels, statement_ids)
    return out


def evaluate_nlvr2(model: NLVR2Model, text_ids: Tensor, text_mask: Optional[Tensor],
                   images_left: Tensor, images_right: Tensor, labels, *,
                   statement_ids: Optional[Sequence] = None, batch_size: int = 64,
                   device=None, progress: bool = False) -> Dict[str, float]:
    """`evaluate_nlvr2_batches` on in-memory tensors (one row per example)."""
    from .retrieval import _progress
    labels = _labels(labels)
    n = text_ids.shape[0]
    if not (images_left.shape[0] == images_right.shape[0] == labels.shape[0] == n):
        raise ValueError("text_ids, images_left, images_right and labels need one row per example")
    starts = range(0, n, batch_size)
    batches = ({"text_ids": text_ids[s:s + batch_size], "images_left": images_left[s:s + batch_size],
                "images_right": images_right[s:s + batch_size], "labels": labels[s:s + batch_size],
                "text_mask": None if text_mask is None else text_mask[s:s + batch_size]}
               for s in _progress(starts, progress, "NLVR2", len(starts)))
    return evaluate_nlvr2_batches(model, batches, device=device, statement_ids=statement_ids)
