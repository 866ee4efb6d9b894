"""Training checkpoints that survive a kill at any moment, and exact resume.

Layout of a stage's checkpoint folder:
    <dir>/step_000040/            DeepSpeed's files (model, optimizer partitions, scheduler)
    <dir>/step_000040/client_rank0.pt   our client state per rank (step, RNG of every stream,
                                        data position, history) - atomic writes
    <dir>/latest                  the tag of the last COMPLETE checkpoint (atomic write)

Order of a save: every rank writes DeepSpeed's files and its client file; barrier; rank 0
moves `latest` (vlmo_fast.io.atomic_write_text) and only then deletes tags beyond keep-last-K.
A kill before the pointer moves leaves the previous checkpoint in charge; a half-written tag
folder is never pointed at and is removed by the next save. DeepSpeed's own `latest` file is
not written (save_latest=False): ours is the one pointer.
"""
from __future__ import annotations

import io
import random
import re
import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..io import atomic_write, atomic_write_text, remove_stale_temporaries

TAG_RE = re.compile(r"^step_(\d+)$")
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def rng_state(generators: Dict[str, torch.Generator]) -> Dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "generators": {k: g.get_state() for k, g in generators.items()}}


def set_rng_state(state: Dict, generators: Dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in generators.items():
        if k not in state["generators"]:
            raise KeyError(f"checkpoint has no state for random stream {k!r}")
        g.set_state(state["generators"][k])


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def latest_tag(directory) -> Optional[str]:
    p = Path(directory) / LATEST
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    if not TAG_RE.match(tag) or not (Path(directory) / tag).is_dir():
        raise RuntimeError(f"{p} names {tag!r}, which is not a checkpoint folder in {directory}")
    return tag


def save_checkpoint(engine, directory, step: int, client_state: Dict, rank: int, keep_last: int = 2,
                    fault_hook=None) -> str:
    """Collective. Returns the tag written."""
    directory = Path(directory)
    tag = tag_for(step)
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(directory)
    _barrier()
    # whatever DeepSpeed's save draws from the global RNGs must not shift the training stream
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        engine.save_checkpoint(str(directory), tag=tag, client_state={"step": step}, save_latest=False)
    client_state = dict(client_state, **({"rng": client_state["rng"]()} if callable(client_state.get("rng")) else {}))
    buf = io.BytesIO()
    torch.save(client_state, buf)
    atomic_write(directory / tag / f"client_rank{rank}.pt", lambda p: Path(p).write_bytes(buf.getvalue()))
    if fault_hook is not None:
        fault_hook("checkpoint_written", step)
    _barrier()
    if rank == 0:
        atomic_write_text(directory / LATEST, tag + "\n")
        _prune(directory, tag, keep_last)
    _barrier()
    return tag


def _prune(directory: Path, current: str, keep_last: int) -> None:
    tags = sorted((int(m.group(1)), e.name) for e in directory.iterdir()
                  if e.is_dir() and (m := TAG_RE.match(e.name)))
    cur = int(TAG_RE.match(current).group(1))
    # newer than the pointer: a killed run's half-written save -> remove
    stale = [name for s, name in tags if s > cur]
    kept = [name for s, name in tags if s <= cur][-max(1, keep_last):]
    for s, name in tags:
        if name in stale or name not in kept:
            shutil.rmtree(directory / name, ignore_errors=True)


def load_checkpoint(engine, directory, rank: int, tag: Optional[str] = None) -> Dict:
    """Load DeepSpeed state (module, optimizer, scheduler) + our client state; returns the latter."""
    directory = Path(directory)
    tag = tag or latest_tag(directory)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint in {directory} (no {LATEST} pointer)")
    path, _ = engine.load_checkpoint(str(directory), tag=tag, load_module_strict=True,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {directory / tag}")
    client = directory / tag / f"client_rank{rank}.pt"
    if not client.is_file():
        raise FileNotFoundError(f"{client} is missing: the checkpoint was written by a run with a "
                                f"different number of processes")
    return torch.load(client, map_location="cpu", weights_only=False)
