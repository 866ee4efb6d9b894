"""Fault injection for tests, driven by the environment variable VLMO_FAST_FAULT.

One spec per process, read when a fault point is reached (so a test sets it per launch).
Kills are a real SIGKILL of this process (nothing is flushed or cleaned up, as with the OOM
killer or a preemption), on rank 0 unless the spec ends in "@R" (rank R):

    kill_after_step:N              after optimizer step N (and its checkpoint, if any)
    kill_in_save:N:K               inside step N's checkpoint: right after the K-th file
                                   DeepSpeed wrote (K from 1; DeepSpeed's own files only)
    kill_in_save:N:K:torn[:F]      the same, but the K-th file is first cut to the fraction
                                   F of its bytes (default 0.5): what a kill in the middle
                                   of that write leaves
    kill_in_checkpoint:N           after every rank's files of step N's checkpoint, before
                                   its manifest (the checkpoint is incomplete)
    kill_after_manifest:N          after the manifest, before `latest` moves (complete, not
                                   pointed at)
    kill_after_latest:N            after `latest` moved, before older checkpoints are pruned
    kill_in_save_after:N:SECONDS   a timer started when step N's checkpoint starts kills
                                   after SECONDS, wherever the process is then (inside a file
                                   write, between files, or already training the next steps)
    nan_inputs_at_step:N           step N's float inputs become NaN on every rank (as bad
                                   data would); not a kill

Randomised kills: `draw_fault(rng, ...)` draws one of the kill specs above (seeded, so a
failing draw is reproducible from its seed); `kill_in_save_after` with a drawn delay is the
one whose moment is not chosen by the code being tested.

The training loop calls `maybe_kill(kind, step, rank)` at its own points, `poison_batch` on
each micro-batch, and passes `checkpoint_hook(rank)` to `checkpoint.save_checkpoint`, which
calls it at every point of a save: ("save_started", step, None), ("deepspeed_file", step,
path) after each file DeepSpeed writes, ("files_written", step, None), ("manifest_written",
step, None), ("latest_moved", step, None), ("save_finished", step, None).
"""
from __future__ import annotations

import os
import random
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch

FAULT_ENV = "VLMO_FAST_FAULT"
# kinds that take only a step; the save-point kinds map to save_checkpoint's hook points
STEP_KINDS = ("kill_after_step", "nan_inputs_at_step")
SAVE_POINT_KINDS = {"kill_in_checkpoint": "files_written", "kill_after_manifest": "manifest_written",
                    "kill_after_latest": "latest_moved"}
KINDS = STEP_KINDS + tuple(SAVE_POINT_KINDS) + ("kill_in_save", "kill_in_save_after")
USAGE = ("kill_after_step:N, kill_in_save:N:K[:torn[:F]], kill_in_checkpoint:N, kill_after_manifest:N, "
         "kill_after_latest:N, kill_in_save_after:N:SECONDS or nan_inputs_at_step:N, optionally "
         "followed by @RANK")


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    step: int
    rank: int = 0
    file_index: Optional[int] = None     # kill_in_save: the K-th file DeepSpeed writes
    torn_fraction: Optional[float] = None  # kill_in_save ...:torn: bytes of that file kept
    seconds: Optional[float] = None      # kill_in_save_after

    def __str__(self) -> str:
        text = f"{self.kind}:{self.step}"
        if self.kind == "kill_in_save":
            text += f":{self.file_index}" + (f":torn:{self.torn_fraction}" if self.torn_fraction is not None else "")
        elif self.kind == "kill_in_save_after":
            text += f":{self.seconds}"
        return text + (f"@{self.rank}" if self.rank else "")


def parse_fault_spec(text: str) -> FaultSpec:
    """Parse a VLMO_FAST_FAULT value; ValueError naming the variable and the accepted forms."""
    def bad(why: str):
        raise ValueError(f"{FAULT_ENV}={text!r}: {why}; expected {USAGE}")
    body, _, rank_text = text.strip().partition("@")
    parts = body.split(":")
    kind = parts[0]
    if kind not in KINDS:
        bad(f"unknown fault {kind!r}")
    if len(parts) < 2:
        bad("no step")
    try:
        rank = int(rank_text) if rank_text else 0
        step = int(parts[1])
    except ValueError:
        bad("the step and the rank must be integers")
    if step < 0 or rank < 0:
        bad("the step and the rank must be >= 0")
    if kind == "kill_in_save":
        if len(parts) not in (3, 4, 5) or (len(parts) > 3 and parts[3] != "torn"):
            bad("kill_in_save takes N:K or N:K:torn[:F]")
        try:
            index = int(parts[2])
            fraction = float(parts[4]) if len(parts) == 5 else (0.5 if len(parts) == 4 else None)
        except ValueError:
            bad("K must be an integer and F a number")
        if index < 1 or (fraction is not None and not 0 <= fraction < 1):
            bad("K must be >= 1 and F in [0, 1)")
        return FaultSpec(kind, step, rank, file_index=index, torn_fraction=fraction)
    if kind == "kill_in_save_after":
        if len(parts) != 3:
            bad("kill_in_save_after takes N:SECONDS")
        try:
            seconds = float(parts[2])
        except ValueError:
            bad("SECONDS must be a number")
        if not seconds >= 0:
            bad("SECONDS must be >= 0")
        return FaultSpec(kind, step, rank, seconds=seconds)
    if len(parts) != 2:
        bad(f"{kind} takes only a step")
    return FaultSpec(kind, step, rank)


def active_fault() -> Optional[FaultSpec]:
    """The spec in VLMO_FAST_FAULT, or None when it is unset or empty."""
    text = os.environ.get(FAULT_ENV, "").strip()
    return parse_fault_spec(text) if text else None


def kill_now() -> None:
    """SIGKILL this process (stdout flushed first, so a test sees what was printed)."""
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill(point: str, step: int, rank: int) -> None:
    """SIGKILL this process if the fault spec is `point` at `step` for this rank."""
    spec = active_fault()
    if spec is not None and spec.kind == point and spec.step == step and spec.rank == rank:
        kill_now()


def poison_batch(batch: Dict, step: int) -> Dict:
    """The batch, with its float tensors NaN if the spec is nan_inputs_at_step at `step`."""
    spec = active_fault()
    if spec is not None and spec.kind == "nan_inputs_at_step" and spec.step == step:
        return {k: (torch.full_like(v, float("nan")) if isinstance(v, torch.Tensor) and v.is_floating_point()
                    else v) for k, v in batch.items()}
    return batch


class CheckpointFaults:
    """The hook `save_checkpoint` calls at each point of a save (see the module docstring)."""

    def __init__(self, spec: FaultSpec, rank: int):
        self.spec, self.rank = spec, rank
        self.files_seen = 0
        self.timer: Optional[threading.Timer] = None

    def __call__(self, point: str, step: int, path: Optional[Path] = None) -> None:
        spec = self.spec
        if spec.rank != self.rank or spec.step != step:
            return
        if spec.kind == "kill_in_save_after" and point == "save_started" and self.timer is None:
            # deliberately not cancelled when the save ends: the kill lands wherever the
            # process is after `seconds`, inside the save or in the steps after it
            self.timer = threading.Timer(spec.seconds, kill_now)
            self.timer.daemon = True
            self.timer.start()
        elif spec.kind == "kill_in_save" and point == "deepspeed_file":
            self.files_seen += 1
            if self.files_seen == spec.file_index:
                if spec.torn_fraction is not None:
                    size = os.path.getsize(path)
                    os.truncate(path, int(size * spec.torn_fraction))
                kill_now()
        elif SAVE_POINT_KINDS.get(spec.kind) == point:
            kill_now()


def checkpoint_hook(rank: int) -> Optional[Callable[[str, int, Optional[Path]], None]]:
    """The fault hook for `save_checkpoint(..., fault_hook=...)` from VLMO_FAST_FAULT, or None."""
    spec = active_fault()
    if spec is None or spec.kind in STEP_KINDS:
        return None
    return CheckpointFaults(spec, rank)


def draw_fault(rng: random.Random, *, after_step: int, total_steps: int, save_steps: Sequence[int],
               deepspeed_files: int, save_seconds: float, horizon: Optional[int] = None) -> str:
    """A random kill spec that fires in a run resuming at `after_step` (so it lands after it).

    save_steps: the steps at which the run checkpoints; deepspeed_files: how many files
    DeepSpeed writes per save on rank 0; save_seconds: about how long a save takes (the timed
    kill is drawn over 1.25 x that, so some land just after the save); horizon: the kill's
    step is at most this many steps after after_step (a loop of many kills over one run)."""
    last = total_steps if horizon is None else min(total_steps, after_step + horizon)
    future_saves = [s for s in save_steps if after_step < s <= last]
    choices = ["kill_after_step"]
    if future_saves:
        choices += ["kill_in_save", "kill_in_save_torn", "kill_in_checkpoint", "kill_after_manifest",
                    "kill_after_latest", "kill_in_save_after", "kill_in_save_after"]
    kind = rng.choice(choices)
    if kind == "kill_after_step":
        return f"kill_after_step:{rng.randint(after_step + 1, last)}"
    n = rng.choice(future_saves)
    if kind == "kill_in_save":
        return f"kill_in_save:{n}:{rng.randint(1, max(1, deepspeed_files))}"
    if kind == "kill_in_save_torn":
        return f"kill_in_save:{n}:{rng.randint(1, max(1, deepspeed_files))}:torn:{rng.uniform(0, 0.99):.3f}"
    if kind == "kill_in_save_after":
        return f"kill_in_save_after:{n}:{rng.uniform(0, 1.25 * save_seconds):.4f}"
    return f"{kind}:{n}"
