"""Packed sequences: several sequences of different lengths (and modalities) in one row.

A pack is x [1, T, d] holding sequences back to back; `PackedSequences` says where each
one starts (`cu_seqlens`, the int32 layout flash-attn's varlen kernels take), which
sequence every token belongs to (`document_ids`, what a FlexAttention mask compares) and,
for the relative position bias, each token's modality and position inside its own modality
segment (`is_text`, `positions`). Every token attends only to tokens of its own sequence,
so a pack of image-only, text-only and image-text sequences gives the same per-token
results as running each sequence alone, without computing anything for padding.

The metadata is built once per forward and shared by every layer; backends keep what they
derive from it (a block mask, a dense cross-sequence mask) in `cache`, so it is computed
once, not once per layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def cu_seqlens_from_counts(counts: Tensor) -> Tensor:
    """int32 [N + 1] cumulative sequence starts, then the total (flash-attn's varlen layout),
    from per-sequence token counts [N]."""
    return F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))


@dataclass(eq=False)
class PackedSequences:
    lengths: Tuple[int, ...]          # tokens of each sequence (host ints: no sync to read)
    cu_seqlens: Tensor                # int32 [N + 1]: start of each sequence, then the total
    document_ids: Tensor              # long [T]: the sequence each token belongs to
    is_text: Optional[Tensor] = None  # bool [T]: language token (True) or image token
    positions: Optional[Tensor] = None  # long [T]: position inside the token's modality segment
    cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device=None, is_text: Optional[Tensor] = None,
                     positions: Optional[Tensor] = None) -> "PackedSequences":
        lengths = tuple(int(n) for n in lengths)
        if not lengths:
            raise ValueError("lengths must name at least one sequence")
        if any(n <= 0 for n in lengths):
            raise ValueError(f"every packed sequence needs at least one token, got lengths {lengths}")
        total = sum(lengths)
        device = torch.device(device) if device is not None else (
            is_text.device if is_text is not None else torch.device("cpu"))
        counts = torch.tensor(lengths, dtype=torch.long, device=device)
        cu = cu_seqlens_from_counts(counts)
        docs = torch.repeat_interleave(torch.arange(len(lengths), device=device), counts)
        for name, t in (("is_text", is_text), ("positions", positions)):
            if t is not None and (t.dim() != 1 or t.shape[0] != total):
                raise ValueError(f"{name} must be 1-D with one entry per packed token ({total} = "
                                 f"sum of lengths {lengths}), got shape {tuple(t.shape)}")
        if (is_text is None) != (positions is None):
            raise ValueError("give both is_text and positions (for the relative bias) or neither")
        return cls(lengths, cu, docs, is_text, positions)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths)

    @property
    def starts(self) -> Tensor:
        """Index of each sequence's first token (its CLS) in the pack, long [N]."""
        return self.cu_seqlens[:-1].long()

    def check(self, x: Tensor) -> None:
        """x must be the packed tensor [1, T, ...] these lengths describe."""
        if x.dim() < 2 or x.shape[0] != 1:
            raise ValueError("packed input must have batch size 1: x [1, total_tokens, dim] with the "
                             f"sequences back to back; got shape {tuple(x.shape)}")
        if x.shape[1] != self.total:
            raise ValueError(f"packed lengths {self.lengths} sum to {self.total} tokens but x has "
                             f"{x.shape[1]} tokens")
        if self.document_ids.device != x.device:
            raise ValueError(f"packing metadata is on {self.document_ids.device}, x on {x.device}")

    def split(self, x: Tensor) -> List[Tensor]:
        """Per-sequence views of a packed tensor [1, T, ...] or [T, ...]."""
        if x.dim() >= 2 and x.shape[0] == 1 and x.shape[1] == self.total:
            x = x[0]
        if x.shape[0] != self.total:
            raise ValueError(f"expected {self.total} packed tokens, got shape {tuple(x.shape)}")
        return list(torch.split(x, list(self.lengths), dim=0))

    def same_sequence(self) -> Tensor:
        """Dense [T, T] bool: True where query and key belong to the same sequence (cached).
        Only the materialising backends (reference, sdpa) need it."""
        if "same_sequence" not in self.cache:
            d = self.document_ids
            self.cache["same_sequence"] = d[:, None] == d[None, :]
        return self.cache["same_sequence"]


def pack(sequences: Sequence[Tensor], is_text: Optional[Sequence[Tensor]] = None,
         positions: Optional[Sequence[Tensor]] = None) -> Tuple[Tensor, PackedSequences]:
    """Concatenate sequences [L_i, d] into x [1, sum L_i, d] plus their packing metadata."""
    if not sequences:
        raise ValueError("pack needs at least one sequence")
    for i, s in enumerate(sequences):
        if s.dim() != 2 or s.shape[1] != sequences[0].shape[1]:
            raise ValueError(f"sequence {i} must be [length, dim] with dim {sequences[0].shape[1]}, "
                             f"got {tuple(s.shape)}")
    x = torch.cat(list(sequences), 0)[None]
    cat = (lambda ts: None if ts is None else torch.cat(list(ts), 0))
    packing = PackedSequences.from_lengths([s.shape[0] for s in sequences], x.device,
                                           cat(is_text), cat(positions))
    return x, packing
