"""Task heads on top of the VLMo encoder (losses live in vlmo_fast.losses)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Pooler(nn.Module):
    """tanh(dense(x[:, 0])): the pooled [CLS] used by ITM and classification."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class ContrastiveHead(nn.Module):
    """ITC projections (Linear without bias) and the learnable log logit scale.

    logit_scale starts at log(1/0.07) and is never clamped (as in VLMo). It is stored with
    shape [1], not 0-d: DeepSpeed's parameter broadcast and ZeRO partitioning cannot handle
    0-d parameters (the reference's checkpoints hold a 0-d tensor; the converters reshape).
    """

    def __init__(self, dim: int, embed_dim: int | None = None):
        super().__init__()
        embed_dim = embed_dim or dim
        self.image_proj = nn.Linear(dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.trunc_normal_(self.image_proj.weight, std=std)
        nn.init.trunc_normal_(self.text_proj.weight, std=std)
        nn.init.constant_(self.logit_scale, math.log(1 / 0.07))

    def image_features(self, cls_hidden: Tensor) -> Tensor:
        return F.normalize(self.image_proj(cls_hidden), dim=-1)

    def text_features(self, cls_hidden: Tensor) -> Tensor:
        return F.normalize(self.text_proj(cls_hidden), dim=-1)


class MLMHead(nn.Module):
    """BERT prediction head: dense -> GELU -> LayerNorm(1e-12) -> decoder (no bias) + bias."""

    def __init__(self, dim: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def transform(self, hidden: Tensor) -> Tensor:
        return self.norm(F.gelu(self.dense(hidden)))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden)) + self.bias


class ClassificationHead(nn.Module):
    """VQA-style classifier on pooled features: Linear(d, 2d) -> LN -> GELU -> Linear(2d, C)."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, 2 * in_dim)
        self.norm = nn.LayerNorm(2 * in_dim)
        self.fc2 = nn.Linear(2 * in_dim, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.norm(self.fc1(pooled))))
