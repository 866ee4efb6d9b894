"""Loading the compiled ops of csrc/ (torch.ops.vlmo_fast.*).

Order: the extension built at install time (`vlmo_fast._C`, see setup.py); if that is missing,
or was built before an op existed, a JIT build of csrc/ with torch.utils.cpp_extension.load
(cached by torch under ~/.cache/torch_extensions, so only the first use compiles); if neither
works, `ExtensionUnavailable` says why and how to fix it. Importing vlmo_fast never triggers
any of this: the first call that needs a compiled op does.

VLMO_FAST_NO_JIT=1 disables the JIT fallback (e.g. on a cluster where compiling on every node
is unwanted).
"""
from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import List, Optional

import torch

CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
# Ops this package expects in torch.ops.vlmo_fast; a stale build that lacks one is rebuilt.
REQUIRED_OPS = ("hard_negatives", "_gumbel_scan")   # _gumbel_scan: the CUDA scan logic's CPU test hook


class ExtensionUnavailable(RuntimeError):
    """The compiled extension could neither be imported nor JIT-built."""


_lock = threading.Lock()
_module: Optional[ModuleType] = None
_error: Optional[str] = None
_source: Optional[str] = None  # "installed" or "jit"


def _ops_present() -> bool:
    return all(hasattr(torch.ops.vlmo_fast, op) for op in REQUIRED_OPS)


def _jit_build() -> ModuleType:
    from torch.utils import cpp_extension

    sources: List[str] = sorted(str(p) for p in CSRC_DIR.glob("*.cpp"))
    if not sources:
        raise ExtensionUnavailable(
            f"no C++ sources in {CSRC_DIR} (a wheel without csrc/); reinstall from a source "
            "checkout with `pip install --no-build-isolation -e .`")
    cu_sources = sorted(str(p) for p in CSRC_DIR.glob("*.cu"))
    # A JIT CUDA build only pays off with a GPU to run on; without one build the CPU part.
    with_cuda = bool(cu_sources) and torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    # No -std flag: cpp_extension adds the standard the installed torch's headers need.
    cflags = ["-O3", "-fopenmp"] + (["-DVLMO_FAST_WITH_CUDA=1"] if with_cuda else [])
    return cpp_extension.load(
        name="vlmo_fast_C_cuda" if with_cuda else "vlmo_fast_C_cpu",
        sources=sources + (cu_sources if with_cuda else []),
        extra_cflags=cflags,
        extra_cuda_cflags=["-O3", "--use_fast_math"] if with_cuda else None,
        extra_ldflags=["-fopenmp"],
        with_cuda=with_cuda,
        verbose=os.environ.get("VLMO_FAST_JIT_VERBOSE") == "1",
    )


def load() -> ModuleType:
    """The extension module (importing it registers torch.ops.vlmo_fast.*); raises
    ExtensionUnavailable with the reason when it cannot be had."""
    global _module, _error, _source
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise ExtensionUnavailable(_error)
        installed_problem = None
        try:
            module = importlib.import_module("vlmo_fast._C")
            if _ops_present():
                _module, _source = module, "installed"
                return module
            installed_problem = ("vlmo_fast._C is stale (lacks " + ", ".join(
                op for op in REQUIRED_OPS if not hasattr(torch.ops.vlmo_fast, op)) + ")")
        except ImportError as exc:
            installed_problem = f"vlmo_fast._C not importable ({exc})"
        if os.environ.get("VLMO_FAST_NO_JIT") == "1":
            _error = (f"{installed_problem}; JIT build disabled by VLMO_FAST_NO_JIT=1. Build it "
                      "with `CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .`")
            raise ExtensionUnavailable(_error)
        try:
            module = _jit_build()
        except Exception as exc:  # compiler missing, build error, ...
            _error = (f"{installed_problem}; the JIT build of {CSRC_DIR} failed too: "
                      f"{type(exc).__name__}: {exc}. Build it with `CUDA_HOME=/usr/local/cuda "
                      "pip install --no-build-isolation -e .` (needs a C++ compiler and ninja)")
            raise ExtensionUnavailable(_error) from exc
        if not _ops_present():
            _error = f"{installed_problem}; the JIT build did not register {REQUIRED_OPS}"
            raise ExtensionUnavailable(_error)
        _module, _source = module, "jit"
        return module


def unavailable_reason(device: torch.device | str = "cpu", op: str = "hard_negatives") -> Optional[str]:
    """None when the compiled op `op` can run on `device`, else why not (for backends.register)."""
    device = torch.device(device)
    try:
        load()
    except ExtensionUnavailable as exc:
        return str(exc)
    if device.type not in ("cpu", "meta") and not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"vlmo_fast::{op}", device.type.upper()):
        return (f"the extension was built without {device.type} kernels (install with a CUDA "
                "torch and CUDA_HOME set so setup.py compiles csrc/*.cu)")
    return None


def info() -> dict:
    """Where the ops came from, for logs and benchmark notes."""
    if _module is None:
        return {"loaded": False, "error": _error}
    return {"loaded": True, "source": _source, "file": getattr(_module, "__file__", None),
            "with_cuda": bool(getattr(_module, "with_cuda", False))}
