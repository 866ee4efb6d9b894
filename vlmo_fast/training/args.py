"""Command-line flags shared by the training jobs (pretraining and fine-tuning), declared once,
and the checks on them that need no work (run before a process group, model or data exists).

`add_optimization_args` (steps, batch, accumulation, AdamW, schedule, clipping, precision,
activation checkpointing) and `add_run_args` (output, seed, logging, checkpoints, resume,
non-finite policy, progress, DeepSpeed's config) are what every job has; each job adds its own
flags next to them. `validate_common` checks the shared ones.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .checkpoint import RESUME_POLICIES
from .resume import OVERRIDABLE as OVERRIDABLE_ON_RESUME  # run arguments --override-on-resume may name


def add_optimization_args(p: argparse.ArgumentParser, *, steps: int, lr: float) -> None:
    g = p.add_argument_group("optimization")
    a = g.add_argument
    a("--steps", type=int, default=steps, help="optimizer steps (per stage when pretraining)")
    a("--batch-size", type=int, default=32, help="micro-batch per process")
    a("--grad-accum", type=int, default=1)
    a("--lr", type=float, default=lr)
    a("--weight-decay", type=float, default=0.01)
    a("--betas", type=float, nargs=2, default=(0.9, 0.98))
    a("--warmup-steps", type=int, default=None, help="default: 10%% of the steps")
    a("--schedule", default="linear", choices=["cosine", "linear", "constant"])
    a("--min-lr-ratio", type=float, default=0.0)
    a("--clip", type=float, default=1.0, help="gradient clipping (global norm); 0 disables")
    a("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA, fp32 on CPU")
    a("--activation-checkpointing", action="store_true",
      help="recompute each block in backward (VLMo.set_grad_checkpointing)")


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    a = g.add_argument
    a("--output-dir", required=True, help="checkpoints/, final/, metrics.jsonl, tensorboard/, curves.png")
    a("--num-workers", type=int, default=0)
    a("--seed", type=int, default=0)
    a("--log-every", type=int, default=10, help="host sync + JSONL/TensorBoard every N steps")
    a("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    a("--keep-last", type=int, default=2, help="checkpoints kept (older ones of this run are deleted)")
    a("--resume", default="auto", choices=RESUME_POLICIES,
      help="auto: continue from the newest complete checkpoint (a damaged one is skipped with a "
      "warning naming the file); strict: refuse on any damaged checkpoint; never: start afresh")
    a("--override-on-resume", default="", metavar="NAMES",
      help="comma-separated run arguments whose NEW values a resumed run applies (e.g. lr,weight_decay; "
      f"allowed: {','.join(OVERRIDABLE_ON_RESUME)}); other changed values are refused")
    a("--trust-pickle", action="store_true", help="let this run unpickle files that weights-only loading "
      "refuses: a legacy --init-beit .pth, or checkpoints of vlmo_fast versions before JSON client "
      "state (runs code stored in the file: only for files you trust)")
    a("--skip-nonfinite", action="store_true",
      help="skip a step whose loss is NaN/inf (counted; costs a host sync per step) instead of stopping")
    a("--no-progress", action="store_true", help="no tqdm bar")
    a("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
      help=argparse.SUPPRESS)
    from .engine import distributed_timeout_minutes
    distributed_timeout_minutes()   # deepspeed's import reads DEEPSPEED_TIMEOUT: name a bad one first
    try:
        import deepspeed
        deepspeed.add_config_arguments(p)
    except ImportError:  # validate_common says so clearly
        a("--deepspeed_config", default=None)


def override_names(args) -> set:
    names = {n.strip().replace("-", "_") for n in (args.override_on_resume or "").split(",") if n.strip()}
    unknown = names - set(OVERRIDABLE_ON_RESUME)
    if unknown:
        raise ValueError(f"--override-on-resume: {sorted(unknown)} cannot be overridden; allowed: "
                         f"{', '.join(OVERRIDABLE_ON_RESUME)}")
    return names


def validate_common(args) -> None:
    """The shared flags' checks (ValueError naming the flag)."""
    def bad(msg):
        raise ValueError(msg)
    for name in ("steps", "batch_size", "grad_accum", "log_every", "save_every", "keep_last"):
        if getattr(args, name) < 1:
            bad(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        bad(f"--lr must be > 0, got {args.lr}")
    if args.weight_decay < 0:
        bad(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not all(0 <= b < 1 for b in args.betas):
        bad(f"--betas must be in [0, 1), got {tuple(args.betas)}")
    if args.clip < 0:
        bad(f"--clip must be >= 0, got {args.clip}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        bad(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if not 0 <= args.min_lr_ratio <= 1:
        bad(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.num_workers < 0:
        bad(f"--num-workers must be >= 0, got {args.num_workers}")
    override_names(args)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        bad("deepspeed is not installed: pip install deepspeed (the jobs run on its engine)")
    if args.deepspeed_config is not None:
        from .engine import build_ds_config, load_ds_config
        build_ds_config(load_ds_config(args.deepspeed_config), micro_batch=args.batch_size,
                        grad_accum=args.grad_accum, clip=args.clip, bf16=False)


def existing_path(flag: str, value) -> None:
    if value is not None and not Path(value).exists():
        raise ValueError(f"{flag} {value}: no such file or folder")
