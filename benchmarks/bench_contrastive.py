"""Symmetric image-text contrastive loss, forward + backward: time, peak memory and the largest
batch N that fits, for each implementation (`impl` in the results):

  naive         materialised N x N logits in the input dtype, cross-entropy both ways (what
                CLIP / open_clip without local_loss do): O(N^2) memory.
  local_gather  open_clip's local_loss + gather_with_grad scheme, our own code: local rows vs
                gathered columns, one GEMM per direction. On one device the gathers are
                identities, so it is two n x N logits matrices.
  inf_cl        the `inf-cl` package (tiled online LSE, one call per direction), only when
                `import inf_cl` works; otherwise a row with ms null says so.
  triton        vlmo_fast's fused kernels (contrastive_loss(..., backend="triton")).

Cases: N from 4k to 1M, D 256 and 768, bf16 features, logit_scale = log(1/0.07). Each row
also carries the loss value (a cross-check between impls) and `x_floor`, the time over the
8 N^2 D FLOP floor at this run's measured bf16 matmul rate. An impl that runs out of memory
at some N is not tried at larger N; the `max_fit` rows give the largest N of the sweep that
ran per impl. On a GPU the notes end with the issue's targets at N = 32k, D = 256.

--quick: a small CPU run (< 1 min) that times the non-Triton paths; Triton is not timed on
CPU (the interpreter is a test tool, not a benchmark).
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Results, base_parser, is_oom, measure_matmul_tflops, peak_mem_mb,  # noqa: E402
                    sync, time_ms)

IMPLS = ("naive", "local_gather", "inf_cl", "triton")


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


def _triton_fn():
    from vlmo_fast.losses import contrastive_loss

    def triton_loss(img, txt, logit_scale):
        return contrastive_loss(img, txt, logit_scale, backend="triton", gather=False)
    return triton_loss


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
    args = p.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.quick:
        sizes = args.sizes or [512, 1024, 2048]
        dims = args.dims or [256]
    else:
        sizes = args.sizes or [4096 * 2 ** k for k in range(9)]  # 4k .. 1M
        dims = args.dims or [256, 768]
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    dname = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]

    res = Results("contrastive", device)
    peak_tflops = measure_matmul_tflops(device)
    res.peak_reference["bf16_matmul_tflops" if on_gpu else "fp32_matmul_tflops_cpu"] = peak_tflops

    fns, why_not = {}, {}
    fns["naive"], fns["local_gather"] = naive_loss, local_gather_loss
    fns["inf_cl"], inf_reason = _inf_cl_fn()
    if fns["inf_cl"] is None:
        why_not["inf_cl"] = inf_reason
    if on_gpu:
        fns["triton"] = _triton_fn()
    else:
        fns["triton"] = None
        why_not["triton"] = "Triton is not timed on CPU (interpreter only; run on a GPU)"
    if "inf_cl" in args.impls and fns["inf_cl"] is None:
        res.notes.append(f"inf_cl: {inf_reason}")
    if not on_gpu:
        res.notes.append("CPU run: Triton kernels are not timed on CPU; memory is not measured on CPU.")

    logit_scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
    largest = {}      # (impl, D) -> largest N that ran
    failed_at = {}    # (impl, D) -> N where it first failed (OOM)
    for d in dims:
        for n in sizes:
            case = f"N={n} D={d} {dname}"
            floor_ms = 8 * n * n * d / (peak_tflops * 1e12) * 1e3
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
    res.write(args.out, ratio_to=["naive", "triton"])


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
