"""Stagewise VLMo pretraining under DeepSpeed: `deepspeed train/pretrain.py ...` (any number of
processes) or `python train/pretrain.py ...` (one process). See `--help`.

Stages (`--stage vision|text|vl|all`): vision = masked image modelling; text = text-only MLM
with the reference's frozen set; vl = ITC + ITM (global hard negatives) + MLM on image-text
pairs, everything trained. `all` runs them in order (`--skip-text-stage` leaves out text), each
from the previous stage's exported weights, and ends with a zero-shot retrieval evaluation.

Output folder (per stage): checkpoints/ (DeepSpeed + client state, keep-last-K, `latest`),
final/ (save_pretrained weights + config + tokenizer, then DONE), metrics.jsonl,
tensorboard/, curves.png; at the end of vl: retrieval_<split>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..io import atomic_write_json

STAGE_ORDER = ("vision", "text", "vl")
# Fault injection for tests: "kill_after_step:N", "kill_in_checkpoint:N" (SIGKILL on rank 0;
# in_checkpoint = after the checkpoint's files, before the `latest` pointer moves) or
# "nan_inputs_at_step:N" (step N's float inputs become NaN on every rank, as bad data would).
FAULT_ENV = "VLMO_FAST_FAULT"


class NonFiniteLoss(RuntimeError):
    pass


# --------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train/pretrain.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--stage", default="all", choices=["vision", "text", "vl", "all"])
    a("--output-dir", required=True, help="where checkpoints, weights, logs and plots go")
    a("--preset", default=None, help="VLMoConfig preset for a new model (default tiny; with --init "
      "the checkpoint's config is used and a different --preset is an error)")
    a("--model-overrides", default=None, help='JSON of VLMoConfig fields, e.g. \'{"img_size": 64}\'')
    a("--data", default="embedded", help="data source for vlmo_fast.data: 'embedded' or a path")
    a("--tokenizer", default=None, help="'embedded' (WordPiece trained on the embedded world) or a "
      "vocab.txt / tokenizer folder (default: embedded for embedded data)")
    a("--vocab-size", type=int, default=1000, help="vocabulary of the embedded tokenizer")
    a("--init", default=None, help="save_pretrained folder to start the first stage from")
    a("--init-beit", default=None, help="timm BEiT checkpoint: replaces the vision stage")
    a("--from-scratch", action="store_true", help="allow --stage text/vl without previous weights")
    a("--skip-text-stage", action="store_true", help="ablation: `all` runs vision then vl")
    a("--ffn", default="mome", choices=["mome", "shared"], help="ablation: one FFN for all modalities")
    a("--hard-negatives", default="global", choices=["global", "local", "none"])
    a("--itc-accum", default="standard", choices=["standard", "cached"],
      help="standard: ITC over each micro-batch's global batch; cached: GradCache, one ITC over "
      "the whole accumulated batch")
    a("--layout", default="auto", choices=["auto", "packed", "padded"],
      help="packed sequences (auto on CUDA) or padded passes with trimmed text (auto on CPU)")
    a("--steps", type=int, default=100, help="optimizer steps per stage")
    a("--vision-steps", type=int, default=None)
    a("--text-steps", type=int, default=None)
    a("--vl-steps", type=int, default=None)
    a("--batch-size", type=int, default=32, help="micro-batch per process")
    a("--grad-accum", type=int, default=1)
    a("--lr", type=float, default=2e-4)
    a("--vision-lr", type=float, default=None)
    a("--text-lr", type=float, default=None)
    a("--vl-lr", type=float, default=None)
    a("--weight-decay", type=float, default=0.01)
    a("--betas", type=float, nargs=2, default=(0.9, 0.98))
    a("--warmup-steps", type=int, default=None, help="default: 10%% of the stage's steps")
    a("--schedule", default="linear", choices=["cosine", "linear", "constant"])
    a("--min-lr-ratio", type=float, default=0.0)
    a("--clip", type=float, default=1.0, help="gradient clipping (global norm); 0 disables")
    a("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA, fp32 on CPU")
    a("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    a("--loss-weights", default=None, help="e.g. itc=1,itm=1,mlm=0.25 (vl stage)")
    a("--mlm-probability", type=float, default=0.15)
    a("--mask-ratio", type=float, default=0.4, help="MIM: fraction of patches masked (blockwise)")
    a("--num-workers", type=int, default=0)
    a("--seed", type=int, default=0)
    a("--log-every", type=int, default=10, help="host sync + JSONL/TensorBoard every N steps")
    a("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    a("--keep-last", type=int, default=2)
    a("--resume", default="auto", choices=["auto", "never"],
      help="auto: continue from the last complete checkpoint / finished stages in --output-dir")
    a("--skip-nonfinite", action="store_true",
      help="skip a step whose loss is NaN/inf (counted; costs a host sync per step) instead of stopping")
    a("--eval-split", default="test", help="held-out split for the final retrieval evaluation")
    a("--eval-images", type=int, default=None, help="limit the evaluation set's images")
    a("--rerank-k", type=int, default=16)
    a("--no-eval", action="store_true")
    a("--no-progress", action="store_true", help="no tqdm bar")
    a("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
      help=argparse.SUPPRESS)
    try:
        import deepspeed
        deepspeed.add_config_arguments(p)
    except ImportError:  # checked in validate_args with a clear message
        a("--deepspeed_config", default=None)
    return p


def stage_plan(args) -> List[str]:
    if args.stage != "all":
        return [args.stage]
    plan = list(STAGE_ORDER)
    if args.skip_text_stage:
        plan.remove("text")
    if args.init_beit:
        plan.remove("vision")
    return plan


def parse_loss_weights(text: Optional[str]) -> Dict[str, float]:
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(f"--loss-weights: expected name=value items, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise ValueError(f"--loss-weights: {k}={v!r} is not a number") from None
    unknown = set(out) - {"itc", "itm", "mlm"}
    if unknown:
        raise ValueError(f"--loss-weights: unknown objective(s) {sorted(unknown)}; expected itc, itm, mlm")
    return out


def validate_args(args) -> None:
    """Every check that needs no work: raise before a process group, model or data exists."""
    def bad(msg):
        raise ValueError(msg)
    for name in ("steps", "batch_size", "grad_accum", "log_every", "save_every", "keep_last"):
        if getattr(args, name) < 1:
            bad(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("vision_steps", "text_steps", "vl_steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            bad(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.lr <= 0 or any((getattr(args, f"{s}_lr") or 1) <= 0 for s in STAGE_ORDER):
        bad("learning rates must be > 0")
    if args.weight_decay < 0:
        bad(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.clip < 0:
        bad(f"--clip must be >= 0, got {args.clip}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        bad(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if not 0 < args.mlm_probability < 1 or not 0 < args.mask_ratio < 1:
        bad("--mlm-probability and --mask-ratio must be in (0, 1)")
    if not 0 <= args.min_lr_ratio <= 1:
        bad(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.itc_accum == "cached" and args.grad_accum < 2:
        bad("--itc-accum cached needs --grad-accum >= 2 (it spans the accumulated micro-batches)")
    if args.itc_accum == "cached" and args.skip_nonfinite:
        bad("--skip-nonfinite does not combine with --itc-accum cached (a cached ITC step spans "
            "every micro-batch; it cannot drop one)")
    parse_loss_weights(args.loss_weights)
    if args.model_overrides:
        try:
            ov = json.loads(args.model_overrides)
        except json.JSONDecodeError as e:
            bad(f"--model-overrides is not valid JSON: {e}")
        if not isinstance(ov, dict):
            bad("--model-overrides must be a JSON object")
    if args.data != "embedded" and not Path(args.data).exists():
        bad(f"--data {args.data}: no such file or folder (use 'embedded' for the built-in data)")
    if args.tokenizer not in (None, "embedded") and not Path(args.tokenizer).exists():
        bad(f"--tokenizer {args.tokenizer}: no such file or folder")
    for flag in ("init", "init_beit"):
        v = getattr(args, flag)
        if v is not None and not Path(v).exists():
            bad(f"--{flag.replace('_', '-')} {v}: no such file or folder")
    if args.init and not (Path(args.init) / "config.json").is_file():
        bad(f"--init {args.init}: not a save_pretrained folder (no config.json)")
    if args.init and args.init_beit:
        bad("give --init or --init-beit, not both")
    plan = stage_plan(args)
    if args.stage == "text" and not (args.init or args.init_beit or args.from_scratch):
        bad("--stage text needs vision weights: --init <vision stage's final/ folder> or "
            "--init-beit <BEiT checkpoint> (or --from-scratch to train text on a random model)")
    if args.stage == "vl" and not (args.init or args.init_beit or args.from_scratch):
        bad("--stage vl needs the previous stages' weights: --init <final/ folder> "
            "(or --from-scratch)")
    if args.stage == "vision" and args.init_beit:
        bad("--init-beit replaces the vision stage: run --stage text or all with it")
    if not plan:
        bad("nothing to run")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        bad("deepspeed is not installed: pip install deepspeed (the job runs on its engine)")
    if args.deepspeed_config is not None:
        from .engine import build_ds_config, load_ds_config
        build_ds_config(load_ds_config(args.deepspeed_config), micro_batch=args.batch_size,
                        grad_accum=args.grad_accum, clip=args.clip, bf16=False)


# --------------------------------------------------------------------------- pieces

def _fault(point: str, step: int, rank: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec or rank != 0:
        return
    kind, _, at = spec.partition(":")
    if kind == point and int(at) == step:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _poison_if_asked(batch: Dict, step: int) -> Dict:
    kind, _, at = os.environ.get(FAULT_ENV, "").partition(":")
    if kind == "nan_inputs_at_step" and int(at) == step:
        return {k: (torch.full_like(v, float("nan")) if isinstance(v, torch.Tensor) and v.is_floating_point()
                    else v) for k, v in batch.items()}
    return batch


def _grad_norm(module) -> Optional[torch.Tensor]:
    """Global gradient norm before the optimizer step (DeepSpeed reports none without ZeRO)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else None


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def to_device(batch: Dict, device: torch.device) -> Dict:
    """A batch dict's tensors on `device` (non-blocking from pinned memory)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (shared by the training jobs)."""
    import random
    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _enable_activation_checkpointing(model) -> None:
    """Recompute each block's forward in backward (torch.utils.checkpoint, non-reentrant);
    state_dict names are unchanged (the instance's forward is wrapped)."""
    from torch.utils.checkpoint import checkpoint
    for blk in model.blocks:
        inner = blk.forward

        def forward(*a, _inner=inner, **kw):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *a, use_reentrant=False, **kw)
            return _inner(*a, **kw)
        blk.forward = forward


class Batches:
    """Endless iterator over the loader's epochs; the loader's state_dict is the position."""

    def __init__(self, loader):
        self.loader = loader
        self.it = None
        self.epoch = None

    def next(self):
        # A DataLoader iterator draws its base seed from the global torch RNG when it starts:
        # keep the loader out of the training stream, or a resumed run (new iterator
        # mid-epoch) would draw drop paths differently from the uninterrupted one.
        with torch.random.fork_rng(devices=[]):
            return self._next()

    def _next(self):
        while True:
            if self.it is None:
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                state = self.loader.state_dict()
                self.loader.set_epoch(int(state.get("epoch", 0)) + 1)
                self.it = None


# --------------------------------------------------------------------------- the job

class Job:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.output_dir)
        from .engine import init_distributed
        self.rank, self.world, self.device = init_distributed()
        self.is_main = self.rank == 0
        if args.precision == "auto":
            self.bf16 = self.device.type == "cuda"
        else:
            self.bf16 = args.precision == "bf16"
        if self.bf16 and self.device.type != "cuda":
            raise ValueError("--precision bf16 needs CUDA; this run is on the CPU (use fp32)")

    def log(self, *msg):
        if self.is_main:
            print(*msg, flush=True)

    # -- data / model ------------------------------------------------------------------------
    def tokenizer(self):
        from ..data import build_tokenizer
        source = self.args.tokenizer or ("embedded" if self.args.data == "embedded" else None)
        if source is None:
            raise ValueError("--tokenizer is required with --data PATH (a BERT vocab.txt or folder)")
        return build_tokenizer(source=source, vocab_size=self.args.vocab_size)

    def base_config(self, tok):
        from ..config import VLMoConfig
        overrides = json.loads(self.args.model_overrides) if self.args.model_overrides else {}
        if self.args.init:
            cfg = VLMoConfig.from_json(Path(self.args.init) / "config.json")
            if self.args.preset and cfg.name != self.args.preset:
                raise ValueError(f"--init {self.args.init} holds a {cfg.name!r} model but --preset is "
                                 f"{self.args.preset!r}")
            if overrides:
                raise ValueError("--model-overrides cannot change a model loaded with --init")
        else:
            cfg = VLMoConfig.preset(self.args.preset or "tiny", **overrides)
            if "vocab_size" not in overrides:
                cfg = cfg.replace(vocab_size=tok.vocab_size)
        if cfg.vocab_size < tok.vocab_size:
            raise ValueError(f"the model's vocab_size ({cfg.vocab_size}) is smaller than the "
                             f"tokenizer's ({tok.vocab_size})")
        return cfg

    def stage_steps(self, stage):
        return getattr(self.args, f"{stage}_steps") or self.args.steps

    def stage_lr(self, stage):
        return getattr(self.args, f"{stage}_lr") or self.args.lr

    def run(self) -> Dict:
        args = self.args
        plan = stage_plan(args)
        tok = self.tokenizer()
        config = self.base_config(tok)
        self.log(f"vlmo_fast pretrain: stages {plan}, {self.world} process(es) on {self.device}, "
                 f"{'bf16' if self.bf16 else 'fp32'}, preset {config.name} "
                 f"(dim {config.dim}, depth {config.depth}, img {config.img_size}, vocab {config.vocab_size})")
        previous = args.init
        result = {}
        for stage in plan:
            final = self.out / stage / "final"
            if args.resume == "auto" and (final / "DONE").is_file():
                self.log(f"[{stage}] finished earlier: {final}")
                previous = str(final)
                continue
            result[stage] = self.run_stage(stage, config, tok, previous)
            previous = str(final)
        if "vl" in plan and not args.no_eval:
            result["retrieval"] = self.evaluate(previous, tok)
        return result

    def build_model(self, stage, config, previous):
        from ..checkpoint import load_beit_state_dict
        from ..model import VLMo
        if previous is not None:
            # from_pretrained returns eval mode (HF convention): this model trains
            model = VLMo.from_pretrained(previous).train()
            if model.config.to_dict() != {**config.to_dict(), "name": model.config.name}:
                raise ValueError(f"{previous} holds a model whose config differs from this run's")
        else:
            model = VLMo(config)
            if self.args.init_beit and stage != "vision":
                state = torch.load(self.args.init_beit, map_location="cpu", weights_only=False)
                load_beit_state_dict(model, state)
        return model

    # -- one stage ---------------------------------------------------------------------------
    def run_stage(self, stage, config, tok, previous) -> Dict:
        import torch.distributed as dist
        from ..data import build_pretrain_loader
        from .checkpoint import latest_tag, load_checkpoint, rng_state, save_checkpoint, set_rng_state
        from .engine import build_ds_config, build_engine, gathered_state_dict, load_ds_config
        from .logs import MetricsLogger, StepBuffer, nonfinite, plot_curves
        from .stages import prepare_stage
        from .step import PretrainStep, cached_itc_accumulation
        args = self.args
        stage_dir = self.out / stage
        ckpt_dir = stage_dir / "checkpoints"
        total = self.stage_steps(stage)
        stage_seed = args.seed * 1000 + STAGE_ORDER.index(stage) * 100 + self.rank
        seed_all(stage_seed)

        model = self.build_model(stage, config, previous)
        prepare_stage(model, stage, args.ffn)
        if args.activation_checkpointing:
            _enable_activation_checkpointing(model)
        gen = torch.Generator(device=self.device).manual_seed(stage_seed + 7)
        step_module = PretrainStep(model, stage, hard_negatives=args.hard_negatives, layout=args.layout,
                                   loss_weights=parse_loss_weights(args.loss_weights),
                                   mlm_probability=args.mlm_probability, generator=gen).to(self.device)
        trainable = sum(p.numel() for p in step_module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in step_module.parameters() if not p.requires_grad)

        loader = build_pretrain_loader(
            source=args.data, tokenizer=tok, stage=stage, batch_size=args.batch_size,
            rank=self.rank, world=self.world, seed=args.seed + STAGE_ORDER.index(stage),
            world_seed=args.seed,
            img_size=config.img_size, patch_size=config.patch_size, max_text_len=config.max_text_len,
            split="train", num_workers=args.num_workers, mlm_probability=args.mlm_probability,
            mask_ratio=args.mask_ratio)
        warmup = args.warmup_steps if args.warmup_steps is not None else max(1, total // 10)
        ds_config = build_ds_config(load_ds_config(args.deepspeed_config), micro_batch=args.batch_size,
                                    grad_accum=args.grad_accum, clip=args.clip, bf16=self.bf16)
        engine = build_engine(step_module, ds_config, lr=self.stage_lr(stage), weight_decay=args.weight_decay,
                              betas=args.betas, total_steps=total, warmup_steps=min(warmup, total),
                              schedule=args.schedule, min_lr_ratio=args.min_lr_ratio)
        step, skipped, last_good = 0, 0, None
        history_tail: List[Dict] = []
        if args.resume == "auto" and latest_tag(ckpt_dir) is not None:
            client = load_checkpoint(engine, ckpt_dir, self.rank)
            step, skipped = client["step"], client["skipped"]
            loader.load_state_dict(client["data"])
            set_rng_state(client["rng"], {"hard_negatives": gen})
            last_good = str(ckpt_dir / latest_tag(ckpt_dir))
            self.log(f"[{stage}] resumed from {last_good} at step {step}")
        self.log(f"[{stage}] {trainable / 1e6:.3f}M trainable, {frozen / 1e6:.3f}M frozen parameters; "
                 f"{total} steps x {args.batch_size} x {args.grad_accum} accum x {self.world} procs; "
                 f"ZeRO-{ds_config['zero_optimization'].get('stage', 0)}")
        logger = MetricsLogger(stage_dir, stage, enabled=self.is_main, resume_step=step)
        batches = Batches(loader)
        buffer = StepBuffer()
        bar = None
        if self.is_main and not args.no_progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=step, desc=stage, dynamic_ncols=True, file=sys.stdout)
        samples_per_step = args.batch_size * args.grad_accum * self.world
        t_last, step_last = time.perf_counter(), step
        cached = args.itc_accum == "cached" and stage == "vl"
        zero = ds_config["zero_optimization"].get("stage", 0)
        grad_norm_own = None

        def save(at_step):
            client = {"step": at_step, "skipped": skipped, "data": loader.state_dict(),
                      "rng": lambda: rng_state({"hard_negatives": gen})}  # taken at write time
            tag = save_checkpoint(engine, ckpt_dir, at_step, client, self.rank, args.keep_last,
                                  fault_hook=lambda point, s: _fault("kill_in_checkpoint", s, self.rank))
            return str(ckpt_dir / tag)

        def flush(at_step):
            nonlocal t_last, step_last
            rows = buffer.flush()
            now = time.perf_counter()
            done = at_step - step_last
            if rows:
                rows[-1]["samples_per_s"] = samples_per_step * done / max(now - t_last, 1e-9)
                rows[-1]["peak_memory_mb"] = _peak_memory_mb(self.device)
                rows[-1]["skipped_steps"] = skipped
            t_last, step_last = now, at_step
            for r in rows:
                if nonfinite(r, [k for k in r if k not in ("grad_norm",)]):
                    losses = {k: v for k, v in r.items() if k != "step"}
                    raise NonFiniteLoss(
                        f"[{stage}] non-finite loss at step {r['step']}: {losses}. Last good checkpoint: "
                        f"{last_good or 'none (no checkpoint yet)'}. Lower the lr, check the data, or "
                        f"rerun with --skip-nonfinite")
            logger.log(rows)
            history_tail.extend(rows)
            if bar is not None and rows:
                r = rows[-1]
                bar.set_postfix({k: f"{r[k]:.3f}" for k in ("loss", "mim", "mlm", "itc", "itm") if k in r}
                                | {"samples/s": f"{r.get('samples_per_s', 0):.1f}"}, refresh=False)

        while step < total:
            micro = [_poison_if_asked(to_device(batches.next(), self.device), step + 1)
                     for _ in range(args.grad_accum)]
            outs = []
            lr_now = engine.lr_scheduler.get_last_lr()[0]  # the lr this step uses
            if cached:
                outs, _ = cached_itc_accumulation(engine, engine.backward, micro,
                                                  after_backward=lambda k: engine.step())
            else:
                for mb in micro:
                    out = engine(mb)
                    if args.skip_nonfinite:
                        ok = torch.isfinite(out["loss"].detach()).float().reshape(1)
                        if self.world > 1:
                            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
                        if ok.item() < 1:
                            skipped += 1
                            continue
                    engine.backward(out["loss"])
                    if zero == 0 and engine.is_gradient_accumulation_boundary():
                        grad_norm_own = _grad_norm(step_module)
                    engine.step()
                    outs.append(out)
            step += 1
            if outs:
                metrics = {"loss": torch.stack([o.get("loss_value", o["loss"]).detach().float()
                                                for o in outs]).mean()}
                for k in outs[0]["metrics"]:
                    metrics[k] = torch.stack([o["metrics"][k].float().reshape(()) for o in outs]).mean()
                metrics["lr"] = torch.tensor(lr_now)
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is None:
                    grad_norm = grad_norm_own
                if grad_norm is not None:
                    metrics["grad_norm"] = torch.as_tensor(grad_norm, dtype=torch.float32).reshape(())
                buffer.add(step, metrics)
            if bar is not None:
                bar.update(1)
            saving = step % args.save_every == 0 or step == total
            if step % args.log_every == 0 or saving:
                flush(step)  # also: never checkpoint weights that a NaN already reached
            if saving:
                last_good = save(step)
            _fault("kill_after_step", step, self.rank)
        flush(step)
        if bar is not None:
            bar.close()

        # export: plain VLMo weights + tokenizer, then the DONE marker
        state = gathered_state_dict(engine, self.rank)
        final = stage_dir / "final"
        summary = {}
        if self.is_main:
            from ..model import VLMo
            export = VLMo(model.config)
            export.load_state_dict(state, strict=True)
            export.save_pretrained(final)
            tok.save(final)
            rows = logger.read()
            plot_curves(rows, stage_dir / "curves.png", f"{stage} stage")
            last = rows[-1] if rows else {}
            summary = {"stage": stage, "steps": step, "skipped_steps": skipped, "final": str(final),
                       "last_metrics": last, "world_size": self.world}
            atomic_write_json(final / "DONE", summary)
            self.log(f"[{stage}] done: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()
                                                     if k in ("loss", "mim", "mlm", "itc", "itm", "itm_acc")))
            self.log(f"[{stage}] weights: {final}; curves: {stage_dir / 'curves.png'}")
        logger.close()
        dist.barrier()
        engine.destroy()
        return summary

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, weights: str, tok) -> Dict:
        import torch.distributed as dist
        result = {}
        if self.is_main:
            from ..data import build_retrieval_eval_set
            from ..eval.retrieval import chance_recall, evaluate_retrieval
            from ..model import VLMo
            model = VLMo.from_pretrained(weights).to(self.device)
            c = model.config
            ev = build_retrieval_eval_set(source=self.args.data, tokenizer=tok, split=self.args.eval_split,
                                          img_size=c.img_size, max_text_len=c.max_text_len,
                                          num_images=self.args.eval_images, seed=self.args.seed)
            res = evaluate_retrieval(model, ev.images, ev.text_ids, ev.text_mask, ev.text_to_image,
                                     rerank_k=self.args.rerank_k, device=self.device)
            chance = chance_recall(ev.text_to_image, int(ev.images.shape[0]))
            result = {"split": self.args.eval_split, "weights": weights, **res.to_dict(), "chance": chance}
            path = self.out / f"retrieval_{self.args.eval_split}.json"
            atomic_write_json(path, result)
            print(f"zero-shot retrieval on the held-out '{self.args.eval_split}' split "
                  f"({res.num_images} images, {res.num_texts} captions):")
            print(res.summary())
            print("chance:   " + " ".join(f"{k}={100 * v:.2f}" for k, v in chance.items()))
            print(f"saved {path}")
        dist.barrier()
        return result


def main(argv=None) -> Dict:
    args = build_parser().parse_args(argv)
    try:
        validate_args(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    job = Job(args)
    try:
        return job.run()
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(3)
