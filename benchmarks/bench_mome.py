"""MoME feed-forward: published slicing vs per-expert loop vs torch._grouped_mm vs our Triton
kernels vs one dense FFN, forward and forward+backward, in VLMo's token mixes.

impl names (stable across runs):
  reference_slice   the published layout: slice [text ; image] at the fixed text length 40,
                    run each expert's LN/FFN (nn.Linear-style), concatenate; a packed batch
                    runs its pair / image-only / text-only parts as separate calls
  expert_loop       vlmo_fast reference backend: per-expert index_select / index_copy
  grouped_mm        vlmo_fast "grouped_mm" backend (torch._grouped_mm, one call per GEMM)
  triton            vlmo_fast "triton" backend (keeps the fc1 pre-activation for dGELU)
  triton_recompute  the same kernels, recomputing the pre-activation in backward
  dense             ONE FFN (LN -> fc1 -> GELU -> fc2, gamma, residual) over the same tokens:
                    the zero-routing-overhead floor
passes: fwd (no autograd graph) and fwd+bwd (grads of x, every weight and gamma).
On GPU, rows with pass 'stage' time each Triton kernel of the path alone at pairs T~16k
(impl 'triton:<kernel>') beside a torch.mm of the same FLOPs on one expert
('torch_mm:<kernel>'): per-GEMM efficiency against cuBLAS, for tuning (--no-breakdown skips).
FLOPs: 4*T*d*h forward, 12*T*d*h forward+backward (whatever an impl actually computes).
'x vs R' columns = ms(impl) / ms(R) for the same case and pass (< 1: faster than R).

On CPU (no Triton timing there) the default is VLMo-Base (d=768, h=3072): fp32 at T ~ 1k (all
mixes) and T ~ 4k (pairs, packed), bf16 at T ~ 1k (pairs, once: CPU bf16 matmuls are emulated
on AVX2 machines); T = 8k and larger take too long on a shared 2-core machine (CPU_PLAN).
--quick uses small shapes (d=128, h=512).
The run's floors (memory bandwidth, matmul rate at each dtype) are in `peak_reference`;
pct_peak is a row's FLOP rate over the matmul rate measured at its own dtype.

  python benchmarks/bench_mome.py               # GPU: base + large, T = 2k..64k, all mixes
  python benchmarks/bench_mome.py --device cpu  # CPU: base sizes as above
  python benchmarks/bench_mome.py --quick       # CPU smoke: small shapes, no Triton timing
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from common import Results, base_parser, is_oom, peak_mem_mb, record_floors, time_ms

from vlmo_fast.mome import (VISION, LANGUAGE, mome_ffn_grouped_mm, mome_ffn_reference,
                            mome_ffn_triton)

TEXT_LEN, IMAGE_LEN = 40, 197          # VLMo: text padded to 40; 1 CLS + 196 patches
PRESETS = {"base": (768, 3072), "large": (1024, 4096)}
MIXES = ("pairs", "image", "text", "packed")
IMPLS = ("reference_slice", "expert_loop", "grouped_mm", "triton", "triton_recompute", "dense")
EPS = 1e-6
CPU_D, CPU_H = 128, 512  # CPU --quick shapes
# CPU default plan at base sizes: (dtype, target token counts, mixes, repetitions). bf16
# matmuls on CPUs without AVX512-BF16/AMX are emulated (~50x slower than fp32 on the 2-core
# AVX2 machine of benchmarks/results/), so bf16 runs one mix at the smallest T, once.
CPU_PLAN = ((torch.float32, (1024,), MIXES, 3), (torch.float32, (4096,), ("pairs", "packed"), 3),
            (torch.bfloat16, (1024,), ("pairs",), 1))


class Case:
    """A batch of one VLMo mix: flat routing ids + the sub-batch layout the published code uses."""

    def __init__(self, mix: str, target_tokens: int):
        unit = {"pairs": TEXT_LEN + IMAGE_LEN, "image": IMAGE_LEN, "text": TEXT_LEN,
                "packed": 2 * (TEXT_LEN + IMAGE_LEN)}[mix]
        n = max(1, round(target_tokens / unit))
        # parts: (kind, samples); a packed batch holds n pairs, n image-only, n text-only samples.
        self.parts = {"pairs": [("pairs", n)], "image": [("image", n)], "text": [("text", n)],
                      "packed": [("pairs", n), ("image", n), ("text", n)]}[mix]
        ids = []
        for kind, samples in self.parts:
            one = {"pairs": [LANGUAGE] * TEXT_LEN + [VISION] * IMAGE_LEN,
                   "image": [VISION] * IMAGE_LEN, "text": [LANGUAGE] * TEXT_LEN}[kind]
            ids += one * samples
        self.ids_list = ids
        self.tokens = len(ids)
        self.mix = mix


def ln_ffn(x, w, e, gamma):
    """One expert in the published style (LayerNorm module + Linear/GELU/Linear on (out,in))."""
    z = F.layer_norm(x, (x.shape[-1],), w["norm_weight"][e], w["norm_bias"][e], EPS)
    hid = F.gelu(F.linear(z, w["fc1_weight"][e].t(), w["fc1_bias"][e]))
    return x + gamma * F.linear(hid, w["fc2_weight"][e].t(), w["fc2_bias"][e])


def reference_slice(case: Case, x, w, gamma):
    outs, start = [], 0
    for kind, samples in case.parts:
        length = {"pairs": TEXT_LEN + IMAGE_LEN, "image": IMAGE_LEN, "text": TEXT_LEN}[kind]
        xb = x[start:start + samples * length].view(samples, length, -1)
        start += samples * length
        if kind == "pairs":
            xb = torch.cat([ln_ffn(xb[:, :TEXT_LEN], w, LANGUAGE, gamma),
                            ln_ffn(xb[:, TEXT_LEN:], w, VISION, gamma)], dim=1)
        else:
            xb = ln_ffn(xb, w, VISION if kind == "image" else LANGUAGE, gamma)
        outs.append(xb.reshape(-1, x.shape[-1]))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def make_fn(impl: str, case: Case, w: dict):
    args = lambda: [w[k] for k in ("norm_weight", "norm_bias", "fc1_weight", "fc1_bias",  # noqa
                                   "fc2_weight", "fc2_bias")]
    if impl == "reference_slice":
        return lambda x, ids, gamma: reference_slice(case, x, w, gamma)
    if impl == "expert_loop":
        return lambda x, ids, gamma: mome_ffn_reference(x, ids, *args(), gamma, None, EPS)
    if impl == "grouped_mm":
        return lambda x, ids, gamma: mome_ffn_grouped_mm(x, ids, *args(), gamma, None, EPS)
    if impl in ("triton", "triton_recompute"):
        rec = impl == "triton_recompute"
        return lambda x, ids, gamma: mome_ffn_triton(x, ids, *args(), gamma, None, EPS,
                                                     recompute_preact=rec)
    if impl == "dense":
        return lambda x, ids, gamma: ln_ffn(x, w, VISION, gamma)
    raise ValueError(impl)


def expert_weights(d: int, h: int, gen: torch.Generator, device, dtype=torch.float32):
    """Three experts' LN/fc1/fc2 parameters drawn from the CPU generator `gen` (leaf tensors
    needing grad) and gamma."""
    w = {"norm_weight": 1 + 0.1 * torch.randn(3, d, generator=gen),
         "norm_bias": 0.1 * torch.randn(3, d, generator=gen),
         "fc1_weight": 0.02 * torch.randn(3, d, h, generator=gen),
         "fc1_bias": 0.02 * torch.randn(3, h, generator=gen),
         "fc2_weight": 0.02 * torch.randn(3, h, d, generator=gen),
         "fc2_bias": 0.02 * torch.randn(3, d, generator=gen)}
    w = {k: v.to(device=device, dtype=dtype).requires_grad_() for k, v in w.items()}
    return w, torch.full((d,), 0.1, device=device, dtype=dtype, requires_grad=True)


def run_case(res: Results, device, dtype, preset, d, h, case: Case, impls, reps, peak,
             warmup: int = 3):
    t = case.tokens
    name = f"{case.mix} T={t} d={d} h={h} {str(dtype).replace('torch.', '')}"
    gen = torch.Generator(device="cpu").manual_seed(0)
    w, gamma = expert_weights(d, h, gen, device, dtype)
    x = torch.randn(t, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    ids = torch.tensor(case.ids_list, device=device)
    grad_out = torch.randn(t, d, generator=gen).to(device=device, dtype=dtype)
    leaves = [x, gamma, *w.values()]
    check = None
    for impl in impls:
        fn = make_fn(impl, case, w)

        def fwd():
            with torch.no_grad():
                return fn(x, ids, gamma)

        def fwd_bwd():
            out = fn(x, ids, gamma)
            return torch.autograd.grad(out, leaves, grad_out, allow_unused=True)

        extra = {"T": t}
        try:
            out = fwd()
            if impl != "dense":
                if check is None:
                    check = out.float()
                extra["max_err_vs_first"] = float((out.float() - check).abs().max())
            for pass_, f, flops in (("fwd", fwd, 4 * t * d * h), ("fwd+bwd", fwd_bwd, 12 * t * d * h)):
                ms = time_ms(f, device, warmup=warmup, reps=reps)
                tflops = flops / (ms * 1e-3) / 1e12
                res.add(name, impl, pass_, ms, tflops=tflops, pct_peak=100 * tflops / peak,
                        peak_mem_mb=peak_mem_mb(f, device), **extra)
        except Exception as exc:  # keep the run going: the row says why it has no time
            if not is_oom(exc) and device.type != "cuda":
                raise
            note = "out of memory" if is_oom(exc) else f"{type(exc).__name__}: {exc}"[:200]
            for pass_ in ("fwd", "fwd+bwd"):
                res.add(name, impl, pass_, None, note=note, **extra)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"{name:40s} {impl:17s} " + " ".join(
            f"{r['pass']}={r['ms']}" for r in res.rows[-2:]), flush=True)


def summarize(res: Results) -> list:
    """Where the triton rows stand against the issue's targets (same-run ratios only)."""
    lines = []
    cases = sorted({(r["case"], r["T"]) for r in res.rows if "T" in r}, key=lambda c: c[1])

    def worst(pass_, den, pred):
        vals = [res.ratio(c, pass_, "triton", den) for c, t in cases if pred(t)]
        vals = [v for v in vals if v is not None]
        return (min(vals), max(vals)) if vals else None

    for label, pass_, den, pred, goal in [
            ("fwd+bwd triton/dense at T>=16k (target <= 1.05)", "fwd+bwd", "dense",
             lambda t: t >= 16000, 1.05),
            ("fwd+bwd triton/reference_slice at T>=16k (target <= 1/1.3 = 0.77)", "fwd+bwd",
             "reference_slice", lambda t: t >= 16000, 1 / 1.3),
            ("fwd+bwd triton/reference_slice at T<=4k (target <= 0.5)", "fwd+bwd",
             "reference_slice", lambda t: t <= 4500, 0.5),
            ("fwd triton/reference_slice at T<=4k (target <= 0.5)", "fwd",
             "reference_slice", lambda t: t <= 4500, 0.5),
            ("fwd+bwd triton/grouped_mm, all T (target < 1)", "fwd+bwd", "grouped_mm",
             lambda t: True, 1.0),
            ("fwd triton/grouped_mm, all T (target < 1)", "fwd", "grouped_mm",
             lambda t: True, 1.0)]:
        rng = worst(pass_, den, pred)
        if rng is None:
            continue
        status = "MET" if rng[1] <= goal else "NOT met"
        lines.append(f"{label}: ratios {rng[0]:.2f}..{rng[1]:.2f} -> {status}")
    for pass_ in ("fwd+bwd",):
        vals = [res.ratio(c, pass_, "triton_recompute", "triton") for c, _ in cases]
        vals = [v for v in vals if v is not None]
        if vals:
            lines.append(f"{pass_} triton_recompute/triton (recompute the pre-activation vs keep "
                         f"it): {min(vals):.2f}..{max(vals):.2f} (> 1: keeping it is faster)")
    return lines


def cpu_summary(res: Results) -> list:
    """Where the CPU paths stand against the dense floor (same-run ratios)."""
    lines = []
    for impl in ("grouped_mm", "expert_loop", "reference_slice"):
        for pass_ in ("fwd", "fwd+bwd"):
            by_dtype = {}
            for r in res.rows:
                if r["impl"] == impl and r["pass"] == pass_ and r["ms"] is not None:
                    q = res.ratio(r["case"], pass_, impl, "dense")
                    if q is not None:
                        by_dtype.setdefault(r["case"].split()[-1], []).append(q)
            for dt, qs in sorted(by_dtype.items()):
                lines.append(f"{impl}/dense {pass_} {dt}: {min(qs):.2f}..{max(qs):.2f} "
                             f"(median {sorted(qs)[len(qs) // 2]:.2f}) over {len(qs)} cases")
    return lines


def stage_breakdown(res: Results, device, dtype, d, h, case: Case, reps: int, peak: float):
    """Each Triton kernel of one forward+backward timed alone, and each GEMM beside a plain
    torch.mm (cuBLAS) of the same FLOPs on one expert: where the time goes, and each grouped
    GEMM's efficiency against the vendor library (rows impl 'triton:<stage>' / 'torch_mm:<stage>',
    pass 'stage')."""
    from vlmo_fast.kernels import mome_ffn as K
    t = case.tokens
    name = f"stages {case.mix} T={t} d={d} h={h} {str(dtype).replace('torch.', '')}"
    gen = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *shape, s=0.02: (s * torch.randn(*shape, generator=gen)).to(device, dtype)  # noqa
    nw, nb = 1 + mk(3, d, s=0.1), mk(3, d, s=0.1)
    w1, b1, w2, b2 = mk(3, d, h), mk(3, h), mk(3, h, d), mk(3, d)
    gamma = torch.full((d,), 0.1, device=device, dtype=dtype)
    x, dout = mk(t, d, s=1.0), mk(t, d, s=1.0)
    ids = torch.tensor(case.ids_list, device=device)
    perm, offsets = K.route(ids, 3)
    z, mean, rstd = K.gather_layernorm(x, perm, offsets, nw, nb, EPS)
    preact = torch.empty(t, h, device=device, dtype=dtype)
    act = K.grouped_gemm(z, w1, offsets, K.EPI_GELU, bias=b1, aux=preact, store_aux=True)
    out, branch = torch.empty_like(x), torch.empty_like(x)
    dy, _ = K.gather_grad(dout, perm, gamma, None, branch)
    dh = K.grouped_gemm(dy, w2.transpose(1, 2), offsets, K.EPI_DGELU, aux=preact)
    dz = K.grouped_gemm(dh, w1.transpose(1, 2), offsets, K.EPI_PLAIN, out_dtype=torch.float32)
    gemm = 2 * t * d * h
    stages = [
        ("route", lambda: K.route(ids, 3), 0, None),
        ("gather_ln", lambda: K.gather_layernorm(x, perm, offsets, nw, nb, EPS), 0, None),
        ("fc1_gelu", lambda: K.grouped_gemm(z, w1, offsets, K.EPI_GELU, bias=b1, aux=preact,
                                            store_aux=True), gemm, lambda: z @ w1[0]),
        ("fc2_residual", lambda: K.grouped_gemm(act, w2, offsets, K.EPI_RESIDUAL, out=out, bias=b2,
                                                aux=branch, store_aux=True, perm=perm, x=x,
                                                gamma=gamma), gemm, lambda: act @ w2[0]),
        ("gather_grad", lambda: K.gather_grad(dout, perm, gamma, None, branch), 0, None),
        ("wgrad_fc2", lambda: K.grouped_wgrad(act, dy, offsets, 3, True, dtype), gemm,
         lambda: act.t() @ dy),
        ("dgelu", lambda: K.grouped_gemm(dy, w2.transpose(1, 2), offsets, K.EPI_DGELU,
                                         aux=preact), gemm, lambda: dy @ w2[0].t()),
        ("dgelu_recompute", lambda: K.grouped_gemm(dy, w2.transpose(1, 2), offsets, K.EPI_DGELU,
                                                   bias=b1, recompute_from=(z, w1)), 2 * gemm,
         None),
        ("wgrad_fc1", lambda: K.grouped_wgrad(z, dh, offsets, 3, True, dtype), gemm,
         lambda: z.t() @ dh),
        ("dz", lambda: K.grouped_gemm(dh, w1.transpose(1, 2), offsets, K.EPI_PLAIN,
                                      out_dtype=torch.float32), gemm, lambda: dh @ w1[0].t()),
        ("ln_bwd", lambda: K.layernorm_backward_scatter(dz, x, dout, perm, offsets, nw, mean,
                                                        rstd), 0, None),
    ]
    for stage, fn, flops, vendor in stages:
        for impl, f in ((f"triton:{stage}", fn), (f"torch_mm:{stage}", vendor)):
            if f is None:
                continue
            ms = time_ms(f, device, warmup=3, reps=reps)
            extra = {"T": t}
            if flops:
                extra["tflops"] = flops / (ms * 1e-3) / 1e12
                extra["pct_peak"] = 100 * extra["tflops"] / peak
            res.add(name, impl, "stage", ms, **extra)


def autotune_choices() -> list:
    """The block configs the autotuner picked, per kernel and key (for the next tuning pass),
    with the weight gradient's row SPLIT (1 = unsplit)."""
    from vlmo_fast.kernels import mome_ffn as K
    lines = []
    for name, tuner in (("grouped_gemm", K._gemm), ("wgrad", K._wgrad)):
        for key, cfg in sorted(getattr(tuner, "cache", {}).items(), key=str):
            kw = cfg.kwargs
            split = f" SPLIT={kw['SPLIT']}" if "SPLIT" in kw else ""
            lines.append(f"autotune {name} {tuple(k for k in key if not isinstance(k, str))}: "
                         f"{kw.get('BLOCK_M')}x{kw.get('BLOCK_N')}x{kw.get('BLOCK_K')} "
                         f"w{cfg.num_warps} s{cfg.num_stages}{split}")
    return lines


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--preset", choices=["base", "large", "all"], default="all")
    p.add_argument("--tokens", type=int, nargs="*", default=None,
                   help="target token counts (GPU default 2048 4096 16384 65536, --quick 2048 16384; "
                        "CPU: see CPU_PLAN, --quick 256 1024)")
    p.add_argument("--mixes", nargs="*", choices=MIXES, default=list(MIXES))
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="one dtype only (default: bf16 on GPU; CPU_PLAN's fp32 and bf16 on CPU)")
    p.add_argument("--impls", nargs="*", choices=IMPLS, default=None)
    p.add_argument("--no-breakdown", action="store_true",
                   help="skip the per-kernel timing of the Triton path (GPU only)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    named = {"bf16": torch.bfloat16, "fp32": torch.float32}
    default_reps = args.reps or (20 if cuda else 10)
    if cuda:
        presets = PRESETS if args.preset == "all" else {args.preset: PRESETS[args.preset]}
        tokens = args.tokens or ([2048, 16384] if args.quick else [2048, 4096, 16384, 65536])
        plan = [(named[args.dtype or "bf16"], tokens, args.mixes, default_reps)]
    elif args.quick:
        presets = {"cpu-small": (CPU_D, CPU_H)}
        plan = [(named[args.dtype or "fp32"], args.tokens or [256, 1024], args.mixes, default_reps)]
    else:
        presets = {"base": PRESETS["base"]}
        plan = [(dt, args.tokens or toks, [m for m in mixes if m in args.mixes], args.reps or reps)
                for dt, toks, mixes, reps in CPU_PLAN
                if args.dtype is None or named[args.dtype] == dt]
    impls = list(args.impls or IMPLS)
    res = Results("mome", device)
    if not cuda:
        dropped = [i for i in impls if i.startswith("triton")]
        impls = [i for i in impls if not i.startswith("triton")]
        if dropped:
            res.notes.append("Triton is not timed on CPU (its kernels run there only through the "
                             "TRITON_INTERPRET=1 interpreter, for tests); no GPU run of this "
                             "benchmark is recorded in benchmarks/results/ yet (run "
                             "benchmarks/gpu_check.py on a GPU).")
        res.notes.append(f"CPU: {', '.join(f'{k} d={v[0]} h={v[1]}' for k, v in presets.items())}; "
                         + "; ".join(f"{str(dt).replace('torch.', '')} at T~{list(toks)} "
                                     f"({', '.join(mixes)}; {reps} reps)"
                                     for dt, toks, mixes, reps in plan)
                         + f"; {torch.get_num_threads()} threads on a 2-core machine shared with "
                         "other jobs (timings are noisy; ratios are within this run).")
    floors = record_floors(res, device, dtypes=tuple(dict.fromkeys(p[0] for p in plan)))
    warmup = 3 if (cuda or args.quick) else 1
    for dtype, tokens, mixes, reps in plan:
        peak = floors[f"{str(dtype).replace('torch.', '')}_matmul_tflops"]
        for preset, (d, h) in presets.items():
            for target in tokens:
                for mix in mixes:
                    run_case(res, device, dtype, preset, d, h, Case(mix, target), impls, reps,
                             peak, warmup)
    if cuda and not args.no_breakdown and any(i.startswith("triton") for i in impls):
        d, h = next(iter(presets.values()))
        dtype = plan[0][0]
        stage_breakdown(res, device, dtype, d, h, Case("pairs", 16384), reps,
                        floors[f"{str(dtype).replace('torch.', '')}_matmul_tflops"])
    if not cuda:
        res.notes += cpu_summary(res)
    res.notes += summarize(res)
    if cuda and any(i.startswith("triton") for i in impls):
        res.notes += autotune_choices()
    res.notes.append("x vs R = ms(impl) / ms(R), same case and pass; < 1 is faster than R. "
                     "tflops counts 4*T*d*h (fwd) or 12*T*d*h (fwd+bwd); pct_peak is of the "
                     "matmul rate measured in this run.")
    res.write(args.out, ratio_to=["reference_slice", "grouped_mm", "dense"])
    return res


if __name__ == "__main__":
    main()
