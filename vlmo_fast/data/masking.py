"""Vectorised masking for pretraining batches (no per-token Python loops).

- `whole_word_mask`: BERT MLM on whole words: per text round(p * words) words (at least one),
  chosen uniformly; every token of a chosen word is a target; 80 % of chosen words become
  [MASK], 10 % random tokens, 10 % stay; [CLS]/[SEP]/[PAD] never. Labels are -100 elsewhere.
- `blockwise_patch_mask`: BEiT's blockwise masking (~mask_ratio of patches, rectangular
  blocks of >= 16 patches with aspect ratio in [0.3, 1/0.3]), drawn for the whole batch at
  once: each round proposes one block per image and keeps it where it adds between 1 and the
  still-missing number of patches.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch


def whole_word_mask(ids: torch.Tensor, word_ids: torch.Tensor, *, vocab_size: int, mask_id: int,
                    special_ids: Sequence[int], probability: float = 0.15,
                    generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """ids, word_ids: long [B, L] (word_ids = -1 on specials and padding).

    Returns mlm_ids [B, L] (masked input), mlm_labels [B, L] (-100 where not a target) and
    mlm_positions long [M]: flat indices into [B * L] of the targets (row-major), so a head can
    compute logits only there: hidden.flatten(0, 1)[mlm_positions].
    """
    if ids.shape != word_ids.shape or ids.dim() != 2:
        raise ValueError(f"ids and word_ids must both be [B, L], got {tuple(ids.shape)} and {tuple(word_ids.shape)}")
    if not 0.0 < probability < 1.0:
        raise ValueError(f"mlm probability must be in (0, 1), got {probability}")
    B, L = ids.shape
    special = torch.isin(ids, torch.tensor(list(special_ids), dtype=ids.dtype))
    word_ids = torch.where(special, torch.full_like(word_ids, -1), word_ids)
    valid = word_ids >= 0
    # renumber words per row densely: 0..n_words-1 (word ids may skip after truncation: no)
    num_words = (word_ids.max(dim=1).values + 1).clamp(min=0)                     # [B]
    W = max(int(num_words.max().item()) if B else 0, 1)
    # one uniform key per (row, word); words beyond a row's count get +inf
    keys = torch.rand(B, W, generator=generator)
    keys = torch.where(torch.arange(W)[None, :] < num_words[:, None], keys, torch.full_like(keys, float("inf")))
    rank = keys.argsort(dim=1).argsort(dim=1)                                        # [B, W]
    n_pick = torch.where(num_words > 0, (num_words.float() * probability).round().clamp(min=1),
                         torch.zeros_like(num_words, dtype=torch.float)).long()
    chosen_word = rank < n_pick[:, None]                                             # [B, W]
    # 80/10/10 per chosen word
    action = torch.rand(B, W, generator=generator)
    safe_words = word_ids.clamp(min=0)
    chosen = valid & chosen_word.gather(1, safe_words)
    act = action.gather(1, safe_words)
    to_mask = chosen & (act < 0.8)
    to_random = chosen & (act >= 0.8) & (act < 0.9)
    # random replacements drawn among non-special tokens
    non_special = torch.ones(vocab_size, dtype=torch.bool)
    non_special[torch.tensor(list(special_ids))] = False
    pool = non_special.nonzero().flatten()
    random_tokens = pool[torch.randint(len(pool), (B, L), generator=generator)]
    mlm_ids = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    mlm_ids = torch.where(to_random, random_tokens, mlm_ids)
    mlm_labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return {"mlm_ids": mlm_ids, "mlm_labels": mlm_labels,
            "mlm_positions": chosen.flatten().nonzero().flatten()}


def blockwise_patch_mask(batch_size: int, grid: int, *, mask_ratio: float = 0.4,
                         min_block: int = 16, max_block: Optional[int] = None,
                         min_aspect: float = 0.3, max_aspect: Optional[float] = None,
                         generator: Union[torch.Generator, np.random.Generator, None] = None,
                         max_rounds: int = 64) -> torch.Tensor:
    """bool [B, grid * grid], True = masked; per image at most round(mask_ratio * P) patches
    (BEiT: blocks are only accepted while they fit the budget, so a few images end a little
    short of it), every masked patch inside a block of >= min_block patches.

    On tiny grids (P < min_block / mask_ratio) the minimum block shrinks to what fits, so a
    2 x 2 grid still gets blocks of 1-2 patches. `generator`: a torch.Generator (one number is
    drawn from it to seed the rest) or a numpy Generator. The rounds run in numpy: dozens of
    tiny array operations, where torch's per-call overhead would dominate.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if isinstance(generator, np.random.Generator):
        rng = generator
    else:
        rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
    P = grid * grid
    target = int(round(mask_ratio * P))
    mask = np.zeros((batch_size, grid, grid), dtype=bool)
    if target == 0 or batch_size == 0:
        return torch.from_numpy(mask.reshape(batch_size, P))
    min_block = max(1, min(min_block, target))
    max_block = target if max_block is None else max(min_block, min(max_block, target))
    max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
    rows = np.arange(grid).reshape(1, grid, 1)
    cols = np.arange(grid).reshape(1, 1, grid)
    count = np.zeros(batch_size, dtype=np.int64)
    for _ in range(max_rounds):
        missing = target - count
        active = missing > 0
        if not active.any():
            break
        # BEiT: area ~ U(min_block, remaining budget), aspect log-uniform
        hi = np.clip(np.minimum(missing, max_block), min_block, None)
        area = min_block + rng.random(batch_size) * (hi - min_block)
        aspect = np.exp(log_lo + rng.random(batch_size) * (log_hi - log_lo))
        h = np.clip(np.round(np.sqrt(area * aspect)).astype(np.int64), 1, grid)
        w = np.clip(np.round(np.sqrt(area / aspect)).astype(np.int64), 1, grid)
        # rounding can leave h * w below the minimum block: widen (then heighten) to reach it
        w = np.minimum(np.maximum(w, -(-min_block // h)), grid)
        h = np.minimum(np.maximum(h, -(-min_block // w)), grid)
        top = (rng.random(batch_size) * (grid - h + 1)).astype(np.int64)
        left = (rng.random(batch_size) * (grid - w + 1)).astype(np.int64)
        t, l = top.reshape(-1, 1, 1), left.reshape(-1, 1, 1)
        block = (rows >= t) & (rows < t + h.reshape(-1, 1, 1)) & (cols >= l) & (cols < l + w.reshape(-1, 1, 1))
        new = (block & ~mask).reshape(batch_size, P).sum(1)
        accept = active & (new > 0) & (new <= missing)
        mask |= block & accept.reshape(-1, 1, 1)
        count = count + np.where(accept, new, 0)
    return torch.from_numpy(mask.reshape(batch_size, P))
