"""Retrieval index backends side by side: ours (exact scan) vs FAISS flat / IVF / IVF-PQ / HNSW.

For each corpus, every backend is built over the same L2-normalised embeddings and answers
the same queries (top k = 10). Columns: build_s (seconds to build the structure from
embeddings in memory; IVF/PQ include training), memory_mb (the structure in RAM: the
float32 matrix for the exact scan, FAISS's serialised index otherwise), ms (median time of
one batch of Q queries), qps (queries per second), recall_at_10 (fraction of the exact
top-10 found; ours defines it).

Corpora ("data=" in the case):
  random  N unit vectors drawn uniformly on the sphere in D dims: the hardest case for
          approximate search (no cluster structure; a query's neighbours are barely closer
          than any other point), queries drawn the same way.
  world   image embeddings of the embedded procedural world (vlmo_fast.data.world): N scenes
          rendered at 32 px and encoded by a randomly initialised VLMo (tiny preset with
          dim = D) through Encoder; queries are the text embeddings of captions of other
          scenes (text -> image search, the index's use).

impl names (stable across runs):
  exact             vlmo_fast.index.RetrievalIndex.search (chunked torch matmul + top-k)
  faiss_flat        FaissRetrievalIndex kind "flat" (FAISS's exact BLAS scan)
  faiss_ivf@nprobe=P          IVF<nlist>,Flat (nlist ~ sqrt(N)), P lists visited
  faiss_ivfpq@nprobe=P        IVF<nlist>,PQ<D/8>: 32 bytes per 256-d vector, approximate scores
  faiss_ivfpq@nprobe=P,rerank=4  the same index, 4 x k candidates re-scored exactly from the
                              stored embeddings
  faiss_hnsw@ef=E             HNSW32,Flat, efSearch E (built only up to --hnsw-max-n rows: its
                              build inserts one vector at a time, ~1 min per 100k rows here)
Each FAISS structure is built once per corpus (build_s) and searched at every setting.

  python benchmarks/bench_index.py                 # N = 1M random (+100k subset), 100k world
  python benchmarks/bench_index.py --quick         # small corpora: a smoke run in seconds
"""
from __future__ import annotations

import gc
import math
import os
import sys
import time
from pathlib import Path

# Idle OpenMP workers (FAISS's and torch's) spin by default; on a shared CPU that spinning
# made FAISS's PQ training 4x slower than one thread. Read when OpenMP starts: set first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import Results, base_parser, time_ms  # noqa: E402

from vlmo_fast.index import RetrievalIndex  # noqa: E402
from vlmo_fast.index_faiss import FaissRetrievalIndex  # noqa: E402

K = 10


def random_corpus(n: int, dim: int, queries: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):   # in blocks: no float64 copy of the whole corpus
        block = rng.standard_normal((min(100_000, n - s), dim), dtype=np.float32)
        x[s:s + block.shape[0]] = block / np.linalg.norm(block, axis=1, keepdims=True)
    q = rng.standard_normal((queries, dim), dtype=np.float32)
    return x, q / np.linalg.norm(q, axis=1, keepdims=True)


def world_corpus(n: int, dim: int, queries: int, seed: int = 0):
    """Image embeddings of n world scenes and text embeddings of captions of other scenes."""
    from vlmo_fast.data import build_tokenizer
    from vlmo_fast.data.render import render_scenes
    from vlmo_fast.data.world import EmbeddedWorld
    from vlmo_fast.inference import Encoder
    from vlmo_fast.model import VLMo
    torch.manual_seed(seed)
    world = EmbeddedWorld(seed)
    tokenizer = build_tokenizer("embedded", vocab_size=1000, seed=seed)
    model = VLMo.from_preset("tiny", dim=dim, vocab_size=tokenizer.vocab_size, drop_path_rate=0.0,
                             max_text_len=40, text_relpos_len=40)   # whole captions
    encoder = Encoder(model, tokenizer, batch_size=512, progress=False)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 2048):
        scenes = [world.scene("train", i) for i in range(s, min(n, s + 2048))]
        images = torch.from_numpy(render_scenes(scenes, model.config.img_size))
        x[s:s + len(scenes)] = encoder.embed_images(images).numpy()
    texts = [world.caption_texts(world.scene("val", i))[0] for i in range(queries)]
    return x, encoder.embed_texts(texts).numpy()


def run_corpus(res: Results, name: str, x: np.ndarray, q: np.ndarray, args) -> None:
    n, dim = x.shape
    case = f"N={n} D={dim} Q={q.shape[0]} k={K} data={name}"
    ids = [str(i) for i in range(n)]
    reps = 2 if n >= 500_000 else 3
    nlist = args.nlist or 2 ** round(math.log2(max(math.sqrt(n), 16)))
    train = min(n, max(64 * nlist, 16_384))
    m = max(s for s in range(1, dim // 8 + 1) if dim % s == 0)

    t0 = time.perf_counter()
    exact = RetrievalIndex(x, ids, "bench")
    build = time.perf_counter() - t0
    truth = exact.search(q, K)[1].numpy()
    ms = time_ms(lambda: exact.search(q, K), torch.device("cpu"), warmup=1, reps=reps)
    res.add(case, "exact", "search", ms, build_s=build, memory_mb=x.nbytes / 2**20,
            qps=q.shape[0] / ms * 1e3, recall_at_10=1.0, params="chunk_rows=65536")
    print(res.rows[-1], flush=True)

    # each structure is built once, then searched at several settings of its knob
    configs = [("faiss_flat", "flat", [("", {})])]
    configs.append(("faiss_ivf", f"IVF{nlist},Flat",
                    [(f"@nprobe={p}", {"nprobe": p}) for p in args.nprobe]))
    configs.append(("faiss_ivfpq", f"IVF{nlist},PQ{m}",
                    [(f"@nprobe={p}", {"nprobe": p}) for p in args.nprobe]
                    + [(f"@nprobe={p},rerank=4", {"nprobe": p, "rerank": 4}) for p in args.nprobe]))
    if n <= args.hnsw_max_n:
        configs.append(("faiss_hnsw", "hnsw", [(f"@ef={e}", {"ef_search": e}) for e in args.ef_search]))
    for impl, kind, settings in configs:
        t0 = time.perf_counter()
        index = FaissRetrievalIndex.from_embeddings(x, ids, "bench", kind=kind, train_size=train)
        build = time.perf_counter() - t0
        for suffix, search in settings:
            found = index.search(q, K, **search)[1].numpy()
            recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))
            ms = time_ms(lambda: index.search(q, K, **search), torch.device("cpu"), warmup=1, reps=reps)
            res.add(case, impl + suffix, "search", ms, build_s=build, memory_mb=index.memory_bytes / 2**20,
                    qps=q.shape[0] / ms * 1e3, recall_at_10=recall, params=index.factory)
            print(res.rows[-1], flush=True)
        del index
        gc.collect()


def main():
    p = base_parser(__doc__)
    p.add_argument("--n", type=int, nargs="+", default=None,
                   help="random corpus sizes (default 1000000 and 100000; --quick: 20000)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=None, help="queries per batch (default 1000; --quick 200)")
    p.add_argument("--world-n", type=int, default=None, help="world corpus size (default 100000; --quick 2000)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~sqrt(N), a power of two)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128], help="IVF lists visited")
    p.add_argument("--ef-search", type=int, nargs="+", default=[32, 128, 512], help="HNSW candidate list")
    p.add_argument("--hnsw-max-n", type=int, default=100_000, help="largest corpus HNSW is built for")
    args = p.parse_args()
    if args.device != "cpu":
        raise SystemExit("bench_index measures the CPU backends (faiss-cpu and the exact scan): --device cpu")
    sizes = args.n or ([20_000] if args.quick else [1_000_000, 100_000])
    queries = args.queries or (200 if args.quick else 1000)
    world_n = args.world_n if args.world_n is not None else (2_000 if args.quick else 100_000)
    import faiss
    res = Results("index", torch.device("cpu"))
    res.notes.append("load average at start (1/5/15 min): " + " / ".join(f"{v:.1f}" for v in os.getloadavg()))
    res.notes.append(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads; "
                     f"torch {torch.get_num_threads()} threads; OMP_WAIT_POLICY="
                     f"{os.environ.get('OMP_WAIT_POLICY')}")
    for n in sizes:
        x, q = random_corpus(n, args.dim, queries)
        run_corpus(res, "random", x, q, args)
        del x
        gc.collect()
    if world_n:
        t0 = time.perf_counter()
        x, q = world_corpus(world_n, args.dim, queries)
        res.notes.append(f"world corpus: {world_n} scenes rendered and encoded in "
                         f"{time.perf_counter() - t0:.0f} s (random-init tiny VLMo, dim {args.dim})")
        run_corpus(res, "world", x, q, args)
    res.notes.append("load average at end (1/5/15 min): " + " / ".join(f"{v:.1f}" for v in os.getloadavg()))
    res.write(args.out)


if __name__ == "__main__":
    main()
