"""Fine-tuning task data (issue 14's data part): VQA and NLVR2 as torch Datasets, from the
embedded world (default) or from VQAv2 / NLVR2 files, with collators and loaders that share
the pretraining loaders' sharding and resume.

Item formats (dicts):
- VQA: "image" float32 [3,H,W]; "question" str; "answer_ids" list[int] and "answer_scores"
  list[float] (soft scores, VQAv2: min(1, 0.3 * annotators) with 3 -> 0.9; the embedded
  world: its one answer with score 1.0); "question_id" int; "key" int.
- NLVR2: "image_left", "image_right" float32 [3,H,W]; "statement" str; "label" int (1 true);
  "key" int.

Batches (`build_task_loader`):
- vqa: images [B,3,H,W], text_ids / text_mask long [B,L], vqa_targets float [B, A] (soft
  scores over the answer vocabulary of A answers), answer_ids long [B] (best answer, -1 when
  none of the annotators' answers is in the vocabulary), question_ids long [B].
- nlvr2: images_left, images_right [B,3,H,W], text_ids / text_mask [B,L], labels long [B].
Every batch also has keys [B] and num_skipped [] as the pretraining batches (and, from the
collator, skipped_samples, which the Loader takes out: see collate.PretrainCollator).
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import item_rng, load_or_substitute
from .formats import (DataError, NLVR2Record, PackedList, VQARecord, build_answer_vocab, read_nlvr2, read_vqav2,
                      vqa_targets)
from .loader import Loader
from .tokenizer import WordPieceTokenizer
from .transforms import ImageTransform
from .world import SPLITS, EmbeddedWorld, WorldConfig

TASKS = ("vqa", "nlvr2")


class EmbeddedVQADataset(Dataset):
    """Scene i of `split` with one question about it (type drawn uniformly; see
    EmbeddedWorld.vqa_item); answers from the world's closed answer set."""

    def __init__(self, world: EmbeddedWorld, split: str = "train", num_samples: Optional[int] = None,
                 img_size: int = 224):
        self.world, self.split, self.img_size = world, split, int(img_size)
        self.num_samples = int(num_samples if num_samples is not None else world.split_size(split))
        self.answer_vocab: List[str] = list(world.answer_vocab)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, key: int) -> dict:
        index = int(key) % self.num_samples
        item = self.world.vqa_item(self.split, index)
        return {"image": self.world.render(item["scene"], self.img_size), "question": item["question"],
                "answer_ids": [item["answer_id"]], "answer_scores": [1.0], "question_id": index,
                "question_type": item["question_type"], "key": int(key), "skipped": 0}


class EmbeddedNLVR2Dataset(Dataset):
    """Pairs of scenes with a true/false statement (balanced labels)."""

    def __init__(self, world: EmbeddedWorld, split: str = "train", num_samples: Optional[int] = None,
                 img_size: int = 224):
        self.world, self.split, self.img_size = world, split, int(img_size)
        self.num_samples = int(num_samples if num_samples is not None else world.split_size(split))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, key: int) -> dict:
        item = self.world.nlvr2_item(self.split, int(key) % self.num_samples)
        left, right = item["scenes"]
        return {"image_left": self.world.render(left, self.img_size),
                "image_right": self.world.render(right, self.img_size),
                "statement": item["statement"], "label": item["label"], "key": int(key), "skipped": 0}


class _FileTaskDataset(Dataset, abc.ABC):
    """Shared skip-and-substitute logic for file-backed task datasets; subclasses say how
    one record becomes an item (`_load`)."""

    records: list

    def __init__(self, img_size: int, train: bool, seed: int, skip_bad: bool, max_image_pixels: Optional[int] = None):
        self.transform = ImageTransform(img_size, train, max_pixels=max_image_pixels)
        self.train, self.seed, self.skip_bad = bool(train), int(seed), bool(skip_bad)

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, ref, origin: str, key: int, stream: int) -> np.ndarray:
        rng = item_rng(self.seed, key, stream) if self.train else None
        return self.transform.load(ref, origin, rng)[0]

    @abc.abstractmethod
    def _load(self, index: int, key: int) -> dict:
        """Item of record `index`; `key` seeds its random transforms."""

    def __getitem__(self, key: int) -> dict:
        return load_or_substitute(lambda index: self._load(index, int(key)), int(key), len(self.records),
                                  self.seed, self.skip_bad)


class VQAv2Dataset(_FileTaskDataset):
    """VQAv2 records (read_vqav2) with an answer vocabulary (default: answers given >= 9 times)."""

    def __init__(self, records: Sequence[VQARecord], answer_vocab: Optional[Sequence[str]] = None, *,
                 img_size: int = 224, train: bool = True, seed: int = 0, skip_bad: bool = True,
                 min_answer_count: int = 9, max_image_pixels: Optional[int] = None):
        super().__init__(img_size, train, seed, skip_bad, max_image_pixels)
        if not records:
            raise DataError("VQAv2: no questions")
        self.answer_vocab = list(answer_vocab) if answer_vocab is not None else \
            build_answer_vocab(records, min_answer_count)
        self.records = PackedList(records)   # one numpy buffer: shared by workers, not copied
        if not self.answer_vocab:
            raise DataError(f"VQAv2: empty answer vocabulary (no answer given >= {min_answer_count} times); "
                            f"pass answer_vocab= or a lower min_answer_count")
        self.answer_to_id = {a: i for i, a in enumerate(self.answer_vocab)}

    def _load(self, index: int, key: int) -> dict:
        r = self.records[index]
        ids, scores = vqa_targets(r.answer_counts, self.answer_to_id)
        return {"image": self._image(r.image, f"question_id {r.question_id}", key, 3), "question": r.question,
                "answer_ids": ids, "answer_scores": scores, "question_id": r.question_id}


class NLVR2FileDataset(_FileTaskDataset):
    def __init__(self, records: Sequence[NLVR2Record], *, img_size: int = 224, train: bool = True,
                 seed: int = 0, skip_bad: bool = True, max_image_pixels: Optional[int] = None):
        super().__init__(img_size, train, seed, skip_bad, max_image_pixels)
        if not records:
            raise DataError("NLVR2: no rows")
        self.records = PackedList(records)

    def _load(self, index: int, key: int) -> dict:
        r = self.records[index]
        return {"image_left": self._image(r.left, r.identifier, key, 3),
                "image_right": self._image(r.right, r.identifier, key, 4),
                "statement": r.sentence, "label": r.label}


class TaskCollator:
    """Items -> the task batches documented in the module docstring."""

    def __init__(self, task: str, tokenizer: WordPieceTokenizer, max_text_len: int = 40,
                 num_answers: Optional[int] = None):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if task == "vqa" and not num_answers:
            raise ValueError("the vqa collator needs num_answers (the answer vocabulary size)")
        self.task, self.tokenizer, self.max_text_len, self.num_answers = task, tokenizer, int(max_text_len), num_answers

    def __call__(self, items: List[dict]) -> dict:
        if not items:
            raise ValueError("cannot collate an empty batch")
        batch = {"keys": torch.tensor([it["key"] for it in items], dtype=torch.long),
                 "num_skipped": torch.tensor(sum(it.get("skipped", 0) for it in items), dtype=torch.long),
                 "skipped_samples": [s for it in items for s in it.get("skipped_samples", ())]}
        if self.task == "vqa":
            batch["images"] = torch.from_numpy(np.stack([it["image"] for it in items]))
            ids, mask = self.tokenizer.encode_batch([it["question"] for it in items], self.max_text_len)
            targets = torch.zeros(len(items), self.num_answers)
            best = torch.full((len(items),), -1, dtype=torch.long)
            for row, it in enumerate(items):   # a handful of answers per question
                if it["answer_ids"]:
                    targets[row, it["answer_ids"]] = torch.tensor(it["answer_scores"], dtype=torch.float)
                    best[row] = it["answer_ids"][int(np.argmax(it["answer_scores"]))]
            batch.update(text_ids=ids, text_mask=mask, vqa_targets=targets, answer_ids=best,
                         question_ids=torch.tensor([it["question_id"] for it in items], dtype=torch.long))
        else:
            batch["images_left"] = torch.from_numpy(np.stack([it["image_left"] for it in items]))
            batch["images_right"] = torch.from_numpy(np.stack([it["image_right"] for it in items]))
            ids, mask = self.tokenizer.encode_batch([it["statement"] for it in items], self.max_text_len)
            batch.update(text_ids=ids, text_mask=mask,
                         labels=torch.tensor([it["label"] for it in items], dtype=torch.long))
        return batch


def build_task_dataset(task: str, source: Union[str, Path] = "embedded", split: str = "train", *,
                       img_size: int = 224, num_samples: Optional[int] = None, seed: int = 0,
                       world_config: Optional[WorldConfig] = None, train: Optional[bool] = None,
                       annotations: Optional[Union[str, Path]] = None, image_root: Optional[Union[str, Path]] = None,
                       answer_vocab: Optional[Sequence[str]] = None, min_answer_count: int = 9,
                       skip_bad: bool = True, max_image_pixels: Optional[int] = None) -> Dataset:
    """"embedded": the world's `split` ("train", "val", "test", "test_comp"); a path: VQAv2
    questions JSON (+ annotations=...) or an NLVR2 JSONL. train (default: split == "train")
    picks the random-crop transform for file images. Datasets of "vqa" have .answer_vocab.
    max_image_pixels: larger file images are unreadable (default: transforms.max_image_pixels())."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if isinstance(source, str) and source == "embedded":
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        world = EmbeddedWorld(seed, world_config)
        cls = EmbeddedVQADataset if task == "vqa" else EmbeddedNLVR2Dataset
        return cls(world, split, num_samples, img_size)
    train = (split == "train") if train is None else train
    if task == "vqa":
        records = read_vqav2(source, annotations, image_root=image_root)
        ds = VQAv2Dataset(records if num_samples is None else records[:num_samples], answer_vocab,
                          img_size=img_size, train=train, seed=seed, skip_bad=skip_bad,
                          min_answer_count=min_answer_count, max_image_pixels=max_image_pixels)
    else:
        records = read_nlvr2(source, image_root=image_root)
        ds = NLVR2FileDataset(records if num_samples is None else records[:num_samples], img_size=img_size,
                              train=train, seed=seed, skip_bad=skip_bad, max_image_pixels=max_image_pixels)
    return ds


def build_task_loader(task: str, source: Union[str, Path], tokenizer: WordPieceTokenizer, split: str = "train",
                      batch_size: int = 32, *, rank: int = 0, world: int = 1, seed: int = 0, img_size: int = 224,
                      max_text_len: int = 40, num_samples: Optional[int] = None, num_workers: int = 0,
                      shuffle: Optional[bool] = None, drop_last: bool = False, max_bad_fraction: float = 0.01,
                      **dataset_options) -> Loader:
    """A sharded, resumable loader of task batches (shuffled for split "train" by default)."""
    ds = build_task_dataset(task, source, split, img_size=img_size, num_samples=num_samples, seed=seed,
                            **dataset_options)
    collate = TaskCollator(task, tokenizer, max_text_len,
                           num_answers=len(ds.answer_vocab) if task == "vqa" else None)
    loader = Loader(ds, collate, batch_size, rank=rank, world=world, seed=seed,
                    shuffle=(split == "train") if shuffle is None else shuffle, drop_last=drop_last,
                    num_workers=num_workers, max_bad_fraction=max_bad_fraction,
                    description=f"{source} {task} {split}")
    if task == "vqa":
        loader.answer_vocab = ds.answer_vocab
    return loader
