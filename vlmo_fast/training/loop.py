"""THE training loop: one implementation for every pretraining stage and fine-tuning task.

    step module (the step protocol, below) ──► DeepSpeed engine ──► TrainLoop(...).run()
                                                                     │
       every step: grad_accum micro-batches: engine(batch) -> {"loss", "metrics"}
                   -> (non-finite check) -> engine.backward -> engine.step
       every log_every steps: ONE host sync -> JSONL + TensorBoard + tqdm (non-finite -> stop)
       every save_every steps and at the end: atomic checkpoint (model, optimizer, scheduler,
                   RNG of every stream, loader position, run arguments)
       at the end: the job's `export` hook (weights + tokenizer + DONE), curves.png

The step protocol (what `vlmo_fast.StepModule`, `PretrainStep` and the fine-tuning steps
implement): `module(batch) -> {"loss": scalar tensor with graph, "metrics": {name: 0-d
tensor}}`, optionally "loss_value" (the loss to report when "loss" carries extra terms);
optional `external_parameters()` (parameters ZeRO-3 must gather for the whole step) and
`head_parameter_names()` (parameters that take the head learning rate when fine-tuning).

The loop owns resume (`resume()`), logging, the non-finite policy (`--skip-nonfinite` or stop
with `NonFiniteLoss`, exit code 3), checkpoints and fault injection (tests); jobs own models,
data, evaluation and what a finished run exports.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from ..distributed import all_reduce
from ..errors import NonFiniteLoss
from . import faults
from .common import Batches, grad_norm, peak_memory_mb, to_device
from .logs import MetricsLogger, StepBuffer, nonfinite, plot_curves

# metrics shown on the progress bar when a step reports them
BAR_METRICS = ("loss", "mim", "mlm", "itc", "itm", "vqa_score", "nlvr2_acc")


class TrainLoop:
    """Runs `total_steps` optimizer steps of `engine` over `loader`, with checkpoints in
    `out_dir / "checkpoints"`, metrics in `out_dir / "metrics.jsonl"`.

    args: the job's parsed arguments (grad_accum, log_every, save_every, keep_last, resume,
    skip_nonfinite, no_progress, batch_size, ...), recorded in every checkpoint.
    generators: the job's own random streams, saved and restored with the global RNGs.
    ds_config: the DeepSpeed config the engine was built with (recorded in checkpoints).
    accumulate: replaces the plain micro-batch loop for one optimizer step:
    `accumulate(engine, micro_batches) -> [outputs]` (GradCache ITC uses it); it must call
    engine.backward / engine.step itself.
    """

    def __init__(self, *, name: str, engine, step_module: torch.nn.Module, loader, out_dir,
                 total_steps: int, args, rank: int, world: int, device: torch.device,
                 generators: Optional[Dict[str, torch.Generator]] = None,
                 ds_config: Optional[Dict] = None, accumulate: Optional[Callable] = None,
                 log: Optional[Callable] = None, title: Optional[str] = None):
        self.name, self.title = name, title or name
        self.engine, self.step_module, self.loader = engine, step_module, loader
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.total, self.args = int(total_steps), args
        self.rank, self.world, self.device = rank, world, device
        self.is_main = rank == 0
        self.generators = dict(generators or {})
        self.accumulate = accumulate
        self.log = log or ((lambda *m: print(*m, flush=True)) if self.is_main else (lambda *m: None))
        self.step, self.skipped = 0, 0
        self.last_good: Optional[str] = None
        self._own_grad_norm: Optional[torch.Tensor] = None   # computed here without ZeRO
        zero = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
        self.zero_stage = int(zero or 0)
        from .checkpoint import new_lineage
        from .resume import initial_schedule, record_run_args, schedule_spec
        # what every checkpoint records: the run's arguments + facts the flags do not show,
        # the lr schedule's segments, and the lineage that pruning stays inside
        self.run_args = record_run_args(args, world_size=world, zero_stage=self.zero_stage,
                                        **({"ds_config": ds_config} if ds_config is not None else {}))
        self.schedule_spec = schedule_spec(args, self.total)
        self.schedule = initial_schedule(self.schedule_spec)
        self.lineage = new_lineage()

    # -- resume / save -----------------------------------------------------------------------
    def resume(self) -> int:
        """Continue from the newest complete checkpoint in out_dir (`--resume auto|strict`; a
        damaged one is skipped with a warning under auto, refused under strict); returns the
        step reached (0 for a fresh run). Changed run arguments are refused, or applied when
        named in --override-on-resume; a changed schedule length is rebuilt (training.resume)."""
        from .checkpoint import find_resume_checkpoint, load_checkpoint, set_rng_state
        from .resume import plan_resume
        trust = bool(getattr(self.args, "trust_pickle", False))
        point = find_resume_checkpoint(self.ckpt_dir, self.args.resume, trust_pickle=trust)
        if point is None:
            return 0
        plan = plan_resume(point, self.run_args, self.args.override_on_resume, self.schedule_spec)
        for message in plan.messages:
            self.log(f"[{self.name}] {message}")
        client = load_checkpoint(self.engine, point, self.rank, plan=plan, trust_pickle=trust)
        self.lineage, self.schedule = point.lineage or self.lineage, plan.schedule
        self.step, self.skipped = client["step"], client.get("skipped", 0)
        self.loader.load_state_dict(client["data"])
        set_rng_state(client["rng"], self.generators)
        self.last_good = str(point.path)
        self.log(f"[{self.name}] resumed from {self.last_good} at step {self.step}")
        return self.step

    def save(self, at_step: int) -> str:
        """Collective: an atomic checkpoint of everything a bitwise resume needs, with its
        integrity manifest, the run's arguments and its lr schedule."""
        from .checkpoint import rng_state, save_checkpoint
        client = {"step": at_step, "skipped": self.skipped, "data": self.loader.state_dict(),
                  "rng": lambda: rng_state(self.generators)}  # taken at write time
        tag = save_checkpoint(self.engine, self.ckpt_dir, at_step, client, self.rank, self.args.keep_last,
                              faults.checkpoint_hook(self.rank), lineage=self.lineage,
                              run_args=self.run_args, schedule=self.schedule)
        self.last_good = str(self.ckpt_dir / tag)
        return self.last_good

    # -- one optimizer step ------------------------------------------------------------------
    def _all_finite(self, loss: torch.Tensor) -> bool:
        ok = torch.isfinite(loss.detach()).float().reshape(1)
        return bool(all_reduce(ok, "min").item() >= 1)   # every rank skips, or none

    def _micro_steps(self, micro: List[Dict]) -> List[Dict]:
        engine, outs = self.engine, []
        self._own_grad_norm = None
        for mb in micro:
            out = engine(mb)
            if self.args.skip_nonfinite and not self._all_finite(out["loss"]):
                self.skipped += 1   # every rank agrees (all-reduced): nobody runs backward
                continue
            engine.backward(out["loss"])
            if self.zero_stage == 0 and engine.is_gradient_accumulation_boundary():
                self._own_grad_norm = grad_norm(self.step_module)
            engine.step()
            outs.append(out)
        return outs

    def _metrics(self, outs: List[Dict], lr: float) -> Dict[str, torch.Tensor]:
        metrics = {"loss": torch.stack([o.get("loss_value", o["loss"]).detach().float()
                                        for o in outs]).mean(),
                   "lr": torch.tensor(lr)}
        for k in outs[0]["metrics"]:
            metrics[k] = torch.stack([o["metrics"][k].float().reshape(()) for o in outs]).mean()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._own_grad_norm
        if norm is not None:
            metrics["grad_norm"] = torch.as_tensor(norm, dtype=torch.float32).reshape(())
        return metrics

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> Dict:
        """Train to total_steps; returns {"steps", "skipped_steps", "last_metrics"}."""
        args = self.args
        logger = MetricsLogger(self.out_dir, self.name, enabled=self.is_main, resume_step=self.step,
                               resumed_from=self.last_good)
        batches, buffer = Batches(self.loader), StepBuffer()
        bar = None
        if self.is_main and not args.no_progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total, initial=self.step, desc=self.name, dynamic_ncols=True, file=sys.stdout)
        samples_per_step = args.batch_size * args.grad_accum * self.world
        clock = {"t": time.perf_counter(), "step": self.step}

        def flush(at_step):
            rows = buffer.flush()
            now = time.perf_counter()
            if rows:
                done = max(at_step - clock["step"], 1)
                rows[-1]["samples_per_s"] = samples_per_step * done / max(now - clock["t"], 1e-9)
                rows[-1]["peak_memory_mb"] = peak_memory_mb(self.device)
                rows[-1]["skipped_steps"] = self.skipped
            clock.update(t=now, step=at_step)
            for r in rows:
                if nonfinite(r, [k for k in r if k != "grad_norm"]):
                    losses = {k: v for k, v in r.items() if k != "step"}
                    raise NonFiniteLoss(
                        f"[{self.name}] non-finite loss at step {r['step']}: {losses}. Last good checkpoint: "
                        f"{self.last_good or 'none (no checkpoint yet)'}. Lower the lr, check the data, or "
                        f"rerun with --skip-nonfinite")
            logger.log(rows)
            if bar is not None and rows:
                r = rows[-1]
                bar.set_postfix({k: f"{r[k]:.3f}" for k in BAR_METRICS if k in r}
                                | {"samples/s": f"{r.get('samples_per_s', 0):.1f}"}, refresh=False)

        try:
            while self.step < self.total:
                micro = [faults.poison_batch(to_device(batches.next(), self.device), self.step + 1)
                         for _ in range(args.grad_accum)]
                lr_now = self.engine.lr_scheduler.get_last_lr()[0]  # the lr this step uses
                set_step = getattr(self.step_module, "set_step", None)
                if callable(set_step):      # steps whose behaviour depends on the step (warm-ups)
                    set_step(self.step + 1)
                outs = (self.accumulate(self.engine, micro) if self.accumulate is not None
                        else self._micro_steps(micro))
                self.step += 1
                if outs:
                    buffer.add(self.step, self._metrics(outs, lr_now))
                if bar is not None:
                    bar.update(1)
                saving = self.step % args.save_every == 0 or self.step == self.total
                if self.step % args.log_every == 0 or saving:
                    flush(self.step)  # also: never checkpoint weights that a NaN already reached
                if saving:
                    self.save(self.step)
                faults.maybe_kill("kill_after_step", self.step, self.rank)
            flush(self.step)
        finally:
            if bar is not None:
                bar.close()
        rows = logger.read() if self.is_main else []
        logger.close()
        if self.is_main:
            plot_curves(rows, self.out_dir / "curves.png", self.title)
        return {"steps": self.step, "skipped_steps": self.skipped,
                "last_metrics": rows[-1] if rows else {}, "world_size": self.world}

    def finish(self) -> None:
        """Collective: wait for every rank, release the engine."""
        dist.barrier()
        self.engine.destroy()
