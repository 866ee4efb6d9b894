"""Shared attention with VLMo's relative position bias: the materialised reference vs our
backends, forward and forward+backward, peak memory, in the sequence mixes of a pretraining
step.

impl names (stable across runs):
  reference     materialised fp32 logits + the layer's bias gathered to [heads, L, L] + -inf
                on padded keys, fp32 softmax (the published implementation's math), on the
                padded batch (text padded to 40)
  sdpa          F.scaled_dot_product_attention, bias + padding as one dense float mask, padded batch
  flex_padded   FlexAttention (compiled on CUDA) on the padded batch: bias looked up in the
                kernel, block mask for padded keys
  flex          FlexAttention on the PACKED batch: padding dropped, every sequence of the step
                back to back, block mask per sequence
  flex_shared_grad  as flex, but the bias-table gradient accumulates into ONE shared
                [heads, N] buffer instead of per-sequence copies (VLMO_FAST_FLEX_BIAS_GRAD=shared);
                fwd+bwd of bias=rel cases on CUDA only: measures which default is faster
  flash         flash-attn varlen on the packed batch (only the bias=none cases: absolute-position
                presets); a row with ms null says why it did not run
Cases (key=value tokens):
  mix=pairs     B image-text pairs [text (8..40 real tokens, padded to 40) ; image 197]
  mix=image     B image-only sequences (197 tokens; img=384/480: 577/901 tokens, for memory vs L)
  mix=text      B text-only sequences (8..40 real tokens, padded to 40)
  mix=step      a pretraining step's attention inputs: B pairs + B images + B texts; padded impls
                run three calls (as the published model runs separate passes), packed impls one
  H=heads Dh=64 (12x64 base, 16x64 large), bias=rel (relative position bias) or none.
passes: fwd (no autograd graph) and fwd+bwd (grads of q, k, v and the bias table).
Block masks, unpadding indices and bias index tables are built once per forward in the model
and shared by all layers, so they are built outside the timed region here (the rows time one
layer); the 'mask_ms' field reports that one-off cost for flex.
'x vs reference' = ms(impl) / ms(reference) for the same case and pass (< 1: faster).

  python benchmarks/bench_attention.py            # GPU: base + large, B = 32..256, bf16
  python benchmarks/bench_attention.py --quick    # CPU smoke run (< 60 s), fp32, B=2 (GPU: B=32)
"""
from __future__ import annotations

import os
import sys
import time

import torch
# `common` is this folder's helper module: Python puts a script's own folder first on sys.path
# (and pytest does the same for benchmarks/test_bench_*.py), so no sys.path edits are needed.
from common import Results, base_parser, is_oom, peak_mem_mb, sync, time_ms

from vlmo_fast import attention as attn_mod, backends
from vlmo_fast.attention.cores import PADDING_CACHE
from vlmo_fast.attention.flex import flex_block_mask
from vlmo_fast.embeddings import RelativeBias, RelativePositionBias
from vlmo_fast.packing import PackedSequences

TEXT_LEN, DH = 40, 64
IMPLS = ("reference", "sdpa", "flex_padded", "flex", "flex_shared_grad", "flash")
PACKED_IMPLS = {"flex": "flex", "flex_shared_grad": "flex", "flash": "flash"}
PADDED_IMPLS = {"reference": "reference", "sdpa": "sdpa", "flex_padded": "flex"}


def layout(text_len: int, image_len: int):
    is_text = torch.cat([torch.ones(text_len, dtype=torch.bool), torch.zeros(image_len, dtype=torch.bool)])
    return is_text, torch.cat([torch.arange(text_len), torch.arange(image_len)])


class Workload:
    """Random q/k/v for one mix, both as padded groups (one per sequence kind) and as one pack."""

    def __init__(self, mix, batch, heads, img, bias, device, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        grid = img // 16
        n_img = grid * grid + 1
        self.rel = RelativePositionBias(grid, 196, heads, depth=12).to(device) if bias == "rel" else None
        kinds = {"pairs": ["pair"], "image": ["image"], "text": ["text"],
                 "step": ["pair", "image", "text"]}[mix]
        self.padded, seqs = [], []      # padded: [(q, k, v, bias, pad)]; seqs: (is_text, pos)
        for kind in kinds:
            text_real = torch.randint(8, TEXT_LEN + 1, (batch,), generator=g)
            t_len = {"pair": TEXT_LEN, "image": 0, "text": TEXT_LEN}[kind]
            i_len = {"pair": n_img, "image": n_img, "text": 0}[kind]
            is_text, pos = layout(t_len, i_len)
            pad = None
            if t_len:
                pad = torch.arange(t_len + i_len)[None] < 0
                pad = pad | ((torch.arange(t_len + i_len)[None] >= text_real[:, None]) & is_text[None])
                pad = pad.to(device)
            for b in range(batch):
                real = t_len and int(text_real[b])
                seqs.append(layout(real, i_len) if t_len else layout(0, i_len))
            self.padded.append((*self._qkv(batch, heads, t_len + i_len, g, device, dtype),
                                self._bias(is_text, pos, device), pad))
        self.tokens_padded = sum(q.shape[0] * q.shape[2] for q, *_ in self.padded)
        is_text = torch.cat([t for t, _ in seqs]).to(device)
        pos = torch.cat([p for _, p in seqs]).to(device)
        self.packing = PackedSequences.from_lengths([t.numel() for t, _ in seqs], device, is_text, pos)
        self.packed = (*self._qkv(1, heads, self.packing.total, g, device, dtype),
                       self._bias(is_text, pos, device), self.packing)

    @staticmethod
    def _qkv(batch, heads, length, g, device, dtype):
        return tuple((torch.randn(batch, heads, length, DH, generator=g) * (DH ** -0.5 if i == 0 else 1))
                     .to(device, dtype) for i in range(3))

    def _bias(self, is_text, pos, device):
        if self.rel is None:
            return None
        return self.rel.layer_biases(is_text.to(device), pos.to(device))[5]


def make_step(impl, work: Workload, backward: bool):
    """A closure running one layer's attention of the whole workload with `impl`."""
    if impl in PACKED_IMPLS:
        core = attn_mod.attention_core(PACKED_IMPLS[impl]).fn
        calls = [(work.packed[:4], None, work.packing)]
    else:
        core = attn_mod.attention_core(PADDED_IMPLS[impl]).fn
        calls = [((q, k, v, bias), pad, None) for q, k, v, bias, pad in work.padded]
    leaves = []
    prepared = []
    for (q, k, v, bias), pad, packing in calls:
        if backward:
            q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
            leaves += [q, k, v]
        prepared.append((q, k, v, bias, pad, packing))
    grads = [torch.randn_like(p[0]) for p in prepared]
    table = work.rel.relative_position_bias_table if work.rel is not None else None

    def step():
        if not backward:
            with torch.no_grad():
                for q, k, v, bias, pad, packing in prepared:
                    core(q, k, v, bias, pad, packing)
            return
        outs = [core(q, k, v, bias, pad, packing) for q, k, v, bias, pad, packing in prepared]
        torch.autograd.backward(outs, grads)
        for t in leaves:
            t.grad = None
        if table is not None:
            table.grad = None
    return step


def with_grad_mode(step, mode):
    def run():
        old = os.environ.get("VLMO_FAST_FLEX_BIAS_GRAD")
        os.environ["VLMO_FAST_FLEX_BIAS_GRAD"] = mode
        try:
            step()
        finally:
            if old is None:
                os.environ.pop("VLMO_FAST_FLEX_BIAS_GRAD")
            else:
                os.environ["VLMO_FAST_FLEX_BIAS_GRAD"] = old
    return run


def unavailable(impl, device, work: Workload, dtype) -> str | None:
    name = PACKED_IMPLS.get(impl) or PADDED_IMPLS[impl]
    q, _, _, bias, *_ = work.packed if impl in PACKED_IMPLS else work.padded[0]
    packing = work.packing if impl in PACKED_IMPLS else None
    return backends.rejection_reason("attention", name, device, **attn_mod.attention_facts(q, bias, packing))


def main() -> int:
    p = base_parser(__doc__)
    p.add_argument("--presets", default="base,large", help="base (12x64), large (16x64)")
    p.add_argument("--batches", default=None, help="comma-separated B (default GPU 32,128,256; quick 2)")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="stop starting new cases after this many seconds (rows say so)")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        # every case is a new shape / mask kind for the compiled flex; keep dynamo from giving
        # up on the frame (it would fall back to the unfused path and time that instead)
        import torch._dynamo as dynamo
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 256))
    dtype = torch.bfloat16 if cuda else torch.float32
    heads_of = {"base": 12, "large": 16}
    presets = [s for s in args.presets.split(",") if s]
    cases = []   # (preset, mix, B, img, bias)
    if args.quick or not cuda:
        bs = [int(b) for b in (args.batches or ("32" if cuda else "2")).split(",")]
        cases = [(presets[0], mix, b, 224, bias) for b in bs for bias in ("rel", "none")
                 for mix in ("pairs", "step")]
    else:
        # one GPU call runs every benchmark within ~10 minutes: a focused grid, not all combos
        bs = [int(b) for b in (args.batches or "32,128,256").split(",")]
        mid = 128 if 128 in bs else bs[len(bs) // 2]
        for preset in presets:
            if preset == "base":
                for b in bs:
                    cases += [(preset, "pairs", b, 224, "rel"), (preset, "step", b, 224, "rel")]
                cases += [(preset, "image", mid, 224, "rel"), (preset, "text", mid, 224, "rel"),
                          (preset, "pairs", mid, 224, "none"), (preset, "step", mid, 224, "none"),
                          (preset, "image", 32, 384, "rel"), (preset, "image", 32, 480, "rel")]
            else:
                cases += [(preset, "pairs", mid, 224, "rel"), (preset, "step", mid, 224, "rel")]
    reps = args.reps or (3 if not cuda else 10)

    res = Results("attention", device)
    res.notes.append(f"dtype {dtype}; one layer's attention per row; reps {reps}")
    t_start = time.time()
    for preset, mix, b, img, bias in cases:
        heads = heads_of[preset]
        case = f"mix={mix} B={b} img={img} H={heads} Dh={DH} bias={bias} " + \
            ("bf16" if dtype == torch.bfloat16 else "fp32")
        over_budget = time.time() - t_start > args.budget_s
        work = None if over_budget else Workload(mix, b, heads, img, bias, device, dtype)
        for impl in IMPLS:
            if impl == "flex_shared_grad" and (not cuda or bias != "rel"):
                continue
            if over_budget:
                for pass_ in ("fwd", "fwd+bwd"):
                    res.add(case, impl, pass_, None, note=f"skipped: --budget-s {args.budget_s:.0f} spent")
                continue
            layout_name = "packed" if impl in PACKED_IMPLS else "padded"
            tokens = work.packing.total if impl in PACKED_IMPLS else work.tokens_padded
            why = unavailable(impl, device, work, dtype)
            for pass_, backward in (("fwd", False), ("fwd+bwd", True)):
                if impl == "flex_shared_grad" and not backward:
                    continue
                if why:
                    res.add(case, impl, pass_, None, layout=layout_name, tokens=tokens, note=why)
                    continue
                extra = {}
                try:
                    if impl.startswith("flex"):
                        t0 = time.perf_counter()
                        work.packing.cache.clear()
                        PADDING_CACHE.clear()
                        for _, _, _, _, pad in work.padded:
                            if pad is not None and impl == "flex_padded":
                                flex_block_mask(pad.shape[0], pad.shape[1], pad, None, device)
                        if impl == "flex":
                            flex_block_mask(1, work.packing.total, None, work.packing, device)
                        sync(device)
                        extra["mask_ms"] = (time.perf_counter() - t0) * 1e3
                    step = make_step(impl, work, backward)
                    if impl == "flex_shared_grad":
                        step = with_grad_mode(step, "shared")
                    ms = time_ms(step, device, warmup=3, reps=reps)
                    mem = peak_mem_mb(step, device)
                    res.add(case, impl, pass_, ms, layout=layout_name, tokens=tokens,
                            peak_mem_mb=mem, **extra)
                except Exception as exc:  # a row that cannot run says why
                    note = "out of memory" if is_oom(exc) else f"{type(exc).__name__}: {str(exc)[:160]}"
                    res.add(case, impl, pass_, None, layout=layout_name, tokens=tokens, note=note)
                    if cuda:
                        torch.cuda.empty_cache()
            print(f"[{time.time() - t_start:6.1f}s] {case} {impl}", flush=True)
    if not cuda:
        res.notes.append("CPU: flex runs FlexAttention's unfused math path (no compiled CPU "
                         "backward exists); flash needs CUDA. Timings here are a smoke test.")
    res.write(args.out, ratio_to=["reference"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
