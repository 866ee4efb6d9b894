"""What a resumed run may change, and the learning-rate schedule across resumes.

Every checkpoint records the run's arguments (`record_run_args`: a JSON dict, with facts such
as the world size). On resume `check_resume_args(saved, current, overrides)` compares them key
by key; each changed key is in one of four classes:

- free: how the run is watched or saved, not what it computes (logging and saving cadence,
  workers, progress bar, evaluation settings, resume policy, activation checkpointing, the
  path of the DeepSpeed config). Applied, and reported.
- overridable (`OVERRIDABLE`: lr, per-stage lrs, weight_decay, betas, clip, min_lr_ratio,
  head_lr_mult, layer_decay): refused unless named in `--override-on-resume`; then applied
  from the resume step on (`apply_overrides`) and reported. DeepSpeed's load restores the
  recorded values into the optimizer, the scheduler and (ZeRO-1/2, bf16) the clipping, so
  they are set again afterwards from the freshly built optimizer (`capture_settings`), which
  holds the new values for every parameter group, layer-wise decay and head lr included.
- schedule (`steps`, per-stage steps, `warmup_steps`, `schedule`): the schedule is rebuilt.
- anything else (batch size, accumulation, seed, data, tokenizer, model, stage set, world
  size, ZeRO stage, precision, objectives ...): refused with a message naming each changed
  key, old -> new, and what to do.

The schedule is a list of segments (recorded in every checkpoint). The first is the
job's warmup + decay (`optim.lr_lambda`, unchanged). A changed schedule adds a segment at the
resume step S with this rule: the multiplier continues from the value r the old schedule
reached at S (no jump); if the new warmup ends after S it rises linearly from r to 1 at the
new warmup's end, then decays (new kind) to the new min_lr_ratio at the new total; otherwise
it decays from r to the new min_lr_ratio over S .. new total. A later resume rebuilds the same
function from the recorded segments, so any number of resumes gives one reproducible
schedule. A new total at or before S cannot be honoured and is refused.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from .optim import SCHEDULES, lr_lambda

OVERRIDABLE = ("lr", "vision_lr", "text_lr", "vl_lr", "weight_decay", "betas", "clip", "min_lr_ratio",
               "head_lr_mult", "layer_decay")
LR_KEYS = frozenset({"lr", "vision_lr", "text_lr", "vl_lr", "head_lr_mult", "layer_decay"})
SCHEDULE_KEYS = frozenset({"steps", "vision_steps", "text_steps", "vl_steps", "warmup_steps", "schedule"})
FREE_KEYS = frozenset({
    "log_every", "save_every", "keep_last", "num_workers", "no_progress", "eval_split", "eval_images",
    "eval_items", "rerank_k", "no_eval", "output_dir", "resume", "override_on_resume", "trust_pickle",
    "skip_nonfinite", "activation_checkpointing", "deepspeed", "deepscale", "deepscale_config",
    "deepspeed_config"})
# DeepSpeed config entries about reporting only
FREE_PREFIXES = ("ds_config.steps_per_print", "ds_config.wall_clock_breakdown", "ds_config.flops_profiler",
                 "ds_config.comms_logger", "ds_config.memory_breakdown", "ds_config.dump_state",
                 "ds_config.comment")
# entries that mirror a flag: its change is reported (and classified) under the flag
DERIVED = {"ds_config.gradient_clipping": "clip", "ds_config.train_micro_batch_size_per_gpu": "batch_size",
           "ds_config.gradient_accumulation_steps": "grad_accum"}
# never recorded: differs between the ranks of one run
UNRECORDED = frozenset({"local_rank"})
_MODEL = "the checkpoint holds this model"
_DATA = "the recorded data position and order belong to it"
_STEP = "it changes what every step computes"
NEVER_REASONS = {
    "batch_size": "the data position and the optimizer state belong to the batch size",
    "grad_accum": "the data position and the optimizer state belong to the batch size",
    "seed": "the random streams (data order, masks, drop path) come from it",
    "data": _DATA, "tokenizer": _DATA, "vocab_size": _DATA, "annotations": _DATA, "image_root": _DATA,
    "preset": _MODEL, "model_overrides": _MODEL, "init": _MODEL, "init_beit": _MODEL, "from_scratch": _MODEL,
    "img_size": _MODEL, "ffn": _MODEL, "task": _MODEL, "itm": _MODEL,
    "stage": "the stage plan belongs to the run", "skip_text_stage": "the stage plan belongs to the run",
    "world_size": "optimizer partitions, data shards and per-rank random streams belong to the world size",
    "zero_stage": "DeepSpeed's files are laid out for the ZeRO stage",
    "precision": "the master weights and the loss scale belong to the precision",
    "bf16": "the master weights and the loss scale belong to the precision",
    "ds_config.bf16.enabled": "the master weights and the loss scale belong to the precision",
    "hard_negatives": _STEP, "hard_negative_warmup": _STEP, "hard_negative_scale": _STEP,
    "itc_accum": _STEP, "layout": _STEP, "loss_weights": _STEP, "mlm_probability": _STEP, "mask_ratio": _STEP,
}


class ResumeArgsError(ValueError):
    """A resumed run's arguments differ from the checkpoint's in a way it cannot honour."""


def flag(key: str) -> str:
    """How a recorded key is spelled for the user."""
    if key.startswith("ds_config."):
        return f"DeepSpeed config {key[len('ds_config.'):]}"
    return "--" + key.replace("_", "-")


# --------------------------------------------------------------------------- recording
def _jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if hasattr(value, "__fspath__"):
        return str(value)
    raise TypeError(f"run argument {where}: a {type(value).__name__} cannot be recorded (JSON values only)")


def record_run_args(args: Union[Dict, Any], **facts) -> Dict:
    """The run's arguments (an argparse Namespace or a dict) + facts the flags do not show
    (world_size, zero_stage, bf16, ds_config ...) as the JSON dict a checkpoint records."""
    values = dict(args) if isinstance(args, dict) else dict(vars(args))
    values.update(facts)
    return {k: _jsonable(v, k) for k, v in sorted(values.items()) if k not in UNRECORDED}


def _flatten(values: Dict, prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def classify(key: str) -> str:
    """"free", "override", "schedule" or "never" for a recorded (flattened) key."""
    if key in FREE_KEYS or key.startswith(FREE_PREFIXES):
        return "free"
    if key in OVERRIDABLE:
        return "override"
    if key in SCHEDULE_KEYS:
        return "schedule"
    return "never"


def parse_overrides(names: Union[str, Iterable[str], None]) -> frozenset:
    """--override-on-resume's names (a comma-separated string or names); ValueError for one
    that cannot be overridden."""
    if names is None:
        return frozenset()
    if isinstance(names, str):
        names = names.split(",")
    out = frozenset(n.strip().replace("-", "_") for n in names if n.strip())
    unknown = sorted(out - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"--override-on-resume: {', '.join(unknown)} cannot be overridden; allowed: "
                         f"{', '.join(OVERRIDABLE)}")
    return out


@dataclass
class ArgChanges:
    """The changed keys of a resume, by class: key -> (recorded, current)."""
    free: Dict[str, Tuple[Any, Any]] = field(default_factory=dict)
    overrides: Dict[str, Tuple[Any, Any]] = field(default_factory=dict)
    schedule: Dict[str, Tuple[Any, Any]] = field(default_factory=dict)
    unrecorded: Dict[str, Any] = field(default_factory=dict)   # not in the checkpoint's record
    dropped: Dict[str, Any] = field(default_factory=dict)      # recorded, not given now

    def messages(self) -> List[str]:
        out = [f"{flag(k)}: {a!r} -> {b!r} (changed; does not affect the training)" for k, (a, b) in self.free.items()]
        out += [f"{flag(k)}: {a!r} -> {b!r} (applied from the resume step: --override-on-resume)"
                for k, (a, b) in self.overrides.items()]
        out += [f"{flag(k)}: {a!r} -> {b!r} (schedule length/shape changed)" for k, (a, b) in self.schedule.items()]
        out += [f"{flag(k)}: {v!r} (not recorded by the checkpoint, written by an older vlmo_fast: used as given)"
                for k, v in self.unrecorded.items()]
        out += [f"{flag(k)}: recorded as {v!r}, not an argument of this run (ignored)" for k, v in self.dropped.items()]
        return out


def check_resume_args(saved: Dict, current: Dict, overrides: Union[str, Iterable[str], None] = ()) -> ArgChanges:
    """Classify every key whose value differs between the checkpoint's record and this run
    (see the module docstring); ResumeArgsError naming each refused key, old -> new, and
    what to do."""
    allowed = parse_overrides(overrides)
    old_values, new_values = _flatten(saved), _flatten(current)
    changes, refused = ArgChanges(), []
    for key in sorted(set(old_values) | set(new_values)):
        if key in DERIVED or key in UNRECORDED:
            continue
        if key not in old_values:
            changes.unrecorded[key] = new_values[key]
            continue
        if key not in new_values:
            changes.dropped[key] = old_values[key]
            continue
        old, new = old_values[key], new_values[key]
        if _same(old, new):
            continue
        kind = classify(key)
        if kind == "free":
            changes.free[key] = (old, new)
        elif kind == "schedule":
            changes.schedule[key] = (old, new)
        elif kind == "override" and key in allowed:
            changes.overrides[key] = (old, new)
        elif kind == "override":
            refused.append(f"{flag(key)}: {old!r} -> {new!r} (to apply it from the resume step, add "
                           f"--override-on-resume {key}; or rerun with {old!r})")
        else:
            reason = NEVER_REASONS.get(key, "not known to be safe to change on resume")
            refused.append(f"{flag(key)}: {old!r} -> {new!r} (cannot change on resume: {reason})")
    if refused:
        raise ResumeArgsError(
            "cannot resume with changed arguments: " + "; ".join(refused) + ". Rerun with the recorded "
            "values, or start a new run in another --output-dir (its weights can start it: --init)")
    return changes


# --------------------------------------------------------------------------- the schedule
def schedule_spec(args, total_steps: int) -> Dict:
    """The stage's schedule from the shared flags, as `engine.engine_from_args` builds it:
    warmup --warmup-steps (default 10 % of the steps, at least 1, at most the steps)."""
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, total_steps // 10)
    return {"total": int(total_steps), "warmup": int(min(warmup, total_steps)), "schedule": args.schedule,
            "min_ratio": float(args.min_lr_ratio)}


def initial_schedule(spec: Dict) -> List[Dict]:
    """A run's schedule before any change: one segment, `optim.lr_lambda` of the spec."""
    return [{"start": 0, "start_ratio": None, **_checked_spec(spec, "schedule spec")}]


def _checked_spec(spec: Dict, where: str) -> Dict:
    try:
        out = {"total": int(spec["total"]), "warmup": int(spec["warmup"]), "schedule": str(spec["schedule"]),
               "min_ratio": float(spec["min_ratio"])}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: expected total, warmup, schedule and min_ratio, got {spec!r} ({e})") from None
    if out["schedule"] not in SCHEDULES or out["total"] < 1 or not 0 <= out["warmup"] <= out["total"]:
        raise ValueError(f"{where}: not a valid schedule ({spec!r})")
    return out


def _segment_fn(seg: Dict) -> Callable[[int], float]:
    if seg["start_ratio"] is None:
        return lr_lambda(seg["total"], seg["warmup"], seg["schedule"], seg["min_ratio"])
    start, r, total, kind, floor = seg["start"], seg["start_ratio"], seg["total"], seg["schedule"], seg["min_ratio"]
    warm_end = seg["warmup"] - 1          # the original warmup reaches 1 at step warmup - 1
    warming = warm_end > start
    d0, peak = (warm_end, 1.0) if warming else (start, r)

    def fn(step: int) -> float:
        if warming and step < warm_end:
            return r + (1.0 - r) * (step - start) / (warm_end - start)
        if kind == "constant":
            return peak
        progress = min(1.0, (step - d0) / max(1, total - d0))
        if kind == "linear":
            return floor + (peak - floor) * (1.0 - progress)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return fn


def schedule_lambda(segments: List[Dict]) -> Callable[[int], float]:
    """The lr multiplier at optimizer step s (what LambdaLR takes) for recorded segments."""
    if not isinstance(segments, list) or not segments:
        raise ValueError(f"lr schedule: expected a non-empty list of segments, got {segments!r}")
    parts = []
    for i, seg in enumerate(segments):
        if not isinstance(seg, dict) or "start" not in seg or "start_ratio" not in seg:
            raise ValueError(f"lr schedule segment {i}: not a segment ({seg!r})")
        parts.append((int(seg["start"]), _segment_fn({**seg, **_checked_spec(seg, f"lr schedule segment {i}")})))
    if parts[0][0] != 0 or any(b[0] <= a[0] for a, b in zip(parts, parts[1:])):
        raise ValueError("lr schedule: segments must start at 0 and at increasing steps")

    def fn(step: int) -> float:
        for start, seg_fn in reversed(parts):
            if step >= start:
                return seg_fn(step)
        return parts[0][1](step)
    return fn


def _describe(seg: Dict) -> str:
    return (f"{seg['schedule']} to {seg['total']} steps, warmup {seg['warmup']}, "
            f"min_lr_ratio {seg['min_ratio']}")


def resume_schedule(segments: List[Dict], spec: Dict, at_step: int) -> Tuple[List[Dict], Optional[str]]:
    """(segments, message): the recorded segments, plus a new one at `at_step` when this run's
    schedule spec differs from the last segment's (rule: module docstring). ValueError when
    the new total is not after at_step."""
    spec = _checked_spec(spec, "schedule spec")
    last = segments[-1]
    if all(last[k] == spec[k] for k in spec):
        return list(segments), None
    if spec["total"] <= at_step:
        raise ResumeArgsError(f"cannot resume at step {at_step} with a schedule of {spec['total']} steps: the "
                              f"checkpoint is already past the new end; give --steps > {at_step}")
    if last["start"] == at_step and len(segments) > 1:   # a rebuild at this same step: replace it
        base, ratio = list(segments[:-1]), float(last["start_ratio"])
    else:
        base, ratio = list(segments), float(schedule_lambda(segments)(at_step))
    new = {"start": int(at_step), "start_ratio": ratio, **spec}
    message = (f"lr schedule rebuilt at step {at_step}: {_describe(last)} -> {_describe(spec)}; the multiplier "
               f"continues from {ratio:.6g} (no jump)")
    return base + [new], message


# --------------------------------------------------------------------------- a resume's plan
@dataclass
class ResumePlan:
    """What a resume applies: the argument changes, the schedule to install and record."""
    changes: ArgChanges
    schedule: List[Dict]
    at_step: int
    rebuilt: bool
    messages: List[str]


def plan_resume(point, current_args: Dict, overrides: Union[str, Iterable[str], None], spec: Dict) -> ResumePlan:
    """check_resume_args against the checkpoint's record + the schedule for this run.

    point: a checkpoint.ResumePoint; current_args: `record_run_args` of this run; spec:
    `schedule_spec(args, total_steps)`. Raises ResumeArgsError when the run cannot resume."""
    saved = point.run_args
    messages = []
    if saved is None:
        changes = ArgChanges()
        messages.append(f"{point.tag} records no run arguments (written by an older vlmo_fast): "
                        "changed arguments cannot be detected for this resume")
    else:
        changes = check_resume_args(saved, current_args, overrides)
    messages += changes.messages()
    at = point.scheduler_step if point.scheduler_step is not None else point.step
    recorded = point.schedule or initial_schedule(spec)
    segments, note = resume_schedule(recorded, spec, at)
    if note:
        messages.append(note)
    return ResumePlan(changes, segments, at, note is not None, messages)


def capture_settings(optimizer, scheduler) -> Dict:
    """The optimizer's and scheduler's hyperparameters as the job built them for THIS run,
    taken before DeepSpeed's load restores the recorded ones."""
    keys = ("lr", "initial_lr", "weight_decay", "betas", "lr_scale")
    return {"groups": [{k: copy.deepcopy(g[k]) for k in keys if k in g} for g in optimizer.param_groups],
            "base_lrs": list(scheduler.base_lrs), "clip_grad": getattr(optimizer, "clip_grad", None)}


def apply_overrides(optimizer, scheduler, plan: ResumePlan, fresh: Dict) -> List[str]:
    """After DeepSpeed's load: set the overridden hyperparameters from `fresh`
    (`capture_settings` before the load) and install the plan's schedule. Sets each group's
    lr / initial_lr / lr_scale, the scheduler's base_lrs, weight_decay, betas and the
    optimizer's clipping (ZeRO-1/2 and bf16 restore it from the checkpoint). Returns what was
    applied. Nothing changes when nothing was overridden and the schedule was not rebuilt."""
    groups = optimizer.param_groups
    if len(groups) != len(fresh["groups"]):
        raise ValueError(f"the optimizer has {len(groups)} parameter groups; the checkpoint's has "
                         f"{len(fresh['groups'])}")
    keys = set(plan.changes.overrides)
    applied = []
    if keys & LR_KEYS:
        for g, f in zip(groups, fresh["groups"]):
            g["initial_lr"] = f["initial_lr"]
            if "lr_scale" in f:
                g["lr_scale"] = f["lr_scale"]
        scheduler.base_lrs = list(fresh["base_lrs"])
        applied.append("learning rates")
    for name in ("weight_decay", "betas"):
        if name in keys:
            for g, f in zip(groups, fresh["groups"]):
                g[name] = copy.deepcopy(f[name])
            applied.append(name)
    if "clip" in keys and fresh["clip_grad"] is not None:
        optimizer.clip_grad = fresh["clip_grad"]
        applied.append("clip")
    fn = schedule_lambda(plan.schedule)
    scheduler.lr_lambdas = [fn] * len(groups)
    if plan.rebuilt or keys & LR_KEYS:
        for g, base in zip(groups, scheduler.base_lrs):
            g["lr"] = base * fn(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in groups]
        applied.append("schedule")
    return applied
