"""VQAv2 soft accuracy.

The VQAv2 accuracy of an answer is min(#humans who gave it / 3, 1), averaged over the 10
subsets of 9 of the 10 annotators (the official evaluation): 0.3, 0.6, 0.9 and 1.0 for an
answer given by 1, 2, 3 and >= 4 annotators. These are also the soft BCE targets of VQA
fine-tuning (ViLT / VLMo), so `answer_score` is the data layer's `vqa_score` and answers
are compared after its `normalize_answer` (lower case, trimmed, trailing punctuation
removed, inner whitespace collapsed; the official script's digit and article rewriting is
not applied). The embedded world's answers are exact: its one answer scores 1.

A classifier predicts over a fixed answer vocabulary; human answers outside it still count
(they can never be predicted), so the score is not inflated by dropping rare answers.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..data.formats import normalize_answer
from ..data.formats import vqa_score as answer_score
from ..env import INTEGER_DTYPES


def vqa_soft_scores(human_answers: Sequence[Sequence[str]],
                    answer_to_index: Mapping[str, int]) -> Tensor:
    """Soft scores [Q, V]: entry (q, a) is `answer_score`(#humans answering a to q) for every
    answer a of the vocabulary (0 for answers nobody gave)."""
    num_answers = len(answer_to_index)
    if num_answers == 0:
        raise ValueError("answer_to_index is empty: the answer vocabulary needs at least one answer")
    targets = torch.zeros(len(human_answers), num_answers)
    for q, answers in enumerate(human_answers):
        if isinstance(answers, str):
            raise TypeError(f"human_answers[{q}] must be a list of answers, got the string {answers!r}")
        for answer, count in Counter(normalize_answer(a) for a in answers).items():
            index = answer_to_index.get(answer)
            if index is not None:
                targets[q, index] = answer_score(count)
    return targets


def vqa_accuracy(predicted: Sequence[str], human_answers: Sequence[Sequence[str]]) -> float:
    """Mean soft score of predicted answer strings (any answer, in the vocabulary or not)."""
    if len(predicted) != len(human_answers):
        raise ValueError(f"{len(predicted)} predictions for {len(human_answers)} questions")
    if not predicted:
        raise ValueError("vqa_accuracy needs at least one question")
    total = 0.0
    for q, (pred, answers) in enumerate(zip(predicted, human_answers)):
        if isinstance(answers, str) or len(answers) == 0:
            raise ValueError(f"human_answers[{q}] must be a non-empty list of answers, got {answers!r}")
        pred = normalize_answer(pred)
        total += answer_score(sum(normalize_answer(a) == pred for a in answers))
    return total / len(predicted)


def vqa_soft_accuracy(logits_or_predictions: Tensor, targets: Tensor) -> float:
    """Mean over questions of targets[q, argmax logits[q]] (or of targets[q, predictions[q]]
    when given a 1-D tensor of answer indices); targets from `vqa_soft_scores`."""
    if targets.dim() != 2:
        raise ValueError(f"targets must be [questions, answers], got shape {tuple(targets.shape)}")
    x = logits_or_predictions
    if x.dim() == 2:
        if x.shape != targets.shape:
            raise ValueError(f"logits shape {tuple(x.shape)} != targets shape {tuple(targets.shape)}")
        pred = x.argmax(dim=1)
    elif x.dim() == 1:
        if x.dtype not in INTEGER_DTYPES:
            raise TypeError(f"1-D predictions must be integer answer indices, got {x.dtype}")
        pred = x.long()
        if pred.shape[0] != targets.shape[0]:
            raise ValueError(f"{pred.shape[0]} predictions for {targets.shape[0]} questions")
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= targets.shape[1]):
            raise ValueError(f"predicted answer indices must be in [0, {targets.shape[1]}), got "
                             f"[{int(pred.min())}, {int(pred.max())}]: unknown answer label")
    else:
        raise ValueError("logits_or_predictions must be [Q, V] logits or [Q] answer indices")
    if targets.shape[0] == 0:
        raise ValueError("vqa_soft_accuracy needs at least one question")
    return float(targets.gather(1, pred.to(targets.device)[:, None]).double().mean())


@torch.no_grad()
def evaluate_vqa_batches(model, batches: Iterable[dict], *, device=None) -> Dict[str, float]:
    """Soft accuracy of a fine-tuned VQA model (fusion encoder -> `model.classify`) over
    batches with `images`, `text_ids`, `text_mask` and `vqa_targets` [B, A] (the data
    layer's task loader), accumulated batch by batch."""
    from .retrieval import _model_device, _model_dtype
    device = torch.device(device) if device is not None else _model_device(model)
    dtype = _model_dtype(model)
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    was_training = model.training
    model.eval()
    total, best, count = 0.0, 0.0, 0
    try:
        for batch in batches:
            targets = batch["vqa_targets"].float()
            if num_classes is not None and num_classes != targets.shape[1]:
                raise ValueError(f"the model classifies over {num_classes} answers but the targets have "
                                 f"{targets.shape[1]}: use the answer vocabulary the model was fine-tuned with")
            mask = batch.get("text_mask")
            pair = model.encode_pair(batch["text_ids"].to(device), batch["images"].to(device, dtype),
                                     None if mask is None else mask.to(device))
            logits = model.classify(pair).float().cpu()
            n = targets.shape[0]
            total += vqa_soft_accuracy(logits, targets) * n
            best += float(targets.amax(1).double().sum()) if n else 0.0
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate_vqa needs at least one question")
    return {"vqa_score": total / count, "upper_bound": best / count, "num_questions": count}


def evaluate_vqa(model, images: Tensor, text_ids: Tensor, text_mask: Optional[Tensor],
                 targets: Tensor, *, batch_size: int = 64, device=None,
                 progress: bool = False) -> Dict[str, float]:
    """`evaluate_vqa_batches` on in-memory tensors (one row per question)."""
    from .retrieval import _progress
    if images.shape[0] != text_ids.shape[0] or text_ids.shape[0] != targets.shape[0]:
        raise ValueError(f"images ({images.shape[0]}), questions ({text_ids.shape[0]}) and targets "
                         f"({targets.shape[0]}) must have one row per question")
    starts = range(0, text_ids.shape[0], batch_size)
    batches = ({"images": images[s:s + batch_size], "text_ids": text_ids[s:s + batch_size],
                "text_mask": None if text_mask is None else text_mask[s:s + batch_size],
                "vqa_targets": targets[s:s + batch_size]}
               for s in _progress(starts, progress, "VQA", len(starts)))
    return evaluate_vqa_batches(model, batches, device=device)
