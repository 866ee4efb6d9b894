"""`python -m vlmo_fast.demo`: the README's main job on the tiny preset, in one process.

It is `train/pretrain.py --stage all` with settings sized for a 2-core CPU (minutes): the
vision (MIM), text (MLM) and vision-language (ITC + ITM with hard negatives + MLM) stages of
VLMo on the embedded procedural image-text world, then zero-shot retrieval on its held-out
test split, printed next to chance. Extra arguments are passed on (e.g. `--vl-steps 1000`,
`--output-dir runs/x`); `python train/pretrain.py --help` lists them.
"""
from __future__ import annotations

import sys

DEMO_ARGS = ["--stage", "all", "--preset", "tiny", "--output-dir", "runs/demo", "--resume", "never",
             "--vision-steps", "100", "--text-steps", "100", "--vl-steps", "500", "--batch-size", "32",
             "--lr", "2e-3", "--num-workers", "1", "--log-every", "25", "--save-every", "250"]


def main(argv=None):
    from .training.pretrain import main as pretrain_main
    argv = list(sys.argv[1:] if argv is None else argv)
    print("python train/pretrain.py " + " ".join(DEMO_ARGS + argv), flush=True)
    return pretrain_main(DEMO_ARGS + argv)


if __name__ == "__main__":
    main()
