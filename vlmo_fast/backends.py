"""The one dispatch point for compute backends.

Every op that has several implementations (the MoME feed-forward, the shared attention,
the contrastive loss, ...) asks `resolve(op, requested, device)` which implementation to
run. Resolution order: an explicit per-module/per-call request, then the process-wide
override (`set_backend(...)` or the environment variable `VLMO_FAST_<OP>_BACKEND`), then
the op's automatic policy. Implementations register themselves with `register`, so a
kernel module plugs in without editing this file: `register(op, name, fn, available=,
accepts=, preference=)` stores the function itself, and each op's dispatch calls
`implementation(op, name)` for the name `resolve` picked, so one plug-in API serves every op
("ffn", "attention", "contrastive", "hard_negatives"; `register_ffn_impl` and
`register_attention_impl` are thin aliases). `unregister` undoes a registration. Whatever ran
is recorded in `last_used()` and logged once at INFO, so a run can always say which path it
took.

Two questions are asked of each implementation: `available(device)` (can it run on this
device at all: installed, compiled, right hardware) and, per call, `accepts(facts)` (can it
take THIS input: dtype, head size, an additive bias, a memory budget, ...). The call's
facts are keyword arguments of `resolve(op, requested, device, **facts)`. An explicit
request that is unavailable or does not accept the input raises; the automatic choice skips
such implementations (and warns once on CUDA when it skips the preferred one). An op's
preference may be a list per device type or a callable `facts -> list` when the best order
depends on the input (e.g. attention with or without a relative-position bias).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from .env import env_choice

logger = logging.getLogger("vlmo_fast")

AUTO = "auto"


Facts = Dict[str, Any]
# per device type: an ordered list of names, or a callable facts -> ordered list
Preference = Union[List[str], Callable[[Facts], List[str]]]


@dataclass
class _Impl:
    name: str
    # the implementation itself, called by the op with the op's calling convention
    fn: Callable
    # available(device) -> None when usable, else a short reason string.
    available: Callable[[torch.device], Optional[str]]
    # accepts(facts) -> None when this call's input can run here, else a short reason.
    accepts: Optional[Callable[[Facts], Optional[str]]] = None


_UNSET = object()


@dataclass
class _Registration:
    """What one `register` call replaced, so that `unregister` can put it back."""
    previous: Optional[_Impl]
    # device type -> (the order it replaced, or _UNSET; the order it set)
    preference: Dict[str, tuple] = field(default_factory=dict)


@dataclass
class _Op:
    name: str
    # auto preference order per device type; the first usable implementation wins.
    preference: Dict[str, Preference] = field(default_factory=dict)
    impls: Dict[str, _Impl] = field(default_factory=dict)
    override: Optional[str] = None
    # name -> its registrations, oldest first (unregister undoes the latest)
    history: Dict[str, List[_Registration]] = field(default_factory=dict)


_OPS: Dict[str, _Op] = {}
_LAST_USED: Dict[str, str] = {}
_WARNED: set = set()


def always_available(_device: torch.device) -> Optional[str]:
    """The `available` check of an implementation that runs on every device."""
    return None


_always = always_available


def _check_hook(what: str, hook, optional: bool) -> None:
    if hook is None and optional:
        return
    if not callable(hook):
        raise TypeError(f"{what} must be callable{' or None' if optional else ''}, got "
                        f"{type(hook).__name__}")


def register(op: str, name: str, fn: Optional[Callable] = None, *,
             available: Optional[Callable[[torch.device], Optional[str]]] = None,
             accepts: Optional[Callable[[Facts], Optional[str]]] = None,
             preference: Optional[Dict[str, Preference]] = None) -> None:
    """Register `fn` as implementation `name` of `op`: the op's dispatch resolves a name and
    calls the function stored here (`implementation(op, name)`) with the op's calling
    convention (each op's module documents it).

    available(device) -> None or the reason it cannot run on that device (default: runs
    everywhere); accepts(facts) -> None or the reason it cannot take a call with these facts
    (the keyword arguments the op passes to `resolve`; a fact missing from `facts` is unknown,
    e.g. in `backend_report()`, and should be accepted; default: takes every input);
    `preference` (device type -> ordered names, or a callable facts -> ordered names;
    "default" for other device types) sets or replaces the op's automatic policy for those
    device types.

    Registering an existing name replaces it (`unregister` brings the replaced one back).
    fn=None updates an existing name: its function stays, and so do the hooks not given."""
    entry = _OPS.setdefault(op, _Op(op))
    previous = entry.impls.get(name)
    if fn is None:
        if previous is None:
            raise ValueError(f"{op!r} has no backend {name!r} yet: register it with its function "
                             f"(fn=None only updates an existing one)")
        fn = previous.fn
        available = previous.available if available is None else available
        accepts = previous.accepts if accepts is None else accepts
    _check_hook("fn", fn, optional=False)
    _check_hook("available", available, optional=True)
    _check_hook("accepts", accepts, optional=True)
    if preference is not None and not isinstance(preference, dict):
        raise TypeError(f"preference must be a dict of device type -> order, got "
                        f"{type(preference).__name__}")
    record = _Registration(previous)
    for device_type, order in (preference or {}).items():
        record.preference[device_type] = (entry.preference.get(device_type, _UNSET), order)
        entry.preference[device_type] = order
    entry.impls[name] = _Impl(name, fn, available or always_available, accepts)
    entry.history.setdefault(name, []).append(record)


def unregister(op: str, name: str) -> None:
    """Undo the latest `register(op, name, ...)` (e.g. a plug-in registered for a test): the
    implementation it replaced comes back (else the name is removed), and so does each
    automatic order it replaced, unless a later registration has replaced that one since.
    Names left in preference orders are skipped; an op left without implementations is
    forgotten."""
    entry = _OPS.get(op)
    if entry is None or name not in entry.impls:
        raise ValueError(f"{op!r} has no backend {name!r} to unregister")
    record = entry.history[name].pop()
    if record.previous is None:
        del entry.impls[name]
        del entry.history[name]
        if entry.override == name:
            entry.override = None
    else:
        entry.impls[name] = record.previous
    for device_type, (replaced, order) in record.preference.items():
        if entry.preference.get(device_type) is not order:
            continue   # registered over since: that registration owns the order now
        if replaced is _UNSET:
            del entry.preference[device_type]
        else:
            entry.preference[device_type] = replaced
    if not entry.impls:
        del _OPS[op]   # its last implementation is gone: forget the op


def implementation(op: str, name: str) -> Callable:
    """The function registered as implementation `name` of `op` (what the op's dispatch
    calls once `resolve` has picked `name`)."""
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(_OPS)}")
    impl = _OPS[op].impls.get(name)
    if impl is None:
        raise ValueError(f"unknown {op} backend {name!r}; expected one of {sorted(_OPS[op].impls)}")
    return impl.fn


def set_backend(op: str, name: Optional[str]) -> None:
    """Process-wide override for `op` ("auto" or None restores the automatic choice)."""
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(_OPS)}")
    if name not in (None, AUTO) and name not in _OPS[op].impls:
        raise ValueError(f"unknown backend {name!r} for {op!r}; expected one of "
                         f"{[AUTO] + sorted(_OPS[op].impls)}")
    _OPS[op].override = None if name in (None, AUTO) else name


def available_backends(op: str, device: torch.device | str = "cpu") -> Dict[str, Optional[str]]:
    """name -> None if usable on `device`, else the reason it is not."""
    device = torch.device(device)
    return {n: impl.available(device) for n, impl in _OPS[op].impls.items()}


def _why_not(impl: _Impl, device: torch.device, facts: Facts) -> Optional[str]:
    reason = impl.available(device)
    if reason is None and impl.accepts is not None:
        reason = impl.accepts(facts)
    return reason


def rejection_reason(op: str, name: str, device: torch.device | str | None = None,
                     **facts) -> Optional[str]:
    """None when implementation `name` of `op` can run on `device` for a call with these
    facts, else the reason it cannot (what `resolve` would say). device=None asks only
    whether it accepts the input (its `accepts(facts)` hook)."""
    if op not in _OPS or name not in _OPS[op].impls:
        raise ValueError(f"unknown {op!r} backend {name!r}")
    impl = _OPS[op].impls[name]
    if device is None:
        return None if impl.accepts is None else impl.accepts(facts)
    return _why_not(impl, torch.device(device), facts)


def preference_order(op: str, device: torch.device | str, **facts) -> List[str]:
    """The automatic policy's order of implementations for `op` on `device` and these facts."""
    entry = _OPS[op]
    device = torch.device(device)
    pref = entry.preference.get(device.type) or entry.preference.get("default")
    if pref is None:
        return list(entry.impls)
    return list(pref(facts) if callable(pref) else pref)


def resolve(op: str, requested: Optional[str], device: torch.device | str, **facts) -> str:
    """Pick the implementation of `op` to run on `device` for a call described by `facts`.

    An explicit request (argument, then override, then environment) that cannot run here or
    cannot take this input raises: asking for a backend and silently getting another would
    hide a slow path.
    """
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(_OPS)}")
    entry = _OPS[op]
    device = torch.device(device)
    missing = _no_device_reason(device)
    if missing is not None:
        raise RuntimeError(f"{op} cannot run on {device}: {missing}")
    for source, name in (("argument", requested), ("set_backend", entry.override),
                         ("environment", env_choice(f"VLMO_FAST_{op.upper()}_BACKEND"))):
        if name in (None, "", AUTO):
            continue
        if name not in entry.impls:
            raise ValueError(f"{op} backend {name!r} (from {source}) is unknown; expected one "
                             f"of {[AUTO] + sorted(entry.impls)}")
        impl = entry.impls[name]
        reason = impl.available(device)
        if reason is not None:
            raise RuntimeError(f"{op} backend {name!r} (from {source}) cannot run on "
                               f"{device}: {reason}")
        if impl.accepts is not None:
            reason = impl.accepts(facts)
            if reason is not None:
                raise ValueError(f"{op} backend {name!r} (from {source}) cannot run this "
                                 f"input: {reason}")
        return _record(op, name, device)
    reasons = []
    for name in preference_order(op, device, **facts):
        impl = entry.impls.get(name)
        if impl is None:
            continue
        reason = _why_not(impl, device, facts)
        if reason is None:
            if reasons and device.type == "cuda":
                key = (op, name)
                if key not in _WARNED:
                    _WARNED.add(key)
                    warnings.warn(f"vlmo_fast: {op} falls back to {name!r} on {device}: "
                                  + "; ".join(reasons), RuntimeWarning, stacklevel=3)
            return _record(op, name, device)
        reasons.append(f"{name} unavailable ({reason})")
    raise RuntimeError(f"no usable {op} backend on {device}: " + "; ".join(reasons))


def _record(op: str, name: str, device: torch.device) -> str:
    if torch.compiler.is_compiling():
        # while dynamo traces: no logging (a graph break) and no run-time record to keep
        return name
    key = f"{op}@{device.type}"
    if _LAST_USED.get(key) != name:
        logger.info("vlmo_fast: %s runs on backend %r (%s)", op, name, device.type)
        _LAST_USED[key] = name
    return name


def reset_warnings() -> None:
    """Forget which fallbacks were warned about (each warns once per process)."""
    _WARNED.clear()


def last_used() -> Dict[str, str]:
    """'op@device_type' -> the backend that ran most recently."""
    return dict(_LAST_USED)


def _no_device_reason(device: torch.device) -> Optional[str]:
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available here (torch.cuda.is_available() is False)"
    return None


def backend_report(device: torch.device | str | None = None) -> Dict[str, Dict[str, str]]:
    """For each op: each backend and whether it is usable on `device` (or why not), and
    "auto": what the automatic choice picks. For ops whose choice depends on the input
    (dtype, bias, packing, ...) "auto" gives the preference order and says so: the backend
    that actually ran is in `last_used()`. A device that is not present here is reported
    as such instead of raising."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    missing = _no_device_reason(device)
    report = {}
    for op in sorted(_OPS):
        entry = _OPS[op]
        if missing is not None:
            report[op] = {n: f"unavailable: {missing}" for n in entry.impls}
            report[op]["auto"] = f"none ({missing})"
            continue
        avail = available_backends(op, device)
        report[op] = {n: ("ok" if r is None else f"unavailable: {r}") for n, r in avail.items()}
        pref = entry.preference.get(device.type) or entry.preference.get("default")
        order = [n for n in preference_order(op, device) if n in entry.impls]
        usable = [n for n in order if avail[n] is None]
        input_dependent = callable(pref) or any(entry.impls[n].accepts is not None for n in usable)
        try:
            chosen = resolve(op, AUTO, device)
        except RuntimeError as exc:
            report[op]["auto"] = f"none ({exc})"
            continue
        if input_dependent and len(usable) > 1:
            report[op]["auto"] = (f"depends on the input: the first of {', '.join(usable)} that "
                                  "accepts it (see backends.last_used() for what ran)")
        else:
            report[op]["auto"] = chosen
    return report
