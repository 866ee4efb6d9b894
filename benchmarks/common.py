"""Shared helpers for benchmarks/bench_*.py: timing, peak memory, device facts and writing
results in the shape of ../shared/reference/results-format.md.

Every benchmark builds a `Results` object, appends rows with `add(case, impl, pass_, ...)`,
and calls `write()`: benchmarks/results/<benchmark>-<device-slug>.json plus a markdown table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """'h100', 'h200', 'a100', ... for GPUs, 'cpu' otherwise."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"\b([a-z]\d{2,4})\b", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def versions() -> Dict[str, str]:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    try:
        import vlmo_fast
        out["vlmo_fast"] = vlmo_fast.__version__
    except ImportError:
        out["vlmo_fast"] = None
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 10,
            min_time_s: float = 0.0) -> float:
    """Median milliseconds of fn() after warm-up (device events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start_all) < min_time_s:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * reps:
            break
    return statistics.median(times)


def peak_mem_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak device memory (MB) allocated while running fn once; None on CPU."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure_matmul_tflops(device: torch.device, dtype=torch.bfloat16, n: int = 8192) -> float:
    """bf16 matmul rate measured in this run: the 'peak' that % of peak refers to."""
    if device.type != "cuda":
        n = 1024
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=3, reps=20)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Results:
    def __init__(self, benchmark: str, device: torch.device, command: Optional[str] = None):
        self.benchmark = benchmark
        self.device = torch.device(device)
        self.command = command or "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
        self.rows: List[dict] = []
        self.peak_reference: Dict[str, float] = {}
        self.notes: List[str] = []

    def add(self, case: str, impl: str, pass_: str, ms: Optional[float], **extra) -> dict:
        row = {"case": case, "impl": impl, "pass": pass_,
               "ms": None if ms is None else round(float(ms), 4)}
        for k, v in extra.items():
            row[k] = round(v, 4) if isinstance(v, float) else v
        self.rows.append(row)
        return row

    def to_dict(self) -> dict:
        return {
            "benchmark": self.benchmark,
            "device": device_name(self.device),
            "host": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
            "versions": versions(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": self.command,
            "peak_reference": self.peak_reference,
            "notes": self.notes,
            "rows": self.rows,
        }

    def ratio(self, case: str, pass_: str, num_impl: str, den_impl: str) -> Optional[float]:
        """ms(num_impl) / ms(den_impl) for the same case and pass, if both ran."""
        get = {(r["impl"]): r["ms"] for r in self.rows if r["case"] == case and r["pass"] == pass_}
        a, b = get.get(num_impl), get.get(den_impl)
        return None if a is None or b is None or b == 0 else a / b

    def markdown(self, ratio_to: List[str] = ()) -> str:
        d = self.to_dict()
        lines = [f"# {self.benchmark} on {d['device']}", "",
                 f"date {d['date']}; versions " + ", ".join(f"{k} {v}" for k, v in d["versions"].items()),
                 f"command: `{self.command}`", ""]
        if self.peak_reference:
            lines += ["peak reference (measured in this run): " + ", ".join(
                f"{k} = {v:.4g}" for k, v in self.peak_reference.items()), ""]
        extra_keys = []
        for r in self.rows:
            for k in r:
                if k not in ("case", "impl", "pass", "ms") and k not in extra_keys:
                    extra_keys.append(k)
        header = ["case", "pass", "impl", "ms"] + extra_keys + [f"x vs {i}" for i in ratio_to]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for r in self.rows:
            cells = [r["case"], r["pass"], r["impl"], "-" if r["ms"] is None else f"{r['ms']:.3f}"]
            cells += ["" if r.get(k) is None else str(r.get(k)) for k in extra_keys]
            for ref in ratio_to:
                q = self.ratio(r["case"], r["pass"], r["impl"], ref)
                cells.append("" if q is None else f"{q:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Optional[Path] = None, ratio_to: List[str] = ()) -> Path:
        out_dir = Path(out_dir or RESULTS_DIR)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{self.benchmark}-{device_slug(self.device)}"
        path = out_dir / f"{stem}.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        md = self.markdown(ratio_to)
        (out_dir / f"{stem}.md").write_text(md)
        print(md)
        print(f"wrote {path}")
        return path


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    p.add_argument("--quick", action="store_true", help="few small cases (smoke run)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per row")
    return p
