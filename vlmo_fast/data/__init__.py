"""vlmo_fast.data: data for every stage (issue 12) — the embedded procedural image-text world,
real dataset formats, the WordPiece tokenizer, masking collators and rank-sharded resumable
loaders. No training code lives here.

Deviation from DATA_CONTRACT.md (one): `build_tokenizer("embedded", vocab_size=...)` builds its
WordPiece vocabulary with a deterministic frequency rule (specials, every character in both
word-initial and "##" forms, then whole words by count) instead of HF's WordPieceTrainer,
whose merges depend on hash-map order (two runs on one corpus gave different vocabularies).
Tokenising is still HF `tokenizers` WordPiece with BERT conventions. The embedded world has
only ~200 distinct tokens, so `tok.vocab_size` is ~209, below the requested 1000: size the
model's vocabulary from `tok.vocab_size`.

Contract (names fixed; everything below "Additions" is extra):

    tok = build_tokenizer("embedded" | path, vocab_size=1000, vocab_file=None)
    ids, mask = tok.encode_batch(texts, max_len=40); tok.save(dir); WordPieceTokenizer.load(dir)
    loader = build_pretrain_loader("embedded" | path, tok, stage="vision" | "text" | "vl",
                                   batch_size=32, rank=0, world=1, seed=0, img_size=..., ...)
    for batch in loader: ...; loader.set_epoch(e); loader.state_dict(); loader.load_state_dict(s)
    ev = build_retrieval_eval_set("embedded" | path, tok, split="test" | "test_comp" | "val", ...)

Layout: world.py (scenes, scene graphs, captions with checkable claims, documents, VQA and
NLVR2 items, splits) -> render.py (vectorised SDF rendering) -> datasets.py (embedded
pretraining items); formats.py (readers: manifests, Karpathy, folders, corpora, tar shards,
VQAv2, NLVR2) -> transforms.py (Pillow decoding, crops) -> sources.py (file datasets,
skip-and-count, which reader a source gets); streaming.py (WebDataset / img2dataset shards
streamed from paths, patterns, pipe: commands and fsspec URLs, with exact resume);
tokenizer.py; masking.py + collate.py (MLM, blockwise); loader.py (sharded, resumable, the
shared bad-sample limit); builders.py (the entry points); tasks.py (VQA / NLVR2 fine-tuning
data).

Additions to the contract:
- every batch also has `keys` long [B] (sampler keys = epoch * N + index) and `num_skipped`
  (long scalar: unreadable samples replaced in this batch); text stages also have
  `mlm_positions` long [M], flat indices into [B * L] of the MLM targets.
- `tok.encode_batch(..., return_word_ids=True)` returns a third tensor (word index per token).
- `build_pretrain_loader(..., shuffle, drop_last, world_seed, world_config, pin_memory,
  persistent_workers, max_bad_fraction, min_mask_block, flip, **reader options)`.
- after the last batch of an epoch the loader's position reads (epoch, len(loader));
  set_epoch(epoch + 1) or iterating again starts the next epoch; set_epoch(e) within epoch e
  is a no-op (a resumed run keeps its place). Rank 0's state_dict resumes every rank (indexed
  sources; a streaming loader's state is per rank).
- streaming shards (streaming.py; needs `webdataset`, in the `train` extra): a `pipe:`
  command, a URL (s3://, gs://, https://, file://) or a local pattern of more than 16 .tar
  shards given to build_pretrain_loader gives a `StreamingLoader` (the Loader interface
  without len(): startup reads no shard; state = epoch, per-worker shard position and offset;
  `stream=True / False` forces the reader). `sources.check_data_source(spec)`: a cheap check
  of a --data value (patterns and URLs included).
- `RetrievalEvalSet.image_ids` and `.image_to_texts`.
- `max_image_pixels=` (reader option of build_pretrain_loader / build_retrieval_eval_set,
  argument of build_task_dataset; default 8192 x 8192, or VLMO_FAST_MAX_IMAGE_PIXELS):
  larger images are unreadable samples (transforms.py). `loader.epoch_bad_samples`: the
  errors of the samples skipped this epoch (the first 20), listed by the too-many-bad stop.
- `build_zero_shot_eval_set("embedded" | class-folder path, split, attribute=...)`: images,
  labels, class_names, prompts for zero-shot classification.
- `python -m vlmo_fast.data.export OUT --split test --format jsonl|karpathy|folder|tar`
  (`vlmo_fast.data.export.export_world`; not imported by the package, so `-m` runs cleanly):
  the embedded world written in the real formats.
- `build_task_loader("vqa" | "nlvr2", "embedded" | path, tok, split, batch_size, ...)`
  (tasks.py, issue 14's data part): the same resumable, sharded Loader; vqa batches: images,
  text_ids, text_mask, vqa_targets [B, A] soft scores, answer_ids, question_ids
  (loader.answer_vocab lists the A answers); nlvr2 batches: images_left, images_right,
  text_ids, text_mask, labels.
"""
from .builders import (RetrievalEvalSet, ZeroShotEvalSet, build_pretrain_loader, build_retrieval_eval_set,
                       build_zero_shot_eval_set)
from .collate import PretrainCollator
from .datasets import EmbeddedPretrainDataset
from .formats import (DataError, ImageRef, PairRecord, Records, build_answer_vocab, normalize_answer, read_image_folder,
                      read_karpathy, read_manifest, read_nlvr2, read_tar_shards, read_texts, read_vqav2, vqa_score,
                      vqa_targets)
from .loader import Loader, ShardedBatchSampler
from .masking import blockwise_patch_mask, whole_word_mask
from .render import render_scene, render_scenes
from .sources import (FilePairsDataset, TextDataset, check_data_source, detect_format, open_pretrain_dataset,
                      open_records, pretrain_reader)
from .streaming import ShardStreams, StreamingLoader, expand_shard_urls, img2dataset_count
from .tasks import (EmbeddedNLVR2Dataset, EmbeddedVQADataset, NLVR2FileDataset, TaskCollator, VQAv2Dataset,
                    build_task_dataset, build_task_loader)
from .tokenizer import WordPieceTokenizer, build_tokenizer
from .transforms import ImageTransform, decode_image, swap_left_right
from .world import (COLOURS, SHAPES, SIZES, SPLITS, Caption, EmbeddedWorld, Scene, SceneObject, WorldConfig,
                    check_claims)

__all__ = [
    "WordPieceTokenizer", "build_tokenizer", "build_pretrain_loader", "build_retrieval_eval_set",
    "RetrievalEvalSet", "EmbeddedWorld", "WorldConfig", "Scene", "SceneObject", "Caption", "check_claims",
    "SPLITS", "SHAPES", "COLOURS", "SIZES", "render_scene", "render_scenes", "Loader", "ShardedBatchSampler",
    "PretrainCollator", "EmbeddedPretrainDataset", "whole_word_mask", "blockwise_patch_mask",
    "DataError", "ImageRef", "PairRecord", "Records", "read_manifest", "read_karpathy", "read_image_folder",
    "read_texts", "read_tar_shards", "read_vqav2", "read_nlvr2", "build_answer_vocab", "normalize_answer",
    "vqa_score", "vqa_targets", "FilePairsDataset", "TextDataset", "detect_format", "open_pretrain_dataset",
    "open_records", "ImageTransform", "decode_image", "swap_left_right",
    "pretrain_reader", "check_data_source", "StreamingLoader", "ShardStreams", "expand_shard_urls",
    "img2dataset_count",
    "ZeroShotEvalSet", "build_zero_shot_eval_set", "build_task_dataset", "build_task_loader", "TaskCollator",
    "EmbeddedVQADataset", "EmbeddedNLVR2Dataset",
    "VQAv2Dataset", "NLVR2FileDataset",
]
