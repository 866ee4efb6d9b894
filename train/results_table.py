#!/usr/bin/env python
"""Regenerate the README results table from `train/evaluate.py --out` JSON files.

    python train/results_table.py results/*.json > results/table.md
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlmo_fast.eval.runner import table_main  # noqa: E402

if __name__ == "__main__":
    table_main()
