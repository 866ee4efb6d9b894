#!/usr/bin/env python
"""The paper's ablations (VLMo Tables 4-7), rerunnable, with seeds and confidence intervals.

    python train/ablations.py --arms stagewise,ffn,tasks,hardneg,attention --seeds 3 \
        --budget small --output-dir runs/ablations
    python train/ablations.py --budget tiny --output-dir runs/ablations-tiny     # smoke test
    python train/ablations.py --budget tiny --data pairs.jsonl --tokenizer train:captions.txt \
        --output-dir runs/ablations-mine

Every variant is an ordinary train/pretrain.py run, then the same evaluations (zero-shot
retrieval and classification, a short NLVR2 fine-tune); a rerun skips finished runs. The code
lives in vlmo_fast/training/ablations.py; benchmarks/results/ablations/README.md describes the
committed run.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlmo_fast.training.ablations import main  # noqa: E402

if __name__ == "__main__":
    main()
