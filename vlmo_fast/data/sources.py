"""Datasets over real files (any reader of `formats.py`) and the dispatch from a path to one;
`pretrain_reader` chooses between them and the streaming shards of `streaming.py`.

Bad data at load time: an image that cannot be decoded when an item is read (missing,
truncated, not an image, over the pixel limit, a pixel format with no RGB reading: see
transforms.py) is replaced by another record (chosen deterministically from the key, so every
worker count and a resumed run pick the same one), the item carries `skipped` = how many it
replaced and `skipped_samples` = their one-line errors (file, reason, record); the loader adds
them up, logs them and stops past `max_bad_fraction` of the dataset with an error that lists
them. With skip_bad=False the DataError (naming file and record) is raised instead.
"""
from __future__ import annotations

import codecs
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import STAGES, item_rng, load_or_substitute
from .formats import (IMAGE_EXTENSIONS, DataError, Records, StringTable, group_by_image, read_image_folder,
                      read_karpathy, read_manifest, read_tar_shards, read_texts)
from .transforms import ImageTransform

PathLike = Union[str, Path]


class FilePairsDataset(Dataset):
    """Image-caption records -> pretraining items ("vl": image + caption + ids; "vision": image)."""

    def __init__(self, records: Records, stage: str = "vl", *, img_size: int = 224, seed: int = 0,
                 train: bool = True, flip: bool = False, scale: Tuple[float, float] = (0.5, 1.0),
                 skip_bad: bool = True, unique_images: Optional[bool] = None,
                 max_image_pixels: Optional[int] = None):
        if stage not in ("vl", "vision"):
            raise ValueError(f"FilePairsDataset serves stages 'vl' and 'vision', got {stage!r}")
        self.records, self.stage, self.seed, self.skip_bad = records, stage, int(seed), bool(skip_bad)
        self.transform = ImageTransform(img_size, train, flip=flip, scale=scale, max_pixels=max_image_pixels)
        # the image-only stream visits each image once per epoch, not once per caption
        if unique_images is None:
            unique_images = stage == "vision"
        if unique_images:
            # the first row of each image, in file order
            _, first = np.unique(records.image_ids, return_index=True)
            self.rows = np.sort(first).astype(np.int64)
        else:
            self.rows = np.arange(len(records), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, row: int, key: int) -> dict:
        rec = self.records.pairs[row]
        rng = item_rng(self.seed, key, 2)
        array, caption = self.transform.load(rec.image, rec.origin, rng, rec.caption)
        item = {"image": array}
        if self.stage == "vl":
            item.update(text=caption, image_id=int(self.records.image_ids[row]), caption_id=row)
        return item

    def __getitem__(self, key: int) -> dict:
        return load_or_substitute(lambda index: self._load(int(self.rows[index]), int(key)), int(key),
                                  len(self.rows), self.seed, self.skip_bad, self.records.source)


class TextDataset(Dataset):
    """Documents of a text corpus (stage "text")."""

    def __init__(self, texts: Sequence[str], source: str = ""):
        if not texts:
            raise DataError(f"{source or 'text corpus'}: empty corpus")
        for i, t in enumerate(texts):
            if not str(t).strip():
                raise DataError(f"{source or 'text corpus'} document {i}: empty text")
        self.texts = StringTable(texts)   # one numpy buffer: shared by workers, not copied

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, key: int) -> dict:
        return {"text": self.texts[int(key) % len(self.texts)], "key": int(key)}


def detect_format(path: PathLike) -> str:
    """"manifest", "karpathy", "tar", "image_folder" or "text" for a path; "stream" for a
    `pipe:` command or a URL (s3://, gs://, https://, file://: shards only streaming.py reads)."""
    spec = str(path)
    from .streaming import is_stream_url
    if is_stream_url(spec):
        return "stream"
    if spec.endswith(".tar") or "{" in spec and ".tar" in spec:
        return "tar"
    p = Path(spec)
    if p.is_dir():
        if any(p.glob("*.tar")):
            return "tar"
        if any(q.suffix.lower() in IMAGE_EXTENSIONS for q in p.rglob("*")):
            return "image_folder"
        return "text"
    if not p.exists():
        raise FileNotFoundError(f"data source {spec} does not exist (expected 'embedded', a manifest "
                                f".jsonl/.csv/.tsv/.json, a Karpathy JSON, an image folder, .tar shards or a .txt corpus)")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".csv", ".tsv"):
        return "manifest"
    if suffix == ".json":
        # bytes: a non-UTF-8 file gets the reader's error (naming the line), a BOM is allowed
        with open(p, "rb") as f:
            head = f.read(4096)
        return "karpathy" if head.removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"{") else "manifest"
    if suffix == ".txt":
        return "text"
    raise DataError(f"{spec}: cannot tell the format from the suffix {suffix!r} (expected .jsonl, .csv, .tsv, "
                    f".json, .tar, .txt or a folder)")


def open_records(source: PathLike, *, split: str = "train", fmt: Optional[str] = None,
                 image_key: str = "image", caption_key: str = "caption", id_key: Optional[str] = "image_id",
                 image_root: Optional[PathLike] = None, require_caption: bool = True,
                 check_files: bool = False) -> Records:
    """Image-caption records from any supported image-text source."""
    fmt = fmt or detect_format(source)
    if fmt == "manifest":
        return read_manifest(source, image_key=image_key, caption_key=caption_key, id_key=id_key,
                             image_root=image_root, require_caption=require_caption, check_files=check_files)
    if fmt == "karpathy":
        return read_karpathy(source, split, image_root=image_root)
    if fmt == "tar":
        return read_tar_shards(source, caption_key=caption_key, require_caption=require_caption)
    if fmt == "image_folder":
        return read_image_folder(source, require_caption=require_caption)
    if fmt == "stream":
        raise DataError(f"{source}: streamed shards serve pretraining only (build_pretrain_loader); an evaluation "
                        f"or fine-tuning set needs random access: copy its shards locally, or use a manifest")
    raise DataError(f"{source}: a {fmt!r} source has no images")


def pretrain_reader(source: PathLike, stream: Optional[bool] = None) -> str:
    """Which reader build_pretrain_loader uses for `source`: "stream" (streaming.py) or the
    format of an indexed source (detect_format). stream=None chooses: `pipe:` commands and
    URLs stream; local .tar shards stream when there are more than
    streaming.INDEXED_MAX_SHARDS of them (the indexed reader's up-front scan grows with the
    dataset, and it gives random access: a global shuffle, equal batches per rank), else they
    are indexed. stream=True / False forces it (True only for .tar shards, False not for URLs)."""
    from .streaming import INDEXED_MAX_SHARDS, expand_shard_urls, is_stream_url
    if stream is not None and not isinstance(stream, bool):
        raise TypeError(f"stream must be True, False or None (choose), got {stream!r}")
    if is_stream_url(source):
        if stream is False:
            raise ValueError(f"{source}: pipe: commands and URLs can only be streamed (stream=False reads local "
                             f"files only)")
        return "stream"
    fmt = detect_format(source)
    if fmt != "tar":
        if stream:
            raise ValueError(f"{source}: stream=True needs WebDataset .tar shards, but this is a {fmt!r} source")
        return fmt
    if stream is None:
        try:
            n = len(expand_shard_urls(source))
        except ImportError:      # no webdataset: the indexed reader, as before
            return "tar"
        return "stream" if n > INDEXED_MAX_SHARDS else "tar"
    return "stream" if stream else "tar"


def check_data_source(source: PathLike) -> None:
    """A cheap check of a --data value before a job starts (no shard is read): an existing
    file or folder, a brace / glob pattern of .tar shards whose first shard exists, or a
    `pipe:` command / URL whose protocol can be read. FileNotFoundError / ImportError /
    ValueError say what is wrong."""
    from .streaming import check_shard_urls, expand_shard_urls, is_stream_url
    spec = str(source)
    if is_stream_url(spec) or (("{" in spec or any(ch in spec for ch in "*?[")) and ".tar" in spec):
        check_shard_urls(expand_shard_urls(spec), spec)
        return
    if not Path(spec).exists():
        raise FileNotFoundError(f"{spec}: no such file or folder (use 'embedded' for the built-in data, or a .tar "
                                f"pattern / pipe: command / URL for WebDataset shards)")


def _limit(records: Records, num_samples: Optional[int]) -> Records:
    if num_samples is None or num_samples >= len(records):
        return records
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return Records(records.pairs[:num_samples], records.source)


def open_pretrain_dataset(source: PathLike, stage: str, *, split: str = "train", img_size: int = 224,
                          seed: int = 0, num_samples: Optional[int] = None, flip: bool = False,
                          scale: Tuple[float, float] = (0.5, 1.0), skip_bad: bool = True,
                          text_mode: str = "auto", max_image_pixels: Optional[int] = None,
                          **reader_options) -> Dataset:
    """The Dataset behind build_pretrain_loader(path, ...). num_samples: use the first n records;
    max_image_pixels: larger images are skipped as unreadable (default: transforms.max_image_pixels())."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    fmt = reader_options.pop("fmt", None) or detect_format(source)
    if fmt == "stream":
        raise DataError(f"{source}: streamed shards have no map-style Dataset; build_pretrain_loader streams them")
    if stage == "text":
        # a text corpus, or the captions of an image-text source (images are not opened)
        if fmt == "text":
            texts = read_texts(source, text_mode)
        else:
            texts = [p.caption for p in open_records(source, split=split, fmt=fmt, **reader_options).pairs]
        if num_samples is not None:
            texts = texts[:num_samples]
        return TextDataset(texts, str(source))
    if stage == "vision" and fmt == "image_folder":
        reader_options.setdefault("require_caption", False)
    records = _limit(open_records(source, split=split, fmt=fmt, **reader_options), num_samples)
    return FilePairsDataset(records, stage, img_size=img_size, seed=seed, flip=flip, scale=scale, skip_bad=skip_bad,
                            max_image_pixels=max_image_pixels)


def open_retrieval_records(source: PathLike, *, split: str = "test", img_size: int = 224,
                           num_images: Optional[int] = None, max_image_pixels: Optional[int] = None,
                           **reader_options):
    """(images [Ni,3,S,S], captions, text_to_image, image_ids) decoded with the eval
    transform; an image that cannot be decoded raises DataError naming the file and record."""
    records = open_records(source, split=split, **reader_options)
    images, captions, text_to_image, keys, origins = group_by_image(records)
    if num_images is not None:
        keep = int(num_images)
        pairs = [(c, t) for c, t in zip(captions, text_to_image) if t < keep]
        captions, text_to_image = [c for c, _ in pairs], [t for _, t in pairs]
        images, keys, origins = images[:keep], keys[:keep], origins[:keep]
    transform = ImageTransform(img_size, train=False, max_pixels=max_image_pixels)
    arrays = np.empty((len(images), 3, img_size, img_size), dtype=np.float32)
    for i, (ref, origin) in enumerate(zip(images, origins)):
        arrays[i] = transform.load(ref, origin)[0]
    return torch.from_numpy(arrays), captions, text_to_image, keys
