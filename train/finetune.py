#!/usr/bin/env python
"""Fine-tune a pretrained VLMo on retrieval, VQA or NLVR2 (DeepSpeed engine, checkpoints,
exact resume, logs and curves of the pretraining machinery), then evaluate it.

    python train/finetune.py --task vqa --init runs/tiny/vl/final --output-dir runs/vqa --steps 300
    deepspeed --num_gpus 8 train/finetune.py --task retrieval --init ckpt --output-dir runs/ret \
        --deepspeed_config train/configs/zero2.json --img-size 384 --itm

The code lives in vlmo_fast/training/finetune.py (on the training loop of training/loop.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlmo_fast.training.finetune import main  # noqa: E402

if __name__ == "__main__":
    main()
