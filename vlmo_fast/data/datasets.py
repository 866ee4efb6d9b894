"""Map-style torch Datasets over the embedded world (and, in `sources.py`, over real files).

Keys, not indices: the loaders' samplers pass `key = epoch * len(dataset) + index`, so every
random choice an item makes (which caption of an image, crop and flip, ...) is a pure function
of (seed, epoch, index), the same in every worker and on every machine, and still differs
between epochs. `len(dataset)` is the epoch size; `key % len(dataset)` is the item.

Item format of the pretraining datasets (dicts; the collators in `collate.py` batch them):
- "image": float32 numpy [3, H, W] in [-1, 1] (vision and vl)
- "text": str (text and vl)
- "image_id", "caption_id": int (vl; two captions of one image share image_id)
- "key": int (the sampler key; seeds the batch's masking)
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np
from torch.utils.data import Dataset

from .formats import DataError
from .transforms import swap_left_right
from .world import EmbeddedWorld

STAGES = ("vision", "text", "vl")


def item_rng(seed: int, key: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(key), int(stream)])


class EmbeddedPretrainDataset(Dataset):
    """Scenes `0 .. num_samples-1` of one split of the embedded world, as pretraining items.

    stage "vision": the image-only stream; "text": one document per scene (multi-sentence,
    the text-only corpus); "vl": the image with one of its captions, drawn per epoch.
    flip: mirror half of the images (per key), swapping "left" and "right" in the caption.
    """

    def __init__(self, world: EmbeddedWorld, stage: str, split: str = "train",
                 num_samples: Optional[int] = None, img_size: int = 224, flip: bool = False):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.world, self.stage, self.split = world, stage, split
        self.num_samples = int(num_samples if num_samples is not None else world.split_size(split))
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        self.img_size = int(img_size)
        self.flip = bool(flip)
        self.captions_per_image = world.config.captions_per_image

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, key: int) -> dict:
        epoch, index = divmod(int(key), self.num_samples)
        scene = self.world.scene(self.split, index)
        item = {"key": int(key)}
        # optional mirror image (drawn per key): the caption's left and right swap with it
        mirrored = self.flip and self.stage != "text" and item_rng(self.world.seed, key, 2).random() < 0.5
        if self.stage in ("vision", "vl"):
            image = self.world.render(scene, self.img_size)
            item["image"] = np.ascontiguousarray(image[:, :, ::-1]) if mirrored else image
        if self.stage == "text":
            item["text"] = self.world.document(scene)
        elif self.stage == "vl":
            j = int(item_rng(self.world.seed, key, 1).integers(self.captions_per_image))
            text = self.world.caption(scene, j).text
            item["text"] = swap_left_right(text) if mirrored else text
            item["image_id"] = index
            item["caption_id"] = index * self.captions_per_image + j
        return item


_log = logging.getLogger("vlmo_fast.data")
MAX_SUBSTITUTES = 16   # unreadable samples in a row before a file dataset calls the data broken


def load_or_substitute(load: Callable[[int], dict], key: int, n: int, seed: int, skip_bad: bool,
                       source: str = "") -> dict:
    """`load(index)` of item `key % n`; an unreadable one (DataError) is skipped, logged and
    replaced by a deterministic pseudo-random other index derived from the key (so workers
    and resumed runs substitute alike). The item records the skips (`skipped`,
    `skipped_samples`) for the loader's bad-sample limit. skip_bad=False re-raises."""
    index, skipped = key % n, []
    for attempt in range(MAX_SUBSTITUTES + 1):
        try:
            item = load(index)
            item.update(key=key, skipped=len(skipped), skipped_samples=skipped)
            return item
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            _log.warning("skipping unreadable sample: %s", e)
            index = int(item_rng(seed, key, 100 + attempt).integers(n))
    where = f"{source}: " if source else ""
    raise DataError(f"{where}{len(skipped)} unreadable images in a row for item {key % n} and its substitutes "
                    f"(last: {skipped[-1]}); the data looks broken")
