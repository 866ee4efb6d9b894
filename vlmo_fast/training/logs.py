"""Training logs on rank 0: tqdm bar, JSONL + TensorBoard scalars, a PNG of the curves.

Losses stay on the device between log points; `StepBuffer.flush()` turns the buffered steps
into floats with ONE host sync every `log_every` steps.

metrics.jsonl is append-only: a run never truncates or rewrites it. A run that starts where
the file already has lines (a resume, or a restart after a killed first save) first appends
a marker {"event": "restart", "at_step": S, "from": <checkpoint or null>, "time": ...}; the
rows of steps after S that are above it belong to the interrupted run and are superseded by
the rows the new run writes for the same steps. `read_metrics` (and `MetricsLogger.read`)
return the effective rows: each step once, as the latest run wrote it; `raw=True` returns
every line. A torn last line (killed mid-append) is cut before the next append.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..io import append_jsonl, atomic_write, read_jsonl


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


RESTART_EVENT = "restart"


def effective_rows(records: List[Dict]) -> List[Dict]:
    """The metric rows of an append-only log, each step once: a restart marker at step S
    drops the earlier rows of steps after S (the interrupted run's, replayed after it)."""
    rows: List[Dict] = []
    for r in records:
        if r.get("event") == RESTART_EVENT:
            at = int(r.get("at_step", 0))
            rows = [x for x in rows if x.get("step", 0) <= at]
        elif "event" not in r:
            rows.append(r)
    return rows


def read_metrics(path, raw: bool = False) -> List[Dict]:
    """The rows of a metrics.jsonl (effective rows, or every line with raw=True)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = read_jsonl(path)
    return records if raw else effective_rows(records)


class MetricsLogger:
    """JSONL (one object per logged step, append-only) + TensorBoard scalars under `directory`.

    resume_step: the step this run starts from; resumed_from: the checkpoint it resumed from
    (recorded in the restart marker)."""

    def __init__(self, directory, stage: str, enabled: bool = True, resume_step: int = 0,
                 resumed_from: Optional[str] = None):
        self.enabled = enabled
        self.directory = Path(directory)
        self.stage = stage
        self.path = self.directory / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        restarting = bool(self.read(raw=True))
        if restarting:  # lines of an earlier run are kept; the marker says which are superseded
            append_jsonl(self.path, {"event": RESTART_EVENT, "at_step": int(resume_step),
                                     "from": resumed_from, "time": time.time()})
        try:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: TensorBoard hides the interrupted run's events from that step on
            self.tb = SummaryWriter(str(self.directory / "tensorboard"),
                                    purge_step=resume_step + 1 if restarting or resume_step else None)
        except ImportError:  # tensorboard is a declared dependency; keep logging without it
            self.tb = None

    def read(self, raw: bool = False) -> List[Dict]:
        return read_metrics(self.path, raw=raw)

    def log(self, rows: List[Dict]) -> None:
        if not self.enabled or not rows:
            return
        for i, r in enumerate(rows):
            append_jsonl(self.path, r, fsync=i == len(rows) - 1)  # one fsync per flush
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
