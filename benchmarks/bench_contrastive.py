"""Symmetric image-text contrastive loss, forward + backward: time, peak memory and the largest
batch N that fits, for each implementation (`impl` in the results):

  naive         materialised N x N logits in the input dtype, cross-entropy both ways (what
                CLIP / open_clip without local_loss do): O(N^2) memory.
  local_gather  open_clip's local_loss + gather_with_grad scheme, our own code: local rows vs
                gathered columns, one GEMM per direction. On one device the gathers are
                identities, so it is two n x N logits matrices.
  reference     vlmo_fast's "reference" backend (contrastive_loss(..., backend="reference")):
                the local_gather scheme with fp32 logits.
  chunked       vlmo_fast's "chunked" backend: plain PyTorch over tiles of S, O(N) memory,
                4 GEMMs instead of 6 (vlmo_fast/losses/contrastive_chunked.py).
  inf_cl        the `inf-cl` package (tiled online LSE, one call per direction), only when
                `import inf_cl` works; otherwise a row with ms null says so.
  triton        vlmo_fast's fused kernels (contrastive_loss(..., backend="triton")).

Cases: GPU: N from 4k to 1M, D 256 and 768, bf16; CPU: N 1k..8k, D 256, fp32.
logit_scale = log(1/0.07). Each row carries the loss value (a cross-check between impls) and
`x_floor`, its time over the 8 N^2 D FLOP floor at this run's measured matmul rate at the same
dtype (the floors measured in the run are in `peak_reference`). An impl that runs out of memory
at some N is not tried at larger N; the `max_fit` rows give the largest N of the sweep that ran.

Peak memory: on GPU the allocator's peak; on CPU (`--rss`, default on CPU) each listed
(impl, N) runs once in a fresh subprocess and reports its peak RSS above the RSS it had with the
inputs allocated (rows with pass 'fwd+bwd rss'). The CPU targets: chunked at N = 65,536 under
2 GB above the inputs, and chunked within 1.3x of reference at N = 8,192.

--quick: a small CPU run (< 1 min) without the subprocess rows. Triton is not timed on CPU
(the interpreter is a test tool, not a benchmark).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (Results, base_parser, is_oom, matmul_floor_ms, peak_mem_mb, record_floors,
                    sync, time_ms)

IMPLS = ("naive", "local_gather", "reference", "chunked", "inf_cl", "triton")
# CPU subprocess peak-RSS rows: (impl, N) at D = 256 fp32.
RSS_CASES = (("reference", 8192), ("chunked", 8192), ("reference", 65536), ("chunked", 65536))


def naive_loss(img, txt, logit_scale):
    logits = logit_scale.exp() * img @ txt.t()
    target = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def local_gather_loss(img, txt, logit_scale):
    """local_loss=True, gather_with_grad=True at world size 1: the gathered matrices are the
    local ones, and each direction gets its own (local x global) logits GEMM."""
    img_all, txt_all = img, txt  # all_gather with gradient is the identity on one rank
    target = torch.arange(img.shape[0], device=img.device)  # + rank * n on rank > 0
    scale = logit_scale.exp()
    return 0.5 * (F.cross_entropy(scale * img @ txt_all.t(), target)
                  + F.cross_entropy(scale * txt @ img_all.t(), target))


def _inf_cl_fn():
    try:
        from inf_cl import cal_inf_loss  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA extension
        return None, f"inf_cl not importable ({type(exc).__name__}: {exc})"

    def inf_cl_loss(img, txt, logit_scale):
        scale = logit_scale.exp()
        # inf-cl computes one direction per call: the symmetric loss needs both.
        return 0.5 * (cal_inf_loss(img, txt, scale=scale) + cal_inf_loss(txt, img, scale=scale))
    return inf_cl_loss, None


def _backend_fn(name):
    from vlmo_fast.losses import contrastive_loss

    def loss(img, txt, logit_scale):
        return contrastive_loss(img, txt, logit_scale, backend=name, gather=False)
    return loss


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: current, VmHWM: peak) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_child(impl: str, n: int, d: int) -> dict:
    """One fwd+bwd in this (fresh) process: peak RSS above the RSS with the inputs allocated.
    The kernel's peak-RSS mark (VmHWM) is reset to the current RSS first (writing 5 to
    /proc/self/clear_refs), so import-time peaks do not count."""
    torch.manual_seed(0)
    img, txt = _features(n, d, torch.float32, torch.device("cpu"))
    logit_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    fn = _backend_fn(impl) if impl in ("reference", "chunked") else {"naive": naive_loss,
                                                                     "local_gather": local_gather_loss}[impl]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    loss = fn(img, txt, logit_scale)
    loss.backward()
    ms = (time.perf_counter() - t0) * 1e3
    peak = _status_mb("VmHWM")
    return {"ms": ms, "loss": float(loss.detach()), "rss_with_inputs_mb": base,
            "peak_rss_above_inputs_mb": peak - base, "inputs_mb": 2 * n * d * 4 / 2**20}


def run_rss_rows(res: Results, cases, timeout_s: int) -> None:
    for impl, n in cases:
        case = f"N={n} D=256 fp32"
        if impl in ("naive", "local_gather", "reference") and 24 * n * n > 16 * 2**30:
            res.add(case, impl, "fwd+bwd rss", None,
                    note=f"not run: its n x N matrices need ~{24 * n * n / 2**30:.0f} GiB")
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", impl, str(n), "256"]
        print("subprocess:", " ".join(cmd[1:]), flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            res.add(case, impl, "fwd+bwd rss", None, note=f"timed out after {timeout_s} s")
            continue
        if proc.returncode != 0:
            res.add(case, impl, "fwd+bwd rss", None,
                    note=f"failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}")
            continue
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        res.add(case, impl, "fwd+bwd rss", out["ms"], loss=out["loss"],
                peak_rss_above_inputs_mb=out["peak_rss_above_inputs_mb"],
                inputs_mb=out["inputs_mb"], note="one call in a fresh process (ms includes warm-up)")
        print(f"{case:24s} {impl:13s} rss +{out['peak_rss_above_inputs_mb']:.0f} MB "
              f"{out['ms']:.0f} ms", flush=True)


def _features(n, d, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    img = F.normalize(torch.randn(n, d, device=device, generator=g, dtype=torch.float32), dim=1)
    txt = F.normalize(img + torch.randn(n, d, device=device, generator=g, dtype=torch.float32), dim=1)
    return img.to(dtype).requires_grad_(), txt.to(dtype).requires_grad_()


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="batch sizes N")
    p.add_argument("--dims", type=int, nargs="*", default=None, help="feature dims D")
    p.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="feature dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--row-seconds", type=float, default=3.0,
                   help="rough time budget per row: fewer repetitions for slow cases")
    p.add_argument("--rss", dest="rss", action="store_true", default=None,
                   help="CPU: subprocess peak-RSS rows for " + ", ".join(f"{i} N={n}" for i, n in RSS_CASES)
                   + " (default on CPU without --quick)")
    p.add_argument("--no-rss", dest="rss", action="store_false")
    p.add_argument("--rss-timeout", type=int, default=1200, help="seconds per subprocess row")
    p.add_argument("--rss-child", nargs=3, metavar=("IMPL", "N", "D"), help=argparse_hidden())
    args = p.parse_args(argv)
    if args.rss_child:
        impl, n, d = args.rss_child
        print(json.dumps(rss_child(impl, int(n), int(d))))
        return None
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.quick:
        sizes = args.sizes or [512, 1024, 2048]
        dims = args.dims or [256]
    elif on_gpu:
        sizes = args.sizes or [4096 * 2 ** k for k in range(9)]  # 4k .. 1M
        dims = args.dims or [256, 768]
    else:
        sizes = args.sizes or [1024, 2048, 4096, 8192]
        dims = args.dims or [256]
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    dname = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]

    res = Results("contrastive", device)
    floors = record_floors(res, device, dtypes=(dtype,))

    fns, why_not = {}, {}
    fns["naive"], fns["local_gather"] = naive_loss, local_gather_loss
    fns["reference"], fns["chunked"] = _backend_fn("reference"), _backend_fn("chunked")
    fns["inf_cl"], inf_reason = _inf_cl_fn()
    if fns["inf_cl"] is None:
        why_not["inf_cl"] = inf_reason
    if on_gpu:
        fns["triton"] = _backend_fn("triton")
    else:
        fns["triton"] = None
        why_not["triton"] = "Triton is not timed on CPU (interpreter only; run on a GPU)"
    if "inf_cl" in args.impls and fns["inf_cl"] is None:
        res.notes.append(f"inf_cl: {inf_reason}")
    if not on_gpu:
        res.notes.append(f"CPU run ({torch.get_num_threads()} threads, a machine shared with other "
                         "jobs: see the load average): Triton is not timed on CPU; peak memory "
                         "comes from the subprocess 'fwd+bwd rss' rows.")

    logit_scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
    largest = {}      # (impl, D) -> largest N that ran
    failed_at = {}    # (impl, D) -> N where it first failed (OOM)
    for d in dims:
        for n in sizes:
            case = f"N={n} D={d} {dname}"
            floor_ms = matmul_floor_ms(8 * n * n * d, floors, dtype)
            try:
                img, txt = _features(n, d, dtype, device)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                for impl in args.impls:
                    res.add(case, impl, "fwd+bwd", None, note="inputs do not fit")
                continue
            for impl in args.impls:
                fn = fns[impl]
                if fn is None:
                    res.add(case, impl, "fwd+bwd", None, note=why_not[impl])
                    continue
                if (impl, d) in failed_at:
                    res.add(case, impl, "fwd+bwd", None,
                            note=f"not run: failed already at N={failed_at[(impl, d)]}")
                    continue

                def step():
                    img.grad = txt.grad = logit_scale.grad = None
                    loss = fn(img, txt, logit_scale)
                    loss.backward()
                    return loss

                try:
                    t0 = time.perf_counter()
                    loss = float(step())
                    sync(device)
                    once_s = time.perf_counter() - t0
                    reps = args.reps or max(2, min(20, int(args.row_seconds / max(once_s, 1e-4))))
                    ms = time_ms(step, device, warmup=1 if once_s > 0.5 else 3, reps=reps)
                    mem = peak_mem_mb(step, device)
                except Exception as exc:
                    # One impl failing (OOM, or e.g. an inf_cl API mismatch) must not cost the
                    # rest of the sweep: record why and stop trying that impl at larger N.
                    failed_at[(impl, d)] = n
                    note = "out of memory" if is_oom(exc) else f"error: {type(exc).__name__}: {str(exc)[:300]}"
                    if not is_oom(exc):
                        print(f"{case} {impl}: {note}", file=sys.stderr, flush=True)
                    res.add(case, impl, "fwd+bwd", None, note=note)
                    img.grad = txt.grad = logit_scale.grad = None
                    if on_gpu:
                        torch.cuda.empty_cache()
                    continue
                largest[(impl, d)] = n
                res.add(case, impl, "fwd+bwd", ms, peak_mem_mb=mem, loss=loss,
                        tflops=8 * n * n * d / (ms * 1e-3) / 1e12, x_floor=ms / floor_ms)
                print(f"{case:24s} {impl:13s} {ms:10.3f} ms  mem {mem} MB  loss {loss:.5f}", flush=True)
            del img, txt
            if on_gpu:
                torch.cuda.empty_cache()

    for d in dims:
        for impl in args.impls:
            if fns[impl] is None:
                continue
            n_max = largest.get((impl, d))
            stop = failed_at.get((impl, d))
            res.add(f"max_fit D={d} {dname}", impl, "fwd+bwd", None, max_n=n_max,
                    note=(f"largest N of the sweep that ran; N={stop} failed (see its row)" if stop
                          else "largest N of the sweep that ran; every size ran"))

    if on_gpu and 256 in dims:
        _target_notes(res, f"N=32768 D=256 {dname}")
    run_rss = args.rss if args.rss is not None else (not on_gpu and not args.quick)
    if run_rss and not on_gpu:
        run_rss_rows(res, RSS_CASES, args.rss_timeout)
    if not on_gpu:
        _cpu_target_notes(res, dname)
    res.write(args.out, ratio_to=["naive", "reference", "triton"] if on_gpu else ["naive", "reference"])
    return res


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


def _cpu_target_notes(res: Results, dname: str) -> None:
    case = f"N=8192 D=256 {dname}"
    q = res.ratio(case, "fwd+bwd", "chunked", "reference")
    if q is not None:
        res.notes.append(f"target: chunked/reference at {case} = {q:.2f} (target <= 1.3) -> "
                         + ("MET" if q <= 1.3 else "NOT met"))
    for r in res.rows:
        if r["impl"] == "chunked" and r["pass"] == "fwd+bwd rss" and r["case"].startswith("N=65536"):
            mb = r.get("peak_rss_above_inputs_mb")
            if mb is None:
                res.notes.append(f"target: chunked at N=65536 did not run ({r.get('note')})")
            else:
                res.notes.append(f"target: chunked at N=65536 fp32 D=256 ran in {r['ms'] / 1e3:.0f} s "
                                 f"with peak RSS {mb:.0f} MB above the inputs (target < 2048) -> "
                                 + ("MET" if mb < 2048 else "NOT met"))


def _target_notes(res: Results, case: str) -> None:
    rows = {r["impl"]: r for r in res.rows if r["case"] == case}
    tri, naive, inf = rows.get("triton"), rows.get("naive"), rows.get("inf_cl")
    if not tri or tri["ms"] is None:
        res.notes.append(f"targets at {case}: triton did not run")
        return
    msg = [f"targets at {case}: triton {tri['ms']:.3f} ms, {tri['x_floor']:.2f}x the 8N^2D floor "
           f"(target <= 1.5x)"]
    if naive and naive["ms"] is not None:
        msg.append(f"time vs naive {tri['ms'] / naive['ms']:.2f}x (target <= 1)")
        if naive.get("peak_mem_mb"):
            msg.append(f"memory vs naive {100 * tri['peak_mem_mb'] / naive['peak_mem_mb']:.1f}% (target <= 5%)")
    if inf and inf["ms"] is not None:
        msg.append(f"speed-up vs inf_cl {inf['ms'] / tri['ms']:.2f}x (target >= 1.5)")
    res.notes.append("; ".join(msg))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
