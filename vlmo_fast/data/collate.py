"""Batch collators for the three pretraining stages (run inside DataLoader workers).

The random masks of a batch come from a torch.Generator seeded with (seed, stage, first key
of the batch); keys are unique per epoch and rank, so masks are identical for any number of
workers and differ between batches, ranks and epochs.
"""
from __future__ import annotations

from typing import List

import numpy as np
import torch

from .masking import blockwise_patch_mask, whole_word_mask
from .tokenizer import WordPieceTokenizer

_STAGE_CODES = {"vision": 1, "text": 2, "vl": 3}


def batch_generator(seed: int, stage: str, first_key: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), _STAGE_CODES.get(stage, 0), int(first_key)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class PretrainCollator:
    """items (dicts from the datasets) -> a batch dict with the contract's keys.

    vision: images [B,3,H,W], patch_mask bool [B,P]
    text:   text_ids, text_mask, mlm_ids, mlm_labels [B,L], mlm_positions [M]
    vl:     the text keys + images, image_ids [B], caption_ids [B]
    All stages: keys [B] (sampler keys, for debugging and resume checks) and
    num_skipped [] (corrupt samples replaced while building this batch), plus
    skipped_samples (list[str], the replaced samples' errors), which `Loader` takes out of
    the batch to name the files when too many are bad.
    """

    def __init__(self, stage: str, tokenizer: WordPieceTokenizer, *, max_text_len: int = 40,
                 patch_grid: int = 14, mlm_probability: float = 0.15, mask_ratio: float = 0.4,
                 seed: int = 0, min_mask_block: int = 16):
        if stage not in _STAGE_CODES:
            raise ValueError(f"stage must be one of {tuple(_STAGE_CODES)}, got {stage!r}")
        self.stage, self.tokenizer = stage, tokenizer
        self.max_text_len, self.patch_grid = int(max_text_len), int(patch_grid)
        self.mlm_probability, self.mask_ratio = float(mlm_probability), float(mask_ratio)
        self.seed, self.min_mask_block = int(seed), int(min_mask_block)

    def __call__(self, items: List[dict]) -> dict:
        if not items:
            raise ValueError("cannot collate an empty batch")
        gen = batch_generator(self.seed, self.stage, items[0]["key"])
        batch = {"keys": torch.tensor([it["key"] for it in items], dtype=torch.long),
                 "num_skipped": torch.tensor(sum(it.get("skipped", 0) for it in items), dtype=torch.long),
                 "skipped_samples": [s for it in items for s in it.get("skipped_samples", ())]}
        if self.stage in ("vision", "vl"):
            batch["images"] = torch.from_numpy(np.stack([it["image"] for it in items]))
        if self.stage == "vision":
            batch["patch_mask"] = blockwise_patch_mask(len(items), self.patch_grid, mask_ratio=self.mask_ratio,
                                                       min_block=self.min_mask_block, generator=gen)
            return batch
        tok = self.tokenizer
        ids, mask, word_ids = tok.encode_batch([it["text"] for it in items], self.max_text_len,
                                               return_word_ids=True)
        batch.update(text_ids=ids, text_mask=mask)
        batch.update(whole_word_mask(ids, word_ids, vocab_size=tok.vocab_size, mask_id=tok.mask_id,
                                     special_ids=tok.special_ids, probability=self.mlm_probability,
                                     generator=gen))
        if self.stage == "vl":
            batch["image_ids"] = torch.tensor([it["image_id"] for it in items], dtype=torch.long)
            batch["caption_ids"] = torch.tensor([it["caption_id"] for it in items], dtype=torch.long)
        return batch
