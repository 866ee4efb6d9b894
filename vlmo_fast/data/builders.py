"""The two entry points the training and evaluation jobs call: `build_pretrain_loader` and
`build_retrieval_eval_set` (the contract in the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch

from .collate import PretrainCollator
from .datasets import STAGES, EmbeddedPretrainDataset
from .loader import Loader
from .tokenizer import WordPieceTokenizer
from .world import SPLITS, EmbeddedWorld, WorldConfig

Source = Union[str, Path]


def _is_embedded(source) -> bool:
    return isinstance(source, str) and source == "embedded"


def build_pretrain_loader(source: Source, tokenizer: WordPieceTokenizer, stage: str, batch_size: int = 32, *,
                          rank: int = 0, world: int = 1, seed: int = 0, img_size: int = 224,
                          patch_size: int = 16, max_text_len: int = 40, split: str = "train",
                          num_workers: int = 0, num_samples: Optional[int] = None,
                          mlm_probability: float = 0.15, mask_ratio: float = 0.4,
                          shuffle: bool = True, drop_last: bool = False, world_seed: Optional[int] = None,
                          world_config: Optional[WorldConfig] = None, pin_memory: Optional[bool] = None,
                          persistent_workers: bool = True, max_bad_fraction: float = 0.01,
                          min_mask_block: int = 16, **source_options) -> Loader:
    """A resumable, rank-sharded loader of pretraining batches for `stage`.

    source: "embedded" (the procedural world; `num_samples` scenes of `split` per epoch,
    scenes drawn from `world_seed`, default `seed`) or a path (see `sources.open_source`:
    manifests, Karpathy JSON, image folders, .tar shards, text corpora; `source_options`
    go to the reader, e.g. image_key="filepath", caption_key="title").
    `seed` fixes the sample order and masks; `world_seed` the world's content, so runs with
    different data orders can share one world.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if img_size % patch_size != 0:
        raise ValueError(f"img_size ({img_size}) must be divisible by patch_size ({patch_size})")
    if not isinstance(tokenizer, WordPieceTokenizer):
        raise TypeError(f"tokenizer must be a WordPieceTokenizer (build_tokenizer(...)), got {type(tokenizer).__name__}")
    if _is_embedded(source):
        if source_options:
            raise TypeError(f"unexpected options for the embedded world: {sorted(source_options)}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        w = EmbeddedWorld(seed if world_seed is None else world_seed, world_config)
        dataset = EmbeddedPretrainDataset(w, stage, split, num_samples, img_size)
        description = f"embedded world (seed {w.seed}) {split} stage {stage}"
    else:
        from .sources import open_pretrain_dataset
        dataset = open_pretrain_dataset(source, stage, split=split, img_size=img_size, seed=seed,
                                        num_samples=num_samples, **source_options)
        description = f"{source} stage {stage}"
    collate = PretrainCollator(stage, tokenizer, max_text_len=max_text_len, patch_grid=img_size // patch_size,
                               mlm_probability=mlm_probability, mask_ratio=mask_ratio, seed=seed,
                               min_mask_block=min_mask_block)
    return Loader(dataset, collate, batch_size, rank=rank, world=world, seed=seed, shuffle=shuffle,
                  drop_last=drop_last, num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=persistent_workers, max_bad_fraction=max_bad_fraction,
                  description=description)


@dataclass
class RetrievalEvalSet:
    """Images and captions of a retrieval benchmark, several captions per image.

    images float [Ni,3,H,W]; text_ids / text_mask long [Nt,L]; text_to_image long [Nt]
    (index into images of each caption's image); captions list[str] (Nt);
    image_ids list (Ni): the dataset's own identity of each image (scene index, file name).
    """
    images: torch.Tensor
    text_ids: torch.Tensor
    text_mask: torch.Tensor
    text_to_image: torch.Tensor
    captions: List[str]
    image_ids: list

    @property
    def image_to_texts(self) -> List[List[int]]:
        out: List[List[int]] = [[] for _ in range(len(self.images))]
        for t, i in enumerate(self.text_to_image.tolist()):
            out[i].append(t)
        return out

    def __len__(self) -> int:
        return len(self.images)


def build_retrieval_eval_set(source: Source, tokenizer: WordPieceTokenizer, split: str = "test", *,
                             img_size: int = 224, max_text_len: int = 40, num_images: Optional[int] = None,
                             seed: int = 0, world_config: Optional[WorldConfig] = None,
                             **source_options) -> RetrievalEvalSet:
    """Held-out retrieval set. "embedded": scenes 0..num_images-1 of `split` ("val", "test"
    i.i.d., "test_comp" compositional) with all their captions; a path: a Karpathy JSON
    (images of that split) or a manifest (rows grouped by image), decoded with the eval
    transform (resize + centre crop)."""
    if _is_embedded(source):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        w = EmbeddedWorld(seed, world_config)
        n = w.split_size(split) if num_images is None else int(num_images)
        if n < 1:
            raise ValueError(f"num_images must be >= 1, got {n}")
        from .render import render_scenes
        scenes = [w.scene(split, i) for i in range(n)]
        images = torch.from_numpy(render_scenes(scenes, img_size))
        captions, text_to_image = [], []
        for i, s in enumerate(scenes):
            caps = w.caption_texts(s)
            captions.extend(caps)
            text_to_image.extend([i] * len(caps))
        image_ids: list = list(range(n))
    else:
        from .sources import open_retrieval_records
        images, captions, text_to_image, image_ids = open_retrieval_records(
            source, split=split, img_size=img_size, num_images=num_images, **source_options)
    ids, mask = tokenizer.encode_batch(captions, max_text_len)
    return RetrievalEvalSet(images=images, text_ids=ids, text_mask=mask,
                            text_to_image=torch.tensor(text_to_image, dtype=torch.long),
                            captions=list(captions), image_ids=image_ids)
