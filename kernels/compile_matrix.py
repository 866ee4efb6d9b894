"""Compile matrix: every Triton kernel x every config its launcher can choose x sm_80/86/90,
at the dtypes that run, compiled offline exactly as launched (see common.compile_launch), plus
the CUDA sampler with `nvcc -Xptxas -v`. No GPU needed; run without TRITON_INTERPRET.

This module also holds the budgets the kernels are held to (spills, registers of the row
kernels, the register and shared-memory model of a GEMM tile config, which
kernels/mome_ffn.py prunes its autotune tables with, so no config over budget is ever timed)
and the offline compile of each op (record its launches on meta tensors, compile each one).
The kernel files are imported only when a compile runs: mome_ffn.py imports the tile model
from here at import time.

    python -m vlmo_fast.kernels.compile_matrix [--full] [--out FILE.md] [--json FILE]

Default (CI) subset: each variant's first config (the MoME wgrad's first of each row split)
on the shapes and arches that stress the limits (MoME bf16 on sm_80/sm_90 at T=4096 and
16384; contrastive bf16 D=256 on sm_86/sm_90, fp16 D=128 and fp32 D=128 on sm_80); --full
compiles every autotune config and every dtype/arch (about 20 minutes cold on 2 cores;
Triton's and our ptxas caches make reruns fast) and is what benchmarks/results/compile-matrix.md
holds.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from .common import ARCH_SHARED_MEMORY, CompileResult, arch_facts, compile_launch, record_launches

ARCHS = (80, 86, 90)
# Spill budget (bytes of spill stores + loads per thread, as ptxas reports them) that any
# config the launchers can choose may have: two registers' worth (an 8-byte spill on a 255-
# register kernel costs nothing measurable; the spilling configs moved kilobytes).
SPILL_BUDGET_BYTES = 16
# Registers the memory-bound row kernels may use: <= 160 leaves room for 3 blocks of 4 warps
# per SM (latency is hidden by warps in flight); the 255-register LN backward (fp32
# partial sums of every expert carried across its row loop) fitted 2.
ROW_KERNELS = ("_route_count_kernel", "_route_scatter_kernel", "_gather_ln_kernel",
               "_gather_grad_kernel", "_ln_bwd_scatter_kernel")
ROW_KERNEL_REGISTER_BUDGET = 160
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class Row(NamedTuple):
    op: str
    dtype: str
    shape: str
    result: CompileResult
    estimate: int = -1      # contrastive: the launcher's shared-memory estimate for the config


# MoME token counts: 4096, and the base 16384, whose autotune bucket also times the
# weight-gradient configs that split expert rows (T <= 4096 runs them unsplit) and where the
# reducing row kernels walk several row blocks per program (one at 4096). A result the second
# shape compiles to as well is one row, its shape naming both token counts.
MOME_TOKENS = (4096, 16384)


# ----------------------------------------------------------------------------- tile budgets
# Register budget for the fp32 tiles one thread keeps live in a GEMM epilogue: accumulator
# registers per thread x live tiles. Beyond it the 255-register file spills (measured by this
# matrix, benchmarks/results/compile-matrix.md): 128 for 16-bit inputs, 32 for the 3-pass
# TF32 split (its hi/lo operand fragments take most of the rest). On sm_8x (mma.sync keeps
# operand fragments in registers too) one accumulator may also hold at most 64.
TILE_REGISTER_BUDGET = {"16bit": 128, "tf32x3": 32}
SM8X_ACCUMULATOR_CAP = 64
# Shared memory assumed for an arch missing from common.ARCH_SHARED_MEMORY (its smallest).
UNKNOWN_ARCH_SHARED_MEMORY = 101376


def tile_registers(cfg) -> int:
    """fp32 accumulator registers per thread of a [BLOCK_M, BLOCK_N] tile (triton.Config)."""
    kw = cfg.kwargs
    return kw["BLOCK_M"] * kw["BLOCK_N"] // (32 * cfg.num_warps)


def operand_shared_memory(cfg, element_size: int) -> int:
    """Shared memory of the pipelined A and B tiles (the dominant term)."""
    kw = cfg.kwargs
    return cfg.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * element_size


def within_tile_budgets(cfg, arch: int, element_size: int, live_tiles: int) -> bool:
    """Whether a GEMM tile config compiles on `arch` without spilling (its `live_tiles` fp32
    epilogue tiles within TILE_REGISTER_BUDGET, element_size 4 = the 3-pass TF32 split, and the
    sm_8x accumulator cap) and with its operand tiles within the arch's shared memory."""
    registers = tile_registers(cfg)
    budget = TILE_REGISTER_BUDGET["tf32x3" if element_size == 4 else "16bit"]
    cap = SM8X_ACCUMULATOR_CAP if arch < 90 else budget
    limit = ARCH_SHARED_MEMORY.get(arch, UNKNOWN_ARCH_SHARED_MEMORY)
    return (registers * live_tiles <= budget and registers <= cap
            and operand_shared_memory(cfg, element_size) <= limit)


# ----------------------------------------------------------------------------- offline compile
# Record what an op's launchers launch for an arch (on meta tensors, at the dtypes that run)
# and compile each launch with Triton's bundled ptxas. Run in a process without
# TRITON_INTERPRET (the interpreter replaces the jit functions when a kernel file is imported).

MOME_VARIANT_KEYS = ("EPILOGUE", "HAS_BIAS", "STORE_AUX", "RECOMPUTE", "HAS_GAMMA", "HAS_DPS",
                     "DOT_PRECISION", "NEED_DGAMMA", "SPLIT")
CONTRASTIVE_VARIANT_KEYS = ("TRACK_MAX", "FP32_INPUTS", "COMPUTE_DSCALE", "SCALE_G", "RESIDENT")


def record_mome_launches(arch: int, dtype: torch.dtype, t: int = 4096, d: int = 768,
                         h: int = 3072, num_experts: int = 3, recompute_preact: bool = False):
    """The launches of one MoME FFN forward + backward (every gradient, gamma and drop path
    on), as they would run on `arch`, recorded on meta tensors."""
    from . import mome_ffn
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(t, d, **meta)
    ids = torch.empty(t, device="meta", dtype=torch.int64)
    nw, nb = torch.empty(num_experts, d, **meta), torch.empty(num_experts, d, **meta)
    w1, b1 = torch.empty(num_experts, d, h, **meta), torch.empty(num_experts, h, **meta)
    w2, b2 = torch.empty(num_experts, h, d, **meta), torch.empty(num_experts, d, **meta)
    gamma = torch.empty(d, **meta)
    dps = torch.empty(t, device="meta", dtype=torch.float32)
    with record_launches(arch_facts(arch)) as launches:
        out, *saved = mome_ffn.mome_ffn_forward(x, ids, nw, nb, w1, b1, w2, b2, gamma, dps, 1e-6,
                                                not recompute_preact, True)
        mome_ffn.mome_ffn_backward(torch.empty_like(x), x, *saved, nw, w1, b1, w2, gamma, dps,
                                   recompute_preact, True, True, True, True)
    return launches


def compile_mome(arch: int = 90, dtype: torch.dtype = torch.bfloat16, *,
                 recompute_preact: bool = False, all_configs: bool = True, **sizes) -> list:
    """Compile every launch of a MoME FFN forward + backward for CUDA `arch` exactly as
    launched (JIT argument specialisation; each autotune config the arch keeps, or with
    all_configs=False only the first of each SPLIT: the wgrad's split and unsplit code paths
    both compile). Sizes: t (4096 runs only unsplit wgrad configs, t > 4096 the split ones
    too), d, h, num_experts. Returns `common.CompileResult`s; raises on a compile error."""
    from . import mome_ffn
    results, seen = [], set()
    for rec in record_mome_launches(arch, dtype, recompute_preact=recompute_preact, **sizes):
        key = (id(rec.kernel), tuple(sorted((k, str(v)) for k, v in rec.kwargs.items())),
               tuple(str(a.dtype) for a in rec.args if isinstance(a, Tensor)))
        if key in seen:
            continue
        seen.add(key)
        prune = mome_ffn.AUTOTUNE_PRUNES.get(rec.kernel)
        if prune is not None and not all_configs:
            prune = (lambda p: lambda cfgs, *a, **k: _first_per_split(p(cfgs, *a, **k)))(prune)
        results += compile_launch(rec, arch, MOME_VARIANT_KEYS,
                                  None if prune is None else _element_size_prune(prune, rec))
    return results


def _first_per_split(configs):
    firsts = {}
    for c in configs:
        firsts.setdefault(c.kwargs.get("SPLIT", 1), c)
    return list(firsts.values())


def _element_size_prune(prune, rec):
    element_size = next(a for a in rec.args if isinstance(a, Tensor)).element_size()
    return lambda configs, arch, **kwargs: prune(configs, arch, element_size, **kwargs)


def record_contrastive_launches(arch: int, dtype: torch.dtype, n: int = 4096, D: int = 256):
    """The launches of one contrastive forward + backward (stats on, every gradient) on
    `arch`, recorded on meta tensors."""
    from .contrastive import contrastive_backward_operand, contrastive_forward
    meta = dict(device="meta", dtype=dtype)
    x, y = torch.empty(n, D, **meta), torch.empty(n, D, **meta)
    ls = torch.empty(1, device="meta", dtype=torch.float32)
    f32 = torch.empty(n, device="meta", dtype=torch.float32)
    with record_launches(arch_facts(arch)) as launches:
        contrastive_forward(x, y, ls, track_max=True)
        contrastive_backward_operand(x, y, ls, f32, f32, f32, f32, compute_dscale=True)
        contrastive_backward_operand(y, x, ls, f32, f32, f32, f32)
    return launches


def compile_contrastive(arch: int = 90, dtype: torch.dtype = torch.bfloat16, *, D: int = 256,
                        n: int = 4096) -> list:
    """Compile the launches of a contrastive forward + backward for CUDA `arch` exactly as
    launched there (config chosen from the arch's shared memory; JIT argument
    specialisation). Returns `common.CompileResult`s; raises on a compile error."""
    results, seen = [], set()
    for rec in record_contrastive_launches(arch, dtype, n=n, D=D):
        key = (id(rec.kernel), tuple(sorted((k, str(v)) for k, v in rec.kwargs.items())))
        if key not in seen:
            seen.add(key)
            results += compile_launch(rec, arch, CONTRASTIVE_VARIANT_KEYS)
    return results


# ----------------------------------------------------------------------------- the matrix

def mome_rows(archs, dtypes, all_configs: bool) -> List[Row]:
    rows = []
    for arch in archs:
        for dtype in dtypes:
            seen = {}   # result -> (index of its row, token counts that compile to it)
            for t in MOME_TOKENS:
                for recompute in (False, True):
                    for r in compile_mome(arch, dtype, recompute_preact=recompute,
                                        all_configs=all_configs, t=t):
                        if r not in seen:
                            seen[r] = (len(rows), [t])
                            rows.append(Row("mome_ffn", DTYPE_NAMES[dtype], "", r))
                        elif t not in seen[r][1]:
                            seen[r][1].append(t)
            for i, tokens in seen.values():
                rows[i] = rows[i]._replace(shape=f"T={','.join(map(str, tokens))} d=768 h=3072")
    return rows


def contrastive_rows(plan) -> List[Row]:
    from . import contrastive
    from .common import offline_target
    rows = []
    for arch, dtype, d in plan:
        fp32, size = dtype == torch.float32, torch.empty((), dtype=dtype).element_size()
        with offline_target(arch_facts(arch)):
            estimates = {
                "_contrastive_fwd_kernel": contrastive.estimate_shared_memory(
                    contrastive.forward_config(d, dtype, torch.device("meta")), size, False, arch, fp32),
                "_contrastive_bwd_kernel": contrastive.estimate_shared_memory(
                    contrastive.backward_config(d, dtype, torch.device("meta")), size, True, arch, fp32)}
        for r in compile_contrastive(arch, dtype, D=d):
            rows.append(Row("contrastive", DTYPE_NAMES[dtype], f"N=4096 D={d}", r,
                            estimates[r.kernel]))
    return rows


def cuda_rows(archs=(80, 90)) -> List[Row]:
    """csrc/hard_negatives_cuda.cu through nvcc with -Xptxas -v (c10/cuda headers only)."""
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    src = os.path.join(root, "csrc", "hard_negatives_cuda.cu")
    if not os.path.exists(src) or not os.path.exists(nvcc):
        return []
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    includes = [torch_include, os.path.join(torch_include, "torch", "csrc", "api", "include")]
    with open(src, "rb") as f:
        text = f.read()
    for header in sorted(glob.glob(os.path.join(root, "csrc", "*.h"))):   # what the .cu includes
        with open(header, "rb") as f:
            text += f.read()
    key = hashlib.sha256(text + str(archs).encode() + torch.__version__.encode()).hexdigest()[:32]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                         "vlmo_fast", "nvcc", key + ".log")
    if os.path.exists(cache):
        with open(cache) as f:
            log = f.read()
    else:
        gencode = [a for arch in archs for a in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [nvcc, "-c", src, "-o", os.path.join(tmp, "k.o"), "-std=c++20", "-O3",
                   "--use_fast_math", "-Xptxas", "-v", "-DTORCH_EXTENSION_NAME=_C",
                   *(f"-I{p}" for p in includes), *gencode]
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError("nvcc failed:\n" + proc.stderr[-4000:])
        log = proc.stderr
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(cache + ".tmp", "w") as f:
            f.write(log)
        os.replace(cache + ".tmp", cache)
    return parse_ptxas_log(log)


def parse_ptxas_log(log: str) -> List[Row]:
    rows, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line)
        if m:
            current = {"name": _demangle(m.group(1)), "arch": int(m.group(2)), "spill": 0,
                       "stack": 0, "regs": 0, "smem": 0}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"] = int(m.group(1))
            current["spill"] = int(m.group(2)) + int(m.group(3))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
            c = current
            rows.append(Row("hard_negatives (CUDA)", "-", "-", CompileResult(
                c["name"], "", "256 threads", c["arch"], c["regs"], c["spill"], c["stack"],
                c["smem"], c["smem"] <= ARCH_SHARED_MEMORY[c["arch"]])))
            current = None
    return rows


def _demangle(name: str) -> str:
    """gumbel_argmax_rows<c10::BFloat16> from the mangled entry name (c++filt)."""
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
    except OSError:
        return name
    out = out.replace("(anonymous namespace)::", "").replace("vlmo_fast::hardneg::", "")
    out = out.split("(", 1)[0]
    return out[5:] if out.startswith("void ") else (out or name)


def run(full: bool) -> List[Row]:
    if full:
        rows = mome_rows(ARCHS, (torch.bfloat16, torch.float16, torch.float32), all_configs=True)
        plan = [(a, dt, d) for a in ARCHS for dt in (torch.bfloat16, torch.float16, torch.float32)
                for d in (128, 256, 768)]
    else:
        rows = mome_rows((80, 90), (torch.bfloat16,), all_configs=False)
        plan = [(86, torch.bfloat16, 256), (90, torch.bfloat16, 256), (80, torch.float16, 128),
                (80, torch.float32, 128)]
    return rows + contrastive_rows(plan) + cuda_rows()


def problems(rows: List[Row]) -> List[str]:
    out = []
    for row in rows:
        r = row.result
        where = f"{row.op} {r.kernel} [{r.variant}] {r.config} {row.dtype} {row.shape} sm_{r.arch}"
        if not r.fits:
            out.append(f"{where}: {r.shared} B shared memory > {ARCH_SHARED_MEMORY[r.arch]} B")
        if r.spill_bytes > SPILL_BUDGET_BYTES:
            out.append(f"{where}: {r.spill_bytes} B of spills > budget {SPILL_BUDGET_BYTES} B")
        if r.kernel in ROW_KERNELS and r.registers > ROW_KERNEL_REGISTER_BUDGET:
            out.append(f"{where}: {r.registers} registers > row-kernel budget "
                       f"{ROW_KERNEL_REGISTER_BUDGET}")
        if row.estimate >= 0 and row.estimate < r.shared:
            out.append(f"{where}: shared-memory estimate {row.estimate} B < compiled {r.shared} B")
    return out


def markdown(rows: List[Row], full: bool) -> str:
    import triton
    lines = ["# Compile matrix (offline, no GPU)", "",
             f"Written by `python -m vlmo_fast.kernels.compile_matrix{' --full' if full else ''}` "
             f"(tests/test_compile_matrix.py): triton {triton.__version__} with its bundled ptxas, "
             f"torch {torch.__version__}. Every kernel as its launcher launches it (JIT argument "
             "specialisation, each autotune config the arch keeps after pruning, the contrastive "
             "config chosen from the arch's shared memory); the CUDA sampler with nvcc "
             "-Xptxas -v. `spill` = spill stores + loads (bytes), `smem` = shared memory (bytes) "
             f"against the arch's opt-in limit. Spill budget: {SPILL_BUDGET_BYTES} B; registers of "
             f"the memory-bound row kernels ({', '.join(ROW_KERNELS)}): <= "
             f"{ROW_KERNEL_REGISTER_BUDGET}. A MoME row whose shape names several T compiles to "
             "the same result at each.", ""]
    summary = {}
    for row in rows:
        r = row.result
        k = (row.op, r.kernel, row.dtype, r.arch)
        s = summary.setdefault(k, [0, 0, 0, 0, 10 ** 9])
        s[0] += 1
        s[1] = max(s[1], r.registers)
        s[2] = max(s[2], r.spill_bytes)
        s[3] = max(s[3], r.shared)
    lines += ["## Summary per kernel, dtype and arch (max over configs/variants)", "",
              "| op | kernel | dtype | arch | compiled | max registers | max spill B | max smem B | limit B |",
              "|---|---|---|---|---|---|---|---|---|"]
    for (op, kernel, dtype, arch), s in sorted(summary.items()):
        lines.append(f"| {op} | {kernel} | {dtype} | sm_{arch} | {s[0]} | {s[1]} | {s[2]} | {s[3]} | "
                     f"{ARCH_SHARED_MEMORY[arch]} |")
    lines += ["", "## Every compiled variant", "",
              "| op | kernel | variant | config | dtype | shape | arch | regs | spill B | stack B | smem B | fits |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = row.result
        lines.append(f"| {row.op} | {r.kernel} | {r.variant} | {r.config} | {row.dtype} | {row.shape} | "
                     f"sm_{r.arch} | {r.registers} | {r.spill_bytes} | {r.stack_bytes} | {r.shared} | "
                     f"{'yes' if r.fits else 'NO'} |")
    bad = problems(rows)
    lines += ["", "Problems: " + ("none" if not bad else ""), *(f"- {b}" for b in bad)]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true")
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    rows = run(args.full)
    if args.out:
        from vlmo_fast.io import atomic_write_text
        atomic_write_text(args.out, markdown(rows, args.full))
    if args.json:
        from vlmo_fast.io import atomic_write_json
        atomic_write_json(args.json, [dict(op=r.op, dtype=r.dtype, shape=r.shape,
                                           smem_estimate=r.estimate, **r.result._asdict())
                                      for r in rows])
    bad = problems(rows)
    print(f"{len(rows)} kernels compiled, {len(bad)} problems")
    for b in bad:
        print("  " + b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
