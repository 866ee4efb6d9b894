"""Retrieval evaluation protocols, side by side in one run (vlmo_fast.eval.evaluate_retrieval).

Ni images with 5 captions each (Nt = 5 Ni), texts of max_text_len tokens (half padding),
a randomly initialised model (the cost does not depend on the weights).

impl names (stable across runs):
  itc             dual encoder: every image and caption encoded once (batched), one
                  similarity matmul, Karpathy-style ranks. Linear in Ni + Nt.
  rerank_batched  ours: ITM on each query's top-k ITC candidates, (Ni + Nt) * k pairs packed
                  into batches of --pair-batch pairs across queries (ITC time not included).
  rerank_per_query the reference's loop (unilm vlmo `compute_irtr_recall_with_rerank`): one
                  fusion forward per query holding its k candidates (ITC time not included).
  itm_all_pairs   (estimate) what ITM over all Ni * Nt pairs would cost at the batched rate:
                  the quadratic protocol the top-k re-rank avoids.

Each (case, impl) is timed once after a warm-up on a small set (each run takes seconds);
ratios are of the same run. On GPU a correctness note is added: a tiny model's recalls with
the CUDA backends equal the CPU reference's.

  python benchmarks/bench_eval.py                  # GPU: base preset in bf16, Ni = 1000
  python benchmarks/bench_eval.py --quick          # tiny preset, small set (CPU smoke run)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import Results, base_parser, sync  # noqa: E402

from vlmo_fast import backends  # noqa: E402
from vlmo_fast.eval import evaluate_retrieval  # noqa: E402
from vlmo_fast.model import VLMo  # noqa: E402

CAPTIONS_PER_IMAGE = 5


def make_set(config, num_images: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(num_images, 3, config.img_size, config.img_size, generator=g) * 2 - 1
    nt = num_images * CAPTIONS_PER_IMAGE
    ids = torch.randint(1000 if config.vocab_size > 2000 else 5, config.vocab_size, (nt, config.max_text_len),
                        generator=g)
    mask = torch.ones_like(ids)
    mask[:, config.max_text_len // 2:] = 0
    return images, ids, mask, torch.arange(num_images).repeat_interleave(CAPTIONS_PER_IMAGE)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - t0) * 1e3


def cuda_matches_cpu(device) -> str:
    torch.manual_seed(0)
    model = VLMo.from_preset("tiny")
    images, ids, mask, t2i = make_set(model.config, 40)
    cpu = evaluate_retrieval(model, images, ids, mask, t2i, rerank_k=5)
    gpu = evaluate_retrieval(model.to(device), images, ids, mask, t2i, rerank_k=5)
    same = cpu.itc == gpu.itc and cpu.rerank == gpu.rerank
    return (f"tiny model, 40 images / 200 captions: recalls with the CUDA backends "
            f"{'equal' if same else 'DIFFER from'} the CPU reference's (ITC and re-rank)")


def main():
    p = base_parser(__doc__)
    p.add_argument("--preset", default=None, help="model preset (default: base on GPU, tiny on CPU)")
    p.add_argument("--num-images", type=int, nargs="+", default=None)
    p.add_argument("--rerank-k", type=int, default=16)
    p.add_argument("--pair-batch", type=int, default=256)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="model dtype (default: bf16 on GPU, fp32 on CPU)")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    preset = args.preset or ("tiny" if args.quick or not gpu else "base")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    sizes = args.num_images or ([32] if args.quick else ([250, 1000] if gpu else [64, 256]))
    k = args.rerank_k

    res = Results("eval", device)
    model = VLMo.from_preset(preset).to(device, dtype).eval()
    c = model.config
    images, ids, mask, t2i = make_set(c, 16)
    evaluate_retrieval(model, images, ids, mask, t2i, rerank_k=4, batch_size=args.pair_batch)  # warm-up

    for ni in sizes:
        images, ids, mask, t2i = make_set(c, ni)
        nt = ni * CAPTIONS_PER_IMAGE
        case = f"preset={preset} Ni={ni} Nt={nt} L={c.max_text_len} k={k} dtype={str(dtype)[6:]}"
        pairs = (ni + nt) * min(k, ni)
        ours, _ = timed(lambda: evaluate_retrieval(model, images, ids, mask, t2i, rerank_k=k,
                                                   batch_size=args.pair_batch), device)
        res.add(case, "itc", "eval", ours.itc_seconds * 1e3, encoded=ni + nt,
                r1_i2t=ours.itc["i2t_r1"])
        res.add(case, "rerank_batched", "eval", ours.rerank_seconds * 1e3, pairs=pairs,
                ms_per_1k_pairs=ours.rerank_seconds * 1e6 / pairs)
        loop = evaluate_retrieval(model, images, ids, mask, t2i, rerank_k=k, batch_size=k)
        res.add(case, "rerank_per_query", "eval", loop.rerank_seconds * 1e3, pairs=pairs,
                ms_per_1k_pairs=loop.rerank_seconds * 1e6 / pairs,
                same_recalls_as_batched=loop.rerank == ours.rerank)
        res.add(case, "itm_all_pairs", "eval (estimate)", ours.rerank_seconds * 1e3 * ni * nt / pairs,
                pairs=ni * nt, note="extrapolated from rerank_batched's per-pair rate")
    res.notes.append(f"backends: {backends.last_used()}")
    res.notes.append("each row is one timed run after a warm-up (runs take seconds); the machine "
                     "may be shared")
    if gpu:
        res.notes.append(cuda_matches_cpu(device))
    res.write(args.out, ratio_to=["rerank_batched"])


if __name__ == "__main__":
    main()
