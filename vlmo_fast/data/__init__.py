"""vlmo_fast.data: data for every stage (issue 12) — the embedded procedural image-text world,
real dataset formats, the WordPiece tokenizer, masking collators and rank-sharded resumable
loaders. No training code lives here.

Contract (docs: /work/wt/DATA_CONTRACT.md; additions only, nothing renamed):

    tok = build_tokenizer("embedded" | path, vocab_size=1000, vocab_file=None)
    ids, mask = tok.encode_batch(texts, max_len=40)
    loader = build_pretrain_loader("embedded" | path, tok, stage="vision" | "text" | "vl",
                                   batch_size=32, rank=0, world=1, seed=0, img_size=..., ...)
    for batch in loader: ...; loader.set_epoch(e); loader.state_dict(); loader.load_state_dict(s)
    ev = build_retrieval_eval_set("embedded" | path, tok, split="test" | "test_comp" | "val", ...)

Additions to the contract:
- every batch also has `keys` long [B] (sampler keys = epoch * N + index) and `num_skipped`
  (long scalar: unreadable samples replaced in this batch); text stages also have
  `mlm_positions` long [M], flat indices into [B * L] of the MLM targets.
- `tok.encode_batch(..., return_word_ids=True)` returns a third tensor (word index per token).
- `build_pretrain_loader(..., shuffle, drop_last, world_seed, world_config, pin_memory,
  persistent_workers, max_bad_fraction, min_mask_block, **reader options)`.
- `RetrievalEvalSet.image_ids` and `.image_to_texts`.
"""
from .builders import RetrievalEvalSet, build_pretrain_loader, build_retrieval_eval_set
from .collate import PretrainCollator
from .datasets import EmbeddedPretrainDataset
from .loader import Loader, ShardedBatchSampler
from .masking import blockwise_patch_mask, whole_word_mask
from .render import render_scene, render_scenes
from .tokenizer import WordPieceTokenizer, build_tokenizer
from .world import (COLOURS, SHAPES, SIZES, SPLITS, Caption, EmbeddedWorld, Scene, SceneObject, WorldConfig,
                    check_claims)

__all__ = [
    "WordPieceTokenizer", "build_tokenizer", "build_pretrain_loader", "build_retrieval_eval_set",
    "RetrievalEvalSet", "EmbeddedWorld", "WorldConfig", "Scene", "SceneObject", "Caption", "check_claims",
    "SPLITS", "SHAPES", "COLOURS", "SIZES", "render_scene", "render_scenes", "Loader", "ShardedBatchSampler",
    "PretrainCollator", "EmbeddedPretrainDataset", "whole_word_mask", "blockwise_patch_mask",
]
