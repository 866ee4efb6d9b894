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

from vlmo_fast.io import atomic_write_text

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


def measure_matmul_tflops(device: torch.device, dtype=torch.bfloat16, n: Optional[int] = None) -> float:
    """Matmul rate (TFLOP/s) of one large square torch.mm at `dtype`, measured in this run: the
    compute 'peak' that a row's % of peak / x_floor refers to. n defaults to 8192 on GPU and
    to 2048 on CPU (1024 for half types, whose CPU matmuls may be emulated)."""
    if n is None:
        n = 8192 if device.type == "cuda" else (2048 if dtype in (torch.float32, torch.float64) else 1024)
    a = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    ms = time_ms(lambda: torch.mm(a, b), device, warmup=2, reps=5 if device.type == "cpu" else 20)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def read_ms(x: torch.Tensor, reps: int = 10) -> float:
    """STREAM-style read floor: milliseconds to read every byte of `x` once (a sum: one load and
    one add per element, vectorised and threaded by ATen, nothing written)."""
    return time_ms(lambda: x.sum(), x.device, warmup=2, reps=reps)


def measure_bandwidth_gbs(device: torch.device, nbytes: int = 256 * 2**20) -> Dict[str, float]:
    """Memory bandwidth measured in this run, STREAM style, on a buffer far larger than the
    caches: 'read' (a sum over the buffer) and 'copy' (y.copy_(x), counted as 2 x bytes)."""
    x = torch.randn(nbytes // 4, device=device)
    y = torch.empty_like(x)
    read = read_ms(x)
    copy = time_ms(lambda: y.copy_(x), device, warmup=2, reps=10)
    return {"read_gbs": nbytes / (read * 1e-3) / 1e9, "copy_gbs": 2 * nbytes / (copy * 1e-3) / 1e9}


def record_floors(res: "Results", device: torch.device, dtypes=(torch.float32,)) -> Dict[str, float]:
    """Measure the device's floors once per run (bandwidth, and the matmul rate at each dtype the
    benchmark uses), store them in res.peak_reference and return them. Keys: read_gbs,
    copy_gbs, <dtype>_matmul_tflops (e.g. float32_matmul_tflops)."""
    floors = dict(measure_bandwidth_gbs(device))
    for dtype in dtypes:
        floors[f"{str(dtype).replace('torch.', '')}_matmul_tflops"] = measure_matmul_tflops(device, dtype)
    res.peak_reference.update(floors)
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        # CPU timings on a shared machine: the load says how much other work competed.
        res.notes.append("load average at start (1/5/15 min): "
                         + " / ".join(f"{x:.1f}" for x in os.getloadavg()))
    return floors


def matmul_floor_ms(flops: float, floors: Dict[str, float], dtype) -> float:
    """Time the FLOPs would take at this run's measured matmul rate for `dtype`."""
    return flops / (floors[f"{str(dtype).replace('torch.', '')}_matmul_tflops"] * 1e12) * 1e3


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
            lines += ["floors (measured in this run): " + ", ".join(
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
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        md = self.markdown(ratio_to)
        atomic_write_text(out_dir / f"{stem}.md", md)
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
