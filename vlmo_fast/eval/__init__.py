"""Evaluation metrics and protocols: retrieval (ITC and ITC + ITM re-rank), VQA soft
accuracy, NLVR2 accuracy/consistency, zero-shot classification from text prompts.

Each metric is a plain function on tensors (exactly testable on hand-made inputs); the
`evaluate_*` functions run a model over a data set and call them.
"""
from .nlvr2 import (NLVR2Head, NLVR2Model, evaluate_nlvr2, evaluate_nlvr2_batches, nlvr2_accuracy,
                    nlvr2_consistency)
from .retrieval import (DEFAULT_KS, RetrievalResult, chance_recall, encode_features,
                        evaluate_retrieval, recall_at_k, rerank_scores)
from .vqa import (answer_score, evaluate_vqa, evaluate_vqa_batches, normalize_answer, vqa_accuracy, vqa_soft_accuracy,
                  vqa_soft_scores)
from .zeroshot import (DEFAULT_TEMPLATES, class_embeddings_from_prompts, class_prompts,
                       evaluate_zeroshot, zeroshot_accuracy, zeroshot_classifier)

__all__ = [
    "DEFAULT_KS", "RetrievalResult", "chance_recall", "encode_features", "evaluate_retrieval", "recall_at_k",
    "rerank_scores", "answer_score", "evaluate_vqa", "evaluate_vqa_batches", "normalize_answer",
    "vqa_accuracy", "vqa_soft_accuracy", "vqa_soft_scores", "NLVR2Head", "NLVR2Model",
    "evaluate_nlvr2", "evaluate_nlvr2_batches", "nlvr2_accuracy", "nlvr2_consistency", "DEFAULT_TEMPLATES",
    "class_embeddings_from_prompts", "class_prompts", "evaluate_zeroshot", "zeroshot_accuracy",
    "zeroshot_classifier",
]
