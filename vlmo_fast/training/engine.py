"""DeepSpeed plumbing: process group, config, one engine per stage, weight export.

- `init_distributed()`: the launcher's env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) or, for a
  plain `python train/pretrain.py`, a world of one on 127.0.0.1; gloo on CPU, nccl on CUDA.
  Collective / rendezvous timeout: DEEPSPEED_TIMEOUT (minutes) or 30.
- `build_ds_config()`: the user's JSON (train/configs/*.json) + the job's own settings
  (micro batch, accumulation, clipping, precision). Keys the job owns (optimizer, scheduler)
  are refused with a message naming the flag to use; unknown top-level keys are refused.
- `build_engine()`: a NEW engine per stage with only the trainable parameters (DeepSpeed fixes
  the frozen set at initialize; a group of only frozen parameters crashes ZeRO-1/2). Under
  ZeRO-3 parameters used outside their owner's forward are registered as external parameters
  of the step module; the expert banks need not be leaf modules (see `build_engine`).
- `gathered_state_dict()`: the plain VLMo state_dict on rank 0 (ZeRO-3 parameters gathered);
  `gathered_fp32_state()` the same for any submodule (e.g. a fine-tuning head).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .optim import build_optimizer, lr_lambda
from .stages import FFN_MODULE_TYPES, export_state_dict

# Top-level keys of a DeepSpeed config this job accepts from a file.
ALLOWED_DS_KEYS = {
    "zero_optimization", "bf16", "fp16", "gradient_clipping", "gradient_accumulation_steps",
    "train_micro_batch_size_per_gpu", "train_batch_size", "steps_per_print", "wall_clock_breakdown",
    "communication_data_type", "prescale_gradients", "gradient_predivide_factor",
    "zero_allow_untested_optimizer", "activation_checkpointing", "flops_profiler", "comms_logger",
    "dump_state", "seq_parallel_communication_data_type", "data_types", "checkpoint", "zero_force_ds_cpu_optimizer",
    "memory_breakdown", "torch_autocast", "comment",
}
JOB_OWNED_KEYS = {
    "optimizer": "the job builds torch AdamW itself: use --lr, --weight-decay, --betas",
    "scheduler": "the job builds its warmup + decay schedule: use --warmup-steps, --schedule",
}


# DeepSpeed's own variable for its process groups' timeout (whole minutes; DeepSpeed parses it
# with int() when it is imported). The job uses it too, so one setting covers both.
TIMEOUT_ENV = "DEEPSPEED_TIMEOUT"
DEFAULT_TIMEOUT_MINUTES = 30
# World sizes set by launchers that start every rank themselves. Without RANK next to them the
# process would train alone as a world of one, beside N-1 copies writing the same output folder.
WORLD_SIZE_ENVS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE")


def distributed_timeout_minutes() -> int:
    """The process-group timeout in minutes: DEEPSPEED_TIMEOUT when set, else 30."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_MINUTES
    try:
        minutes = int(text)
    except ValueError:
        minutes = 0
    if minutes < 1:
        raise ValueError(f"{TIMEOUT_ENV}={text!r}: expected a whole number of minutes >= 1 (how long a "
                         f"collective waits for the other ranks; default {DEFAULT_TIMEOUT_MINUTES})")
    return minutes


def check_launcher_env() -> None:
    """Refuse a process that a launcher started as one of several without RANK (ValueError)."""
    for name in WORLD_SIZE_ENVS:
        text = os.environ.get(name, "").strip()
        if text.isdigit() and int(text) > 1:
            raise ValueError(
                f"{name}={text} but RANK is not set: this job reads RANK, WORLD_SIZE, LOCAL_RANK, "
                "MASTER_ADDR and MASTER_PORT from its launcher: start it with `deepspeed` (one command "
                "per node with --no_ssh --node_rank, or a hostfile over ssh/pdsh) or `torchrun`, one "
                "launcher per node (train/README.md, several nodes)")


def init_distributed(timeout_minutes: Optional[int] = None) -> Tuple[int, int, torch.device]:
    """(rank, world_size, device); starts a world of one when not launched by a launcher.

    timeout_minutes (default: `distributed_timeout_minutes()`): how long the start-up rendezvous
    and every collective wait for the other ranks. A rank whose peer process died does not wait
    for it: the peer's sockets close and the pending collective fails at once (gloo: "Connection
    closed by peer"; tests/test_multinode.py). The timeout is what ends a rank whose peer hangs
    (a frozen node, a network partition) or never starts."""
    if timeout_minutes is None:
        timeout_minutes = distributed_timeout_minutes()
    elif timeout_minutes < 1:
        raise ValueError(f"timeout_minutes must be >= 1, got {timeout_minutes}")
    init_method = None
    if "RANK" not in os.environ:
        check_launcher_env()
    import deepspeed
    from datetime import timedelta
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "0")
        # a world of one needs no port: a port picked here and released before the store
        # binds it can be taken by another process in between (EADDRINUSE); a file store cannot
        handle, path = tempfile.mkstemp(prefix="vlmo_fast_world_of_one_")
        os.close(handle)
        os.unlink(path)   # FileStore creates it; a stale file from an earlier run would be read
        init_method = f"file://{path}"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        ranks = {} if init_method is None else {"rank": 0, "world_size": 1}
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_minutes),
                                   init_method=init_method, **ranks)
    return dist.get_rank(), dist.get_world_size(), device


def load_ds_config(path: Optional[str]) -> Dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--deepspeed_config {path}: no such file")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed_config {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--deepspeed_config {path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def build_ds_config(user: Dict, *, micro_batch: int, grad_accum: int, clip: float, bf16: bool,
                    source: str = "--deepspeed_config") -> Dict:
    for key, why in JOB_OWNED_KEYS.items():
        if key in user:
            raise ValueError(f"{source}: key {key!r} is not accepted: {why}")
    unknown = sorted(set(user) - ALLOWED_DS_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; accepted: {sorted(ALLOWED_DS_KEYS)}")
    cfg = json.loads(json.dumps(user))
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ValueError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got "
                         f"{zero.get('stage') if isinstance(zero, dict) else zero!r}")
    for key, value in (("train_micro_batch_size_per_gpu", micro_batch),
                       ("gradient_accumulation_steps", grad_accum)):
        if key in cfg and cfg[key] != value:
            raise ValueError(f"{source}: {key}={cfg[key]} disagrees with the command line ({value}); "
                             f"set it with the flag, not in the config")
        cfg[key] = value
    cfg.pop("train_batch_size", None)
    cfg["gradient_clipping"] = float(clip)
    if cfg.get("fp16", {}).get("enabled"):
        raise ValueError(f"{source}: fp16 is not supported (VLMo trains in bf16 or fp32)")
    if not bf16 and cfg.get("bf16", {}).get("enabled"):
        raise ValueError(f"{source}: bf16 is enabled but this run uses fp32 (CPU, or --precision fp32)")
    cfg["bf16"] = {"enabled": bool(bf16)}
    cfg.setdefault("steps_per_print", 10 ** 9)
    if zero.get("stage", 0) > 0:
        cfg.setdefault("zero_allow_untested_optimizer", True)
    return cfg


def zero_stage(ds_config: Dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_engine(step_module: nn.Module, ds_config: Dict, *, lr: float, weight_decay: float,
                 betas=(0.9, 0.98), eps: float = 1e-8, total_steps: int, warmup_steps: int,
                 schedule: str = "cosine", min_lr_ratio: float = 0.0, leaf_experts: bool = False,
                 param_groups: Optional[List[Dict]] = None):
    """deepspeed.initialize over the trainable parameters of `step_module` -> engine.

    param_groups: AdamW's groups (e.g. fine-tuning's head lr and layer decay); default: the
    trainable parameters split by weight decay (`training.optim.param_groups`).

    leaf_experts: mark the expert banks as ZeRO-3 leaf modules. Off by default: the banks hold
    their experts STACKED (one tensor per weight kind, passed whole to the FFN op), so every
    rank uses every expert parameter in every call whatever the routing - the rank
    disagreement that leaf modules cure cannot happen. And DeepSpeed reduces a leaf module's
    gradients from a module backward hook that fires once per CALL: a step that runs a block
    several times (image, text, VL re-run and fusion passes) then reduces the same parameter
    twice (stage3 `__reduce_and_partition_ipg_grads` assertion). Use it only with a step that
    calls each bank once."""
    import deepspeed
    if zero_stage(ds_config) == 3:
        if leaf_experts:
            from deepspeed.utils import set_z3_leaf_modules
            set_z3_leaf_modules(step_module, list(FFN_MODULE_TYPES))
        for p in step_module.external_parameters():
            deepspeed.zero.register_external_parameter(step_module, p)
    if param_groups is None:
        optimizer = build_optimizer(step_module, lr, weight_decay, betas, eps)
    else:
        optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), eps=eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup_steps, schedule, min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=step_module, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    return engine


def gathered_fp32_state(engine, module: nn.Module, rank: int) -> Optional[Dict[str, torch.Tensor]]:
    """`module`'s state_dict (CPU fp32) on rank 0, None elsewhere; `module` is any submodule
    of the engine's step module. Collective.

    Trained parameters come from the optimizer's fp32 master copy (`safe_get_full_fp32_param`:
    under bf16 the module holds only a rounded copy), frozen ones and buffers from the module
    (ZeRO-3 partitions gathered)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    values = {}
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        for name, p in module.named_parameters():
            master = safe_get_full_fp32_param(p) if p.requires_grad else None
            values[name] = (master if master is not None else p).detach().float().cpu().clone()
        for name, t in module.state_dict().items():
            if name not in values:
                values[name] = t.detach().cpu().clone()
    return values if rank == 0 else None


def gathered_state_dict(engine, rank: int) -> Optional[Dict[str, torch.Tensor]]:
    """The plain VLMo state_dict (CPU fp32, any stage's FFN layout exported back to the stacked
    experts) of the step module's `model` on rank 0, None elsewhere. Collective."""
    model = engine.module.model
    values = gathered_fp32_state(engine, model, rank)
    return None if values is None else export_state_dict(model, values)


def resolve_bf16(precision: str, device: torch.device) -> bool:
    """--precision auto|bf16|fp32 -> whether the run trains in bf16 (auto: bf16 on CUDA)."""
    bf16 = device.type == "cuda" if precision == "auto" else precision == "bf16"
    if bf16 and device.type != "cuda":
        raise ValueError("--precision bf16 needs CUDA; this run is on the CPU (use fp32)")
    return bf16


def engine_from_args(step_module: nn.Module, args, *, lr: float, total_steps: int, bf16: bool,
                     param_groups: Optional[List[Dict]] = None):
    """The job's engine from the shared training flags (training.args): DeepSpeed config from
    --deepspeed_config + batch/accumulation/clipping/precision, AdamW, warmup (default 10 % of
    the steps) + decay schedule. Returns (engine, ds_config)."""
    from .resume import schedule_spec
    spec = schedule_spec(args, total_steps)
    ds_config = build_ds_config(load_ds_config(args.deepspeed_config), micro_batch=args.batch_size,
                                grad_accum=args.grad_accum, clip=args.clip, bf16=bf16)
    engine = build_engine(step_module, ds_config, lr=lr, weight_decay=args.weight_decay,
                          betas=tuple(args.betas), total_steps=spec["total"], warmup_steps=spec["warmup"],
                          schedule=spec["schedule"], min_lr_ratio=spec["min_ratio"], param_groups=param_groups)
    return engine, ds_config
