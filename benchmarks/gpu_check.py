"""One command for a session with a lent GPU: install, GPU tests, every benchmark.

    python benchmarks/gpu_check.py [--out DIR] [--only mome,contrastive] [--skip-tests] [--quick]

1. Makes sure vlmo_fast is importable (installs it editable with --no-deps and no build
   isolation if not: the GPU image has torch/triton but no internet; if the C++/CUDA
   extension fails to build there, it installs without it and the JIT fallback is used).
2. Runs the GPU-marked tests (`pytest -m gpu`), log in DIR/gpu-tests.log.
3. Runs every benchmarks/bench_*.py with --out DIR (results JSON + markdown per benchmark,
   in the format of ../shared/reference/results-format.md) and prints a summary.
4. Compares every timed Triton/CUDA row with the roofline model (benchmarks/roofline.py):
   measured / modelled and measured / the issue's FLOP floor, per case and per MoME kernel
   stage; written to DIR/model-vs-measured.md. (Also alone: --compare-only DIR.)
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


MODELLED_IMPLS = {"mome": ("triton", "triton_recompute"), "contrastive": ("triton",),
                  "hardneg": ("ext",)}


def compare_with_model(out_dir: Path) -> list:
    """Lines of measured / modelled for the results JSONs in out_dir (see roofline.py)."""
    import json
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import roofline
    lines = ["| benchmark | case | impl | pass | measured ms | modelled ms | measured / modelled "
             "| measured / target floor |", "|---|---|---|---|---|---|---|---|"]
    for path in sorted(out_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        bench = data.get("benchmark")
        if bench not in MODELLED_IMPLS:
            continue
        part = roofline.part_for(str(data.get("device", "")))
        for row in data.get("rows", []):
            ms, impl, pass_ = row.get("ms"), row.get("impl", ""), row.get("pass", "")
            if ms is None:
                continue
            case_name = row.get("case", "")
            kernel = None
            if pass_ == "stage" and impl.startswith("triton:"):
                kernel = impl.split(":", 1)[1]
                case_name = case_name.replace("stages ", "", 1)
            elif impl not in MODELLED_IMPLS[bench]:
                continue
            recompute = impl == "triton_recompute" or kernel == "dgelu_recompute"
            case = roofline.case_for_row(bench, case_name, part)
            if case is None:
                continue
            if recompute and bench == "mome":
                tokens = case_name.split()
                kv = dict(t.split("=", 1) for t in tokens if "=" in t)
                case = roofline.mome_autotuned((int(kv["d"]), int(kv["h"])), tokens[0], int(kv["T"]), part,
                                               case.case.split()[-1], exact_tokens=True, recompute=True)[0]
            if kernel is not None:
                name = "dgelu" if kernel == "dgelu_recompute" else kernel
                found = [k for k in case.passes["fwd+bwd"] if k.name == name]
                if not found:
                    continue
                modelled, target = found[0].modelled_ms(part), None
            else:
                if pass_ not in case.passes:
                    continue
                modelled = case.modelled_ms(part, pass_)
                target = case.target_floor_ms(part, pass_) if case.flop_floor else None
            lines.append(f"| {bench} | {row.get('case')} | {impl} | {pass_} | {ms:.4g} | "
                         f"{modelled:.4g} | {ms / modelled:.2f} | "
                         f"{'-' if target is None else f'{ms / target:.2f}'} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--only", default="", help="comma-separated benchmark names (mome, contrastive, ...)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    p.add_argument("--bench-timeout", type=int, default=None, help="seconds per benchmark")
    p.add_argument("--compare-only", type=Path, default=None,
                   help="only print measured / modelled for the results JSONs in this folder")
    args = p.parse_args()
    if args.compare_only is not None:
        print("\n".join(compare_with_model(args.compare_only)))
        return 0
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
    if not args.skip_bench:
        table = compare_with_model(args.out)
        print("\nmeasured / modelled (benchmarks/roofline.py; > 1: slower than the model says):")
        print("\n".join(table))
        (args.out / "model-vs-measured.md").write_text(
            "# Measured vs the roofline model\n\n" + "\n".join(table) + "\n")
    print("\nsummary:")
    for k, rc in status.items():
        print(f"  {k:24s} {'ok' if rc == 0 else f'FAILED (rc={rc})'}")
    return 0 if all(rc == 0 for rc in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
