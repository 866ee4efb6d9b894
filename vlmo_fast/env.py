"""Device, dtype and environment facts shared by every op (one place, like timm's
`layers/config.py`): which dtypes the kernels take, how the Triton interpreter switch is
parsed, whether Triton can run on a device, and how `VLMO_FAST_*` settings are read.

Environment settings are read per call (never cached at import), so tests and users can
change them at run time; the one exception is TRITON_INTERPRET, which Triton itself reads
when it is first imported (set it before importing triton / vlmo_fast.kernels).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

# Integer dtypes accepted for ids and indices (routing ids, token ids, positions).
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# Float dtypes the Triton/CUDA kernels are compiled for (fp64 runs on the reference paths).
KERNEL_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_TRUE = ("1", "true", "yes", "on", "y")
_FALSE = ("", "0", "false", "no", "off", "n")


def env_flag(name: str, default: bool = False) -> bool:
    """A boolean environment switch; anything but a recognised true/false value raises."""
    value = os.environ.get(name)
    if value is None:
        return default
    value = value.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={os.environ[name]!r}: expected one of "
                     f"{_TRUE[:2]} (on) or {_FALSE[1:3]} (off)")


def env_choice(name: str, default: Optional[str] = None) -> Optional[str]:
    """A string environment setting (None / default when unset or empty)."""
    value = os.environ.get(name, "").strip()
    return value or default


def triton_interpret() -> bool:
    """True when TRITON_INTERPRET asks Triton to interpret kernels on the CPU (parsed as
    Triton parses it: 1/true/yes/on)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def triton_available(device: torch.device) -> Optional[str]:
    """None when Triton kernels can run on `device`, else the reason they cannot."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if triton_interpret():
        return None  # the interpreter: correct but very slow (tests only)
    return "Triton kernels need a CUDA device (on CPU only with TRITON_INTERPRET=1, for tests)"


# Device types torch.autocast knows (others, e.g. "meta", raise inside is_autocast_enabled).
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would run a GEMM on `x` in right now, or None when autocast is off
    on x's device type (or it has no autocast) or leaves x alone (autocast casts only
    fp32/fp16/bf16 tensors, never fp64)."""
    device_type = x.device.type
    if x.dtype not in KERNEL_FLOAT_DTYPES or device_type not in _AUTOCAST_DEVICE_TYPES \
            or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def compile_time_constant(fn):
    """`torch.compiler.assume_constant_result` without its cost at import time: the public
    decorator imports torch._dynamo (seconds, and it pulls in triton) only to set this
    marker on `fn`, which dynamo reads when it traces a call. tests/test_packaging.py checks
    that the public decorator still sets exactly this marker."""
    fn._dynamo_marked_constant = True
    return fn
