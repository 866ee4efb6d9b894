"""Host-side machinery shared by the kernel files (each op's kernels, launchers and autograd
live in kernels/<op>.py; this holds only what every op needs the same way):

  * `device_guard(t)`: Triton launches on the CURRENT CUDA device; every launcher enters the
    device of its tensors (cuda:1 while the current device is 0 would otherwise read peer
    memory or fault, and autotuning would time the wrong GPU).
  * `DeviceFacts` / `device_facts(device)`: the per-device limits a launcher chooses configs
    by (arch, opt-in shared memory per block, SM count), and the table used when compiling
    offline for an arch without the device.
  * `launch(kernel, grid, *args, **kwargs)`: the one launch call of both kernel files. Normally
    `kernel[grid](...)`; inside `record_launches(facts)` it records the launch instead, so
    `compile_launches` can compile exactly what a launcher launches (same arguments, same
    integer/pointer specialisation as the JIT, every autotune config the arch keeps), on a
    machine without a GPU, with Triton's bundled ptxas. Registers and spills come from
    `ptxas -v` on the generated PTX.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import tempfile
from typing import Callable, Dict, List, NamedTuple, Optional

import torch

from vlmo_fast.env import triton_interpret

# cudaDevAttrMaxSharedMemoryPerBlockOptin by compute capability (bytes): what a kernel may ask
# for. Used when torch's device properties lack the field, and for offline compiles.
ARCH_SHARED_MEMORY = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
                      100: 232448, 120: 101376}
# SM counts of the parts the benchmarks cite (offline compiles only need a plausible value).
ARCH_SM_COUNT = {80: 108, 86: 84, 89: 142, 90: 132}


class DeviceFacts(NamedTuple):
    arch: int               # compute capability as major * 10 + minor (80, 86, 90, ...)
    shared_memory: int      # bytes of shared memory one block may opt in to
    sm_count: int


def arch_facts(arch: int) -> DeviceFacts:
    if arch not in ARCH_SHARED_MEMORY:
        raise ValueError(f"arch must be one of {sorted(ARCH_SHARED_MEMORY)}, got {arch}")
    return DeviceFacts(arch, ARCH_SHARED_MEMORY[arch], ARCH_SM_COUNT.get(arch, 132))


_TARGET: Optional[DeviceFacts] = None       # set while recording launches for an offline arch
_RECORDED: Optional[list] = None


def device_facts(device: torch.device) -> Optional[DeviceFacts]:
    """Facts of a CUDA device (or of the offline target being recorded); None off CUDA."""
    if _TARGET is not None:
        return _TARGET
    device = torch.device(device)
    if device.type != "cuda" or triton_interpret():
        return None
    props = torch.cuda.get_device_properties(device)
    arch = props.major * 10 + props.minor
    # `shared_memory_per_block_optin` is in torch's device properties since 2.1; the table
    # covers builds without it.
    smem = getattr(props, "shared_memory_per_block_optin", 0) or ARCH_SHARED_MEMORY.get(arch, 101376)
    return DeviceFacts(arch, int(smem), props.multi_processor_count)


def device_guard(tensor: torch.Tensor):
    """Context that makes the tensor's CUDA device current (a no-op off CUDA)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


class Launch(NamedTuple):
    kernel: object          # triton JITFunction or Autotuner
    args: tuple
    kwargs: dict


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) on the device of the first tensor argument (all tensor
    arguments of one launch live on one device: the launchers allocate on their input's)."""
    if _RECORDED is not None:
        _RECORDED.append(Launch(kernel, args, kwargs))
        return
    first = next(a for a in args if isinstance(a, torch.Tensor))
    with device_guard(first):
        kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def offline_target(facts: DeviceFacts):
    """Launchers choose their configs for `facts` (any device) while inside."""
    global _TARGET
    previous, _TARGET = _TARGET, facts
    try:
        yield facts
    finally:
        _TARGET = previous


@contextlib.contextmanager
def record_launches(facts: DeviceFacts):
    """Run launchers (on meta tensors) for an offline target: launches are recorded, not run."""
    global _RECORDED
    if triton_interpret():
        raise RuntimeError("offline compiles need TRITON_INTERPRET unset: the interpreter "
                           "replaces the jit functions when the kernel files are imported")
    previous, _RECORDED = _RECORDED, []
    try:
        with offline_target(facts):
            yield _RECORDED
    finally:
        _RECORDED = previous


class CompileResult(NamedTuple):
    kernel: str
    variant: str            # the constexprs that distinguish launches of one kernel
    config: str             # BLOCK sizes / warps / stages
    arch: int
    registers: int
    spill_bytes: int        # spill stores + loads reported by ptxas
    stack_bytes: int
    shared: int             # bytes of shared memory the compiled kernel asks for
    fits: bool              # shared <= the arch's opt-in limit


_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_DO", "BLOCK_D", "ROWS", "BLOCK", "RESIDENT")


def _describe(consts: dict, options: dict) -> str:
    parts = [f"{k[6:] if k.startswith('BLOCK_') else k}={consts[k]}" for k in _CONFIG_KEYS if k in consts]
    return " ".join(parts + [f"w{options.get('num_warps', 4)}", f"s{options.get('num_stages', 3)}"])


def _ptxas_report(ptx: str, arch: int) -> Dict[str, int]:
    """Registers, spills, stack of the (single) kernel in `ptx` from `ptxas -v`, cached by hash."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    ptxas = get_ptxas(arch).path
    key = hashlib.sha256((ptx + ptxas + str(arch)).encode()).hexdigest()[:32]
    cache_dir = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                             "vlmo_fast", "ptxas")
    cache_file = os.path.join(cache_dir, key + ".json")
    if os.path.exists(cache_file):
        with open(cache_file) as f:
            return json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
                               "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{arch}:\n{proc.stderr[-3000:]}")
    log = proc.stderr
    num = lambda pat: sum(int(v) for v in re.findall(pat, log))  # noqa: E731
    report = {"registers": max([int(v) for v in re.findall(r"Used (\d+) registers", log)] or [0]),
              "spill_bytes": num(r"(\d+) bytes spill stores") + num(r"(\d+) bytes spill loads"),
              "stack_bytes": max([int(v) for v in re.findall(r"(\d+) bytes stack frame", log)] or [0])}
    os.makedirs(cache_dir, exist_ok=True)
    tmp_file = cache_file + f".{os.getpid()}.tmp"
    with open(tmp_file, "w") as f:
        json.dump(report, f)
    os.replace(tmp_file, cache_file)
    return report


def _mock(arg):
    from triton.runtime.jit import MockTensor
    if isinstance(arg, torch.Tensor):
        # Fresh torch allocations are 256-byte aligned: the JIT specialises them as 16-divisible.
        return MockTensor(arg.dtype, list(arg.shape))
    return arg


def compile_launch(record: Launch, arch: int, variant_keys: tuple = (),
                   prune: Optional[Callable] = None) -> List[CompileResult]:
    """Compile one recorded launch for `arch` as the JIT would specialise it on a GPU (via
    Triton's own argument binder), once per autotune config that `prune` keeps for the arch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = record.kernel
    if isinstance(kernel, Autotuner):
        fn = kernel.fn
        configs = list(kernel.configs)
        if prune is not None:
            configs = prune(configs, arch, **record.kwargs)
        variants = [dict(c.all_kwargs()) for c in configs]
    else:
        fn, variants = kernel, [{}]
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = tuple(_mock(a) for a in record.args)
    kwargs = {k: _mock(v) for k, v in record.kwargs.items()}
    out = []
    for extra in variants:
        call_kwargs = dict(kwargs, **extra)
        bound_args, specialization, options = binder(*args, **call_kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, call_kwargs, bound_args,
                                                              specialization, options)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        consts = {k[0] if isinstance(k, tuple) else k: v for k, v in constexprs.items()}
        names = list(fn.arg_names)
        consts = {names[k] if isinstance(k, int) else k: v for k, v in consts.items()}
        report = _ptxas_report(compiled.asm["ptx"], arch)
        shared = int(compiled.metadata.shared)
        variant = " ".join(f"{k}={consts[k]}" for k in variant_keys if k in consts)
        out.append(CompileResult(fn.__name__, variant, _describe(consts, options.__dict__), arch,
                                 report["registers"], report["spill_bytes"], report["stack_bytes"],
                                 shared, shared <= ARCH_SHARED_MEMORY[arch]))
    return out
