"""`python -m vlmo_fast.demo`: the README's main job on the tiny preset, in one process.

It is `train/pretrain.py --stage all` with settings sized for a 2-core CPU (minutes): the
vision (MIM), text (MLM) and vision-language (ITC + ITM with hard negatives + MLM) stages of
VLMo on the embedded procedural image-text world, then zero-shot retrieval on its held-out
test split, printed next to chance. Extra arguments are passed on (e.g. `--vl-steps 1000`,
`--output-dir runs/x`); `python train/pretrain.py --help` lists them.
"""
from __future__ import annotations

import sys

# Image 64 (4x4 patches), not the tiny preset's 32: with 2x2 patches of these scenes the
# contrastive loss stays at chance for hundreds of steps; at 64 it leaves it within ~100.
DEMO_OUT = "runs/demo"
DEMO_ARGS = ["--stage", "all", "--preset", "tiny", "--model-overrides", '{"img_size": 64}',
             "--output-dir", DEMO_OUT, "--resume", "never", "--vision-steps", "100",
             "--text-steps", "100", "--vl-steps", "800", "--batch-size", "32", "--lr", "2e-3",
             "--log-every", "50", "--save-every", "400", "--hard-negative-scale", "0.1"]


def _set_aside_previous_demo() -> None:
    """Each `make demo` trains afresh (`--resume never`), and a fresh run never deletes or
    writes over existing checkpoints: the previous demo's folder moves to runs/demo.previous
    (replacing the one before it), said on stdout."""
    import shutil
    from pathlib import Path
    out = Path(DEMO_OUT)
    if out.exists():
        previous = out.with_name(out.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        out.rename(previous)
        print(f"the previous demo's output moved to {previous}", flush=True)


def main(argv=None):
    import os
    import torch
    from .training.pretrain import main as pretrain_main
    if "OMP_NUM_THREADS" not in os.environ:
        # one intra-op thread unless asked: on the shared 2-core machine two threads made the
        # vl stage ~3x SLOWER (oversubscription), and one leaves a core for the data loader
        torch.set_num_threads(1)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--output-dir" or a.startswith("--output-dir=") for a in argv):
        _set_aside_previous_demo()
    print("python train/pretrain.py " + " ".join(DEMO_ARGS + argv), flush=True)
    return pretrain_main(DEMO_ARGS + argv)


if __name__ == "__main__":
    main()
