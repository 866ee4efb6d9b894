"""Training logs on rank 0: tqdm bar, JSONL + TensorBoard scalars, a PNG of the curves.

Losses stay on the device between log points; `StepBuffer.flush()` turns the buffered steps
into floats with ONE host sync every `log_every` steps.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..io import atomic_write, atomic_write_text


class StepBuffer:
    """Per-step metric tensors (detached, on device) until the next flush."""

    def __init__(self):
        self.steps: List[int] = []
        self.values: List[Dict[str, torch.Tensor]] = []

    def add(self, step: int, metrics: Dict[str, torch.Tensor]) -> None:
        self.steps.append(step)
        self.values.append({k: v.detach().float().reshape(()) for k, v in metrics.items()})

    def flush(self) -> List[Dict[str, float]]:
        """[{step, name: float, ...}] for the buffered steps (one host sync)."""
        if not self.steps:
            return []
        names = sorted({k for v in self.values for k in v})
        nan = None
        rows = []
        stacked = []
        for v in self.values:
            for k in names:
                if k not in v:
                    nan = nan if nan is not None else torch.tensor(float("nan"))
                    v[k] = nan.to(next(iter(v.values())).device)
            stacked.append(torch.stack([v[k] for k in names]))
        host = torch.stack(stacked).cpu().tolist()
        for step, row in zip(self.steps, host):
            rows.append({"step": step, **dict(zip(names, row))})
        self.steps, self.values = [], []
        return rows


def nonfinite(row: Dict[str, float], names=("loss",)) -> bool:
    return any(k in row and not math.isfinite(row[k]) for k in names)


class MetricsLogger:
    """JSONL (one object per logged step) + TensorBoard scalars under `directory`."""

    def __init__(self, directory, stage: str, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.directory = Path(directory)
        self.stage = stage
        self.path = self.directory / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        # a resumed run replays steps after its checkpoint: drop their old lines
        kept = [r for r in self.read() if r.get("step", 0) <= resume_step] if resume_step else []
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.directory / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # tensorboard is a declared dependency; keep logging without it
            self.tb = None

    def read(self) -> List[Dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def log(self, rows: List[Dict]) -> None:
        if not self.enabled or not rows:
            return
        with open(self.path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.flush()
        if self.tb is not None:
            for r in rows:
                for k, v in r.items():
                    if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                        self.tb.add_scalar(f"{self.stage}/{k}", v, r["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def plot_curves(rows: List[Dict], path, title: str) -> Optional[Path]:
    """A PNG of the stage's loss / accuracy curves (matplotlib, Agg backend)."""
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    losses = [k for k in ("loss", "mim", "mlm", "itc", "itc_vl", "itm") if any(k in r for r in rows)]
    accs = [k for k in ("mlm_acc", "itm_acc", "itc_i2t_acc", "itc_t2i_acc") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, 3 if accs else 2, figsize=(13 if accs else 9, 3.5))
    steps = [r["step"] for r in rows]
    for k in losses:
        axes[0].plot(steps, [r.get(k, float("nan")) for r in rows], label=k)
    axes[0].set_title(f"{title}: losses")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=8)
    axes[1].plot(steps, [r.get("lr", float("nan")) for r in rows])
    axes[1].set_title("learning rate")
    axes[1].set_xlabel("step")
    if accs:
        for k in accs:
            axes[2].plot(steps, [r.get(k, float("nan")) for r in rows], label=k)
        axes[2].set_title("accuracies")
        axes[2].set_xlabel("step")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    buf = __import__("io").BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return atomic_write(path, lambda p: Path(p).write_bytes(buf.getvalue()))
