"""Small pieces every training job shares: seeding, moving a batch to the device, the endless
batch iterator whose position is the loader's state, gradient norm and peak memory."""
from __future__ import annotations

import random
import resource
from typing import Dict, Optional

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def to_device(batch: Dict, device: torch.device) -> Dict:
    """A batch dict's tensors on `device` (non-blocking from pinned memory)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


def grad_norm(module: torch.nn.Module) -> Optional[torch.Tensor]:
    """Global gradient norm before the optimizer step (DeepSpeed reports none without ZeRO)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else None


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak RSS on the CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Batches:
    """Endless iterator over the loader's epochs; the loader's state_dict is the position."""

    def __init__(self, loader):
        self.loader = loader
        self.it = None

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
