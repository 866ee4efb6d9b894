"""One command for a session with a lent GPU: install, GPU tests, every benchmark.

    python benchmarks/gpu_check.py [--out DIR] [--only mome,contrastive] [--skip-tests] [--quick]

1. Makes sure vlmo_fast is importable (installs it editable with --no-deps and no build
   isolation if not: the GPU image has torch/triton but no internet; if the C++/CUDA
   extension fails to build there, it installs without it and the JIT fallback is used).
2. Runs the GPU-marked tests (`pytest -m gpu`), log in DIR/gpu-tests.log.
3. Runs every benchmarks/bench_*.py with --out DIR (results JSON + markdown per benchmark,
   in the format of ../shared/reference/results-format.md) and prints a summary.
Works on the GPU image (torch 2.11, triton 3.6, no deepspeed).

On the lent device machine one command may run 10 minutes; the full sweep is longer, so
split it into two calls and write into the folder that comes back, e.g.
    python benchmarks/gpu_check.py --out $OUT --only mome,hardneg
    python benchmarks/gpu_check.py --out $OUT --skip-tests --only contrastive,attention
then copy the JSON/markdown files into benchmarks/results/ and commit them.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd, log=None, env=None, timeout=None) -> int:
    print("+", " ".join(map(str, cmd)), flush=True)
    t0 = time.time()
    try:
        if log is None:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout).returncode
        else:
            with open(log, "w") as f:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
            print("".join(open(log).readlines()[-15:]))
    except subprocess.TimeoutExpired:
        rc = 124
    print(f"  -> rc={rc} in {time.time() - t0:.0f}s", flush=True)
    return rc


def ensure_installed() -> None:
    probe = [sys.executable, "-c", "import vlmo_fast.kernels, vlmo_fast"]
    if subprocess.run(probe, cwd="/", capture_output=True).returncode == 0:
        return
    base = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)]
    env = dict(os.environ)
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    if run(base, env=env) != 0:
        print("extension build failed: installing without it (vlmo_fast._ext JIT-builds on use)")
        env["VLMO_FAST_NO_EXT"] = "1"
        if run(base, env=env) != 0:
            sys.exit("could not install vlmo_fast")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--only", default="", help="comma-separated benchmark names (mome, contrastive, ...)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    p.add_argument("--bench-timeout", type=int, default=None, help="seconds per benchmark")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_installed()
    import torch
    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}",
          torch.cuda.get_device_name() if torch.cuda.is_available() else "")
    status = {}
    if not args.skip_tests:
        status["gpu tests"] = run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                   "tests"], log=args.out / "gpu-tests.log")
    if not args.skip_bench:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        for bench in sorted((ROOT / "benchmarks").glob("bench_*.py")):
            name = bench.stem[len("bench_"):]
            if wanted and name not in wanted:
                continue
            cmd = [sys.executable, str(bench), "--out", str(args.out)] + (["--quick"] if args.quick else [])
            status[f"bench {name}"] = run(cmd, log=args.out / f"{name}-bench.log", timeout=args.bench_timeout)
    print("\nsummary:")
    for k, rc in status.items():
        print(f"  {k:24s} {'ok' if rc == 0 else f'FAILED (rc={rc})'}")
    return 0 if all(rc == 0 for rc in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
