#!/usr/bin/env python
"""VLMo stagewise pretraining (vision MIM -> text MLM -> vision-language ITC/ITM/MLM).

    deepspeed --num_gpus 8 train/pretrain.py --deepspeed_config train/configs/zero2.json \
        --stage all --preset base --output-dir runs/base ...
    python train/pretrain.py --stage all --output-dir runs/tiny      # one process (CPU or GPU)

Several nodes: a hostfile with one line per node ("node1 slots=8"), the same command on the
first node, DeepSpeed's launcher starts the rest over ssh:

    deepspeed --hostfile hosts --master_addr node1 train/pretrain.py \
        --deepspeed_config train/configs/zero2.json --stage vl --init runs/base/text/final ...

The machinery lives in vlmo_fast.training (reused by fine-tuning); this file is the CLI.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlmo_fast.training.pretrain import main  # noqa: E402

if __name__ == "__main__":
    main()
