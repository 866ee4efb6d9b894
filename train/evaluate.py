#!/usr/bin/env python
"""Evaluate a VLMo checkpoint folder: retrieval (ITC and ITC+ITM re-rank), VQA, NLVR2,
zero-shot classification, on the embedded world's held-out splits or a Karpathy JSON.

    python train/evaluate.py --task retrieval --checkpoint runs/tiny/vl/final --split test_comp
    python train/evaluate.py --task zeroshot --checkpoint runs/tiny/vl/final --out zs.json

The same as `python -m vlmo_fast evaluate ...`; the code lives in vlmo_fast/eval/runner.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlmo_fast.eval.runner import main  # noqa: E402

if __name__ == "__main__":
    main()
