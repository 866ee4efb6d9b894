"""The two entry points the training and evaluation jobs call: `build_pretrain_loader` and
`build_retrieval_eval_set` (the contract in the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

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
                          min_mask_block: int = 16, flip: bool = False, **source_options):
    """A resumable, rank-sharded loader of pretraining batches for `stage`.

    source: "embedded" (the procedural world; `num_samples` scenes of `split` per epoch,
    scenes drawn from `world_seed`, default `seed`) or a path (see `sources.open_records`:
    manifests, Karpathy JSON, image folders, .tar shards, text corpora; `source_options`
    go to the reader, e.g. image_key="filepath", caption_key="title"). WebDataset shards given
    as a `pipe:` command, a URL (s3://, gs://, https://, file://) or a local pattern of more
    than streaming.INDEXED_MAX_SHARDS shards are streamed (streaming.py: a StreamingLoader,
    same interface, no len(); options caption_key, require_caption, skip_bad,
    max_image_pixels, scale, shuffle_block); stream=True / False forces the choice
    (sources.pretrain_reader).
    `seed` fixes the sample order and masks; `world_seed` the world's content, so runs with
    different data orders can share one world. flip: random horizontal flips with "left" and
    "right" swapped in the caption (off by default, as captions name sides).
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
        dataset = EmbeddedPretrainDataset(w, stage, split, num_samples, img_size, flip=flip)
        description = f"embedded world (seed {w.seed}) {split} stage {stage}"
    collate = PretrainCollator(stage, tokenizer, max_text_len=max_text_len, patch_grid=img_size // patch_size,
                               mlm_probability=mlm_probability, mask_ratio=mask_ratio, seed=seed,
                               min_mask_block=min_mask_block)
    if not _is_embedded(source):
        from .sources import open_pretrain_dataset, pretrain_reader
        if pretrain_reader(source, source_options.pop("stream", None)) == "stream":
            from .streaming import build_streaming_loader
            return build_streaming_loader(source, stage, collate, batch_size, rank=rank, world=world, seed=seed,
                                          img_size=img_size, shuffle=shuffle, drop_last=drop_last,
                                          num_workers=num_workers, pin_memory=pin_memory,
                                          max_bad_fraction=max_bad_fraction, flip=flip, num_samples=num_samples,
                                          **source_options)
        dataset = open_pretrain_dataset(source, stage, split=split, img_size=img_size, seed=seed,
                                        num_samples=num_samples, flip=flip, **source_options)
        description = f"{source} stage {stage}"
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


@dataclass
class ZeroShotEvalSet:
    """Images with class labels and class names, for zero-shot classification from text
    prompts: images float [N,3,H,W], labels long [N] (index into class_names), class_names
    list[str], prompts list[str] (templates with "{}" for the class name)."""
    images: torch.Tensor
    labels: torch.Tensor
    class_names: List[str]
    prompts: List[str]

    def prompt_texts(self) -> List[List[str]]:
        """For each class, its prompts filled in (average their text embeddings per class)."""
        return [[p.format(c) for p in self.prompts] for c in self.class_names]


ZERO_SHOT_PROMPTS = ("a {}", "a picture of a {}", "there is a {}")


def build_zero_shot_eval_set(source: Source = "embedded", split: str = "test", *, img_size: int = 224,
                             num_images: int = 200, attribute: str = "colour_shape", seed: int = 0,
                             world_config: Optional[WorldConfig] = None,
                             prompts: Sequence[str] = ZERO_SHOT_PROMPTS) -> ZeroShotEvalSet:
    """"embedded": the first `num_images` single-object scenes of `split`, labelled by
    `attribute` ("shape", "colour" or "colour_shape": e.g. "red circle"; on "test_comp" every
    image is a colour+shape pair never seen in training). A path: a folder with one subfolder
    per class (ImageNet layout, class name = folder name with "_" as space), eval transform."""
    if _is_embedded(source):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if attribute not in ("shape", "colour", "colour_shape"):
            raise ValueError(f"attribute must be 'shape', 'colour' or 'colour_shape', got {attribute!r}")
        from .render import render_scenes
        from .world import COLOURS, SHAPES
        w = EmbeddedWorld(seed, world_config)
        scenes, i = [], 0
        while len(scenes) < num_images:
            s = w.scene(split, i)
            if len(s.objects) == 1:
                scenes.append(s)
            i += 1
            if i > 100 * num_images + 1000:
                raise RuntimeError(f"split {split!r} has too few single-object scenes")
        if attribute == "shape":
            names = list(SHAPES)
        elif attribute == "colour":
            names = list(COLOURS)
        else:
            names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
        def label(o):
            return {"shape": o.shape, "colour": o.colour}.get(attribute, f"{o.colour} {o.shape}")
        labels = [names.index(label(s.objects[0])) for s in scenes]
        images = torch.from_numpy(render_scenes(scenes, img_size))
        return ZeroShotEvalSet(images, torch.tensor(labels, dtype=torch.long), names, list(prompts))
    from .formats import list_images
    from .transforms import ImageTransform
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"zero-shot source {root} is not a folder (expected one subfolder per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class subfolders")
    transform = ImageTransform(img_size, train=False)
    arrays, labels = [], []
    from .formats import ImageRef
    for k, c in enumerate(classes):
        for path in list_images(root / c)[:num_images]:
            arrays.append(transform.load(ImageRef(str(path)), str(path))[0])
            labels.append(k)
    if not arrays:
        raise ValueError(f"{root}: no images in the class subfolders")
    return ZeroShotEvalSet(torch.from_numpy(np.stack(arrays)), torch.tensor(labels, dtype=torch.long),
                           [c.replace("_", " ") for c in classes], list(prompts))
