"""Evaluation metrics and protocols (retrieval, VQA, NLVR2, zero-shot classification).

Each metric is a plain function on tensors (exactly testable on hand-made inputs); the
`evaluate_*` functions run a model over a data set and call them.
"""
from .retrieval import (DEFAULT_KS, RetrievalResult, encode_features, evaluate_retrieval,
                        recall_at_k, rerank_scores)

__all__ = ["DEFAULT_KS", "RetrievalResult", "encode_features", "evaluate_retrieval",
           "recall_at_k", "rerank_scores"]
