"""VQAv2-style soft accuracy.

An answer's score for a question is min(#humans who gave that answer / 3, 1): right when at
least 3 of the (usually 10) annotators agree, partial credit below. This is the common
closed form of the official metric (which averages over the 10 leave-one-out subsets of
annotators; the two agree except for answers given by exactly 3 or 4 people out of 10).
Answers are compared after a light normalisation (lower case, surrounding whitespace and a
trailing period stripped, inner whitespace collapsed); the official script's digit and
article rewriting is not applied.

A classifier predicts over a fixed answer vocabulary; human answers outside it still count
in the denominator (they can never be predicted), so the score is not inflated by dropping
rare answers.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor

_SPACES = re.compile(r"\s+")


def normalize_answer(answer: str) -> str:
    if not isinstance(answer, str):
        raise TypeError(f"answers must be strings, got {type(answer).__name__}: {answer!r}")
    answer = _SPACES.sub(" ", answer.strip().lower())
    return answer[:-1].rstrip() if answer.endswith(".") else answer


def answer_score(count: int) -> float:
    """Soft score of an answer given by `count` annotators."""
    return min(count / 3.0, 1.0)


def vqa_soft_scores(human_answers: Sequence[Sequence[str]],
                    answer_to_index: Mapping[str, int]) -> Tensor:
    """Soft targets [Q, V] (the BCE targets of VQA fine-tuning): entry (q, a) is
    min(#humans answering a to q / 3, 1) for every answer a in the vocabulary."""
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
        if x.dtype.is_floating_point:
            raise TypeError("1-D predictions must be integer answer indices")
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


def build_answer_vocab(human_answers: Sequence[Sequence[str]], min_count: int = 1,
                       max_answers: Optional[int] = None) -> Dict[str, int]:
    """Answer -> index, most frequent first (ties alphabetical), from training annotations."""
    counts = Counter(normalize_answer(a) for answers in human_answers for a in answers)
    ranked = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
    if max_answers is not None:
        ranked = ranked[:max_answers]
    return {a: i for i, a in enumerate(ranked)}


@torch.no_grad()
def evaluate_vqa(model, images: Tensor, text_ids: Tensor, text_mask: Optional[Tensor],
                 targets: Tensor, *, batch_size: int = 64, device=None,
                 progress: bool = False) -> Dict[str, float]:
    """Soft accuracy of a fine-tuned VQA model (fusion encoder -> `model.classify`)."""
    from .retrieval import _model_device, _model_dtype, _progress
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if num_classes is not None and num_classes != targets.shape[1]:
        raise ValueError(f"the model classifies over {num_classes} answers but targets have "
                         f"{targets.shape[1]}: use the answer vocabulary the model was fine-tuned with")
    if images.shape[0] != text_ids.shape[0] or text_ids.shape[0] != targets.shape[0]:
        raise ValueError(f"images ({images.shape[0]}), questions ({text_ids.shape[0]}) and targets "
                         f"({targets.shape[0]}) must have one row per question")
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    try:
        logits = []
        starts = range(0, text_ids.shape[0], batch_size)
        for s in _progress(starts, progress, "VQA", len(starts)):
            mask = None if text_mask is None else text_mask[s:s + batch_size].to(device)
            pair = model.encode_pair(text_ids[s:s + batch_size].to(device),
                                     images[s:s + batch_size].to(device, _model_dtype(model)), mask)
            logits.append(model.classify(pair).float().cpu())
    finally:
        model.train(was_training)
    logits = torch.cat(logits) if logits else torch.empty(0, targets.shape[1])
    return {"vqa_score": vqa_soft_accuracy(logits, targets.cpu()),
            "upper_bound": float(targets.amax(1).double().mean()) if targets.shape[0] else 0.0,
            "num_questions": int(targets.shape[0])}
