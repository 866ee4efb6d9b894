"""One full stage-3 (vision-language) pretraining step: ITC + ITM with hard negatives + MLM,
forward, backward and AdamW step, reference-style vs vlmo_fast's step, side by side.

impl names (stable across runs):
  reference  the reference implementation's choices: all-reference backends (per-expert FFN
             loop, materialised attention), separate padded passes (image-only and text-only
             each re-running the VL layers for itc_vl, then four fusion passes: MLM, ITM
             positive, ITM negative image, ITM negative text), materialised ITC logits, the
             per-row `torch.multinomial(...).item()` sampler loop, MLM logits at every text
             position (B x L x vocab).
  fast       `vlmo_fast.training.PretrainStep` (what train/pretrain.py runs): automatic
             backends, trimmed (CPU) or packed (CUDA) passes, one fusion pass for the 3B ITM
             pairs + the B MLM pairs, the extension's sampler (no host sync), MLM logits only
             at masked positions.
Both see the same batch (the embedded data's vl loader) and the same model init; no DeepSpeed
(the GPU image has none). Each impl runs in its own subprocess so that peak memory (CPU: peak
RSS, VmHWM reset after warm-up; CUDA: max_memory_allocated) is its own.

Presets: tiny (the tiny VLMo), small (dim 256, depth 6, 4 heads, image 64, text 40), base
(VLMo-Base, image 224; GPU). Vocabulary 30522 (BERT's) for all.

  python benchmarks/bench_train.py                 # CPU: tiny + small at batch 32
  python benchmarks/bench_train.py --preset base --batch-size 64   # GPU, bf16
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from common import Results, base_parser, sync  # noqa: E402

IMPLS = ("reference", "fast")
PRESETS = {
    "tiny": dict(base="tiny", overrides={}),
    "small": dict(base="tiny", overrides=dict(dim=256, depth=6, num_heads=4, vl_layers=2, img_size=64,
                                              patch_size=16, max_text_len=40, text_relpos_len=64,
                                              init_std=0.02)),
    "base": dict(base="base", overrides={}),
}
VOCAB = 30522


# ----------------------------------------------------------------------------- the two steps

def reference_step(model, batch, opt, gen):
    """The reference's step, pass by pass (see the module docstring)."""
    images, ids, mask = batch["images"], batch["text_ids"], batch["text_mask"]
    mlm_ids, mlm_labels = batch["mlm_ids"], batch["mlm_labels"]
    b = images.shape[0]
    img = model.encode_image(images, return_vl=True)
    txt = model.encode_text(ids, mask, return_vl=True)

    def itc(fi, ft, scale):
        logits = scale.exp() * fi @ ft.t()
        target = torch.arange(b, device=fi.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    loss_itc = 0.5 * (itc(img.features, txt.features, model.itc.logit_scale)
                      + itc(img.vl_features, txt.vl_features, model.itc_vl.logit_scale))
    with torch.no_grad():
        sim = model.itc.logit_scale.exp() * img.features @ txt.features.t()
        w_i2t = F.softmax(sim.float(), dim=1)
        w_t2i = F.softmax(sim.t().float(), dim=1)
        w_i2t.fill_diagonal_(0)
        w_t2i.fill_diagonal_(0)
        neg_txt = [torch.multinomial(w_i2t[i], 1, generator=gen).item() for i in range(b)]
        neg_img = [torch.multinomial(w_t2i[i], 1, generator=gen).item() for i in range(b)]
    mlm = model.encode_pair(mlm_ids, images, mask)
    pos = model.encode_pair(ids, images, mask)
    neg_i = model.encode_pair(ids, images[neg_img], mask)
    neg_t = model.encode_pair(ids[neg_txt], images, mask[neg_txt])
    itm_logits = model.itm_head(torch.cat([pos.pooled, neg_i.pooled, neg_t.pooled]))
    itm_labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(images.device)
    loss_itm = F.cross_entropy(itm_logits.float(), itm_labels)
    mlm_logits = model.mlm_logits(mlm)                       # B x L x vocab
    loss_mlm = F.cross_entropy(mlm_logits.float().flatten(0, 1), mlm_labels.flatten(), ignore_index=-100)
    loss = loss_itc + loss_itm + 0.25 * loss_mlm
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def fast_step(step_module, batch, opt):
    out = step_module(batch)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()
    return out["loss"]


# ----------------------------------------------------------------------------- worker

def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(impl: str, preset: str, batch_size: int, device: str, reps: int, warmup: int) -> dict:
    from vlmo_fast import backends
    from vlmo_fast.config import VLMoConfig
    from vlmo_fast.data import build_pretrain_loader, build_tokenizer
    from vlmo_fast.model import VLMo
    from vlmo_fast.training.stages import prepare_stage
    from vlmo_fast.training.step import PretrainStep
    dev = torch.device(device)
    spec = PRESETS[preset]
    cfg = VLMoConfig.preset(spec["base"], vocab_size=VOCAB, drop_path_rate=0.1, **spec["overrides"])
    tok = build_tokenizer(source="embedded", vocab_size=1000)
    loader = build_pretrain_loader("embedded", tok, "vl", batch_size, seed=0, img_size=cfg.img_size,
                                   patch_size=cfg.patch_size, max_text_len=cfg.max_text_len, num_workers=0)
    it = iter(loader)
    batches = [{k: v.to(dev) for k, v in next(it).items() if isinstance(v, torch.Tensor)} for _ in range(2)]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if impl == "reference":
        for op in ("ffn", "attention", "contrastive"):
            backends.set_backend(op, "reference")
    model = VLMo(cfg).to(dev, dtype).train()
    prepare_stage(model, "vl")
    for b in batches:
        b["images"] = b["images"].to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01)
    gen = torch.Generator(device=dev).manual_seed(0)
    if impl == "reference":
        run = lambda b: reference_step(model, b, opt, gen)
    else:
        step_module = PretrainStep(model, "vl", generator=gen)
        run = lambda b: fast_step(step_module, b, opt)
    for i in range(warmup):
        run(batches[i % 2])
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    reset_ok = _reset_peak_rss()
    times, losses = [], []
    for i in range(reps):
        t0 = time.perf_counter()
        loss = run(batches[i % 2])
        sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
        losses.append(float(loss))
    times.sort()
    ms = times[len(times) // 2]
    out = {"impl": impl, "ms": ms, "samples_per_s": batch_size / (ms / 1e3), "loss_last": losses[-1],
           "backends": backends.last_used(), "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if dev.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    else:
        out["peak_rss_mb"] = _peak_rss_mb()
        out["peak_rss_reset"] = reset_ok
    return out


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--preset", nargs="+", default=None, help="tiny small (CPU default) / base (GPU default)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 on CPU, 64 on GPU")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "PRESET"), help=argparse_hidden())
    args = p.parse_args()
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch_size or (64 if dev.type == "cuda" else 32)
    reps = args.reps or (3 if args.quick else 10)
    if args.worker:
        impl, preset = args.worker
        print("RESULT " + json.dumps(worker(impl, preset, batch, args.device, reps, args.warmup)))
        return
    presets = args.preset or (["base"] if dev.type == "cuda" else (["tiny"] if args.quick else ["tiny", "small"]))
    res = Results("train", dev)
    res.notes.append("one stage-3 step (ITC+ITM+MLM fwd+bwd+AdamW) without DeepSpeed; each impl in its own "
                     "process; CPU peak = peak RSS of that process after warm-up (VmHWM reset)")
    if dev.type == "cpu":
        res.notes.append(f"CPU: shared 2-core machine, load average {os.getloadavg()[0]:.1f} at start "
                         f"(other jobs running): absolute times are noisy, ratios are from one run")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for preset in presets:
        found = {}
        for impl in IMPLS:
            cmd = [sys.executable, __file__, "--worker", impl, preset, "--device", args.device,
                   "--batch-size", str(batch), "--reps", str(reps), "--warmup", str(args.warmup)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            case = f"preset={preset} B={batch} vocab={VOCAB}"
            if line is None:
                note = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
                res.add(case, impl, "fwd+bwd+step", None, note=note)
                continue
            r = json.loads(line[len("RESULT "):])
            found[impl] = r
            extra = {"samples_per_s": r["samples_per_s"], "params_m": r["params_m"]}
            extra.update({k: r[k] for k in ("peak_mem_mb", "peak_rss_mb") if k in r})
            res.add(case, impl, "fwd+bwd+step", r["ms"], **extra)
        if len(found) == 2:
            a, b = found["reference"], found["fast"]
            mem_key = "peak_mem_mb" if "peak_mem_mb" in a else "peak_rss_mb"
            res.notes.append(f"{preset}: fast throughput {b['samples_per_s'] / a['samples_per_s']:.2f}x the "
                             f"reference's; peak memory {b[mem_key] / a[mem_key]:.2f}x "
                             f"({b[mem_key]:.0f} vs {a[mem_key]:.0f} MB); backends fast={b['backends']}, "
                             f"reference={a['backends']}")
    res.write(args.out, ratio_to=["reference"])


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
