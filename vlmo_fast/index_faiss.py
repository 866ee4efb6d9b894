"""A FAISS-backed retrieval index: `RetrievalIndex`'s API, folder format and integrity rules,
with FAISS's exact (flat) and approximate (IVF, IVF-PQ, HNSW) search for large corpora.

    enc = Encoder.from_pretrained("ckpt")
    index = FaissRetrievalIndex.build(enc, "photos/", directory="photos.index", kind="ivfpq")
    index = FaissRetrievalIndex.load("photos.index", encoder=enc)     # hashes verified
    index.search_text(enc, ["a red square"], k=5)                      # [[(id, score), ...]]
    index.measure_recall(k=10)        # recall@10 against the exact scan of the same embeddings

Kinds (`kind=`): "flat" (exact inner product, FAISS's BLAS scan), "ivf" (IVF, exact
distances inside the probed lists), "ivfpq" (IVF + product quantisation: d/8 bytes per
vector), "hnsw" (graph, exact distances), or any `faiss.index_factory` string such as
"IVF4096,PQ32" or "HNSW32,Flat". Sizes that depend on the corpus (IVF lists ~ 4 sqrt(N),
PQ code size) are chosen by `factory_for`. The embeddings are L2-normalised, so the inner
product is the cosine, as in `RetrievalIndex`.

Search knobs, per call or as the index's defaults: `nprobe` (IVF lists visited),
`ef_search` (HNSW candidate list), `rerank` (fetch rerank x k candidates, then score them
exactly from the stored embeddings: restores exact scores and most of the recall PQ loses).

`FaissRetrievalIndex` is a `RetrievalIndex` (same ids, model checks, `search_text` /
`search_image`; `exact_search` is the parent's scan). `RetrievalIndex.build(...,
backend="faiss", kind=...)` builds one and `RetrievalIndex.load` opens one by what index.json
says.

On disk: the folder of a `RetrievalIndex` (`embeddings-<token>.npy`, index.json with the ids,
the model fingerprint and the size + SHA-256 of every file) plus `faiss-<token>.index`
(faiss.write_index), named in index.json under "faiss" and listed in its "files";
`"backend": "faiss"`. Written and opened by the parent's code (data files atomically,
index.json last: the commit point; the same checks on load). The float32 embeddings stay
because they are the source of truth the FAISS file is derived from: exact re-ranking and
recall measurement read them (memory-mapped), a rebuild with other parameters needs no
re-embedding, and `RetrievalIndex.load(folder, backend="exact")` opens the same folder for
an exact scan.

Search results are those of `RetrievalIndex.search`: (scores [Q, k] float32, row indices
[Q, k] int64), best first. An approximate index can find fewer than k rows (IVF with a small
nprobe): the missing places hold index -1 and score -inf, and `search_text` /
`search_image` leave them out.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .index import (INDEX_FILE, RetrievalIndex, _check_target, check_row_ids, member_path, resolve_corpus,
                    write_index_file)
from .io import CorruptFileError

__all__ = ["FaissRetrievalIndex", "KINDS", "SEARCH_PARAMS", "factory_for", "require_faiss"]

PathLike = Union[str, os.PathLike]
KINDS = ("flat", "ivf", "ivfpq", "hnsw")
SEARCH_PARAMS = ("nprobe", "ef_search", "rerank")
DEFAULT_NPROBE = 32
DEFAULT_EF_SEARCH = 128
HNSW_M = 32
# FAISS warns below 39 training points per centroid; k-means quality drops below that too
POINTS_PER_CENTROID = 39


def require_faiss():
    """The faiss module, or ImportError (name "faiss") saying which extra installs it."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError("the FAISS index backend needs faiss: pip install 'vlmo_fast[faiss]' "
                          "(faiss-cpu)", name="faiss") from e
    return faiss


def factory_for(kind: str, count: int, dim: int) -> str:
    """The `faiss.index_factory` string for a kind and corpus size: IVF lists ~ 4 sqrt(N) (a
    power of two, at most N / 39 so that k-means has enough points), PQ with d/8 sub-quantisers
    of 8 bits (fewer bits for a corpus too small to train 256 centroids per sub-space),
    HNSW with 32 links per node. A string that is not a kind is returned as it is."""
    if kind not in KINDS:
        return kind
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{HNSW_M},Flat"
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(count), 1)))
    nlist = min(nlist, 2 ** int(math.log2(max(count // POINTS_PER_CENTROID, 1))))
    if kind == "ivf":
        return f"IVF{nlist},Flat"
    m = max(s for s in range(1, max(dim // 8, 1) + 1) if dim % s == 0)
    nbits = max(4, min(8, int(math.log2(max(count // POINTS_PER_CENTROID, 1)))))
    return f"IVF{nlist},PQ{m}x{nbits}"


def _as_matrix(x, what: str, dim: Optional[int] = None) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if a.ndim == 1 and dim is not None:
        a = a[None]
    if a.ndim != 2 or (dim is not None and a.shape[1] != dim):
        want = f"[N, {dim}]" if dim is not None else "[N, D]"
        raise ValueError(f"{what} must be {want}, got shape {tuple(a.shape)}")
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{what} must be floating point, got {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return a


def check_search_params(params: dict) -> dict:
    """The search knobs that are set (None: not set), checked: nprobe and ef_search ints >= 1,
    rerank an int >= 0 (0 or 1: off). TypeError for an unknown name, ValueError naming a bad
    value."""
    unknown = set(params) - set(SEARCH_PARAMS)
    if unknown:
        raise TypeError(f"unknown search parameter(s) {sorted(unknown)}; expected {', '.join(SEARCH_PARAMS)}")
    for name, value in params.items():
        low = 0 if name == "rerank" else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return {name: value for name, value in params.items() if value is not None}


def _new_faiss_index(kind: str, count: int, dim: int):
    """(an empty FAISS index of `kind` for `count` vectors of `dim`, its factory string);
    ValueError for a kind FAISS cannot build or an IVF with more lists than vectors."""
    faiss = require_faiss()
    factory = factory_for(kind, count, dim)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"kind {kind!r}: not one of {KINDS} and not a FAISS index_factory string "
                         f"FAISS accepts for d={dim} ({str(e).strip().splitlines()[-1]})") from None
    inner = faiss.downcast_index(index)   # a view: `index` keeps owning the C++ object
    if hasattr(inner, "do_polysemous_training"):
        # the factory turns on polysemous code training for PQ, which only the Hamming
        # pre-filter (off here) uses, and which takes most of the training time
        inner.do_polysemous_training = False
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and count < ivf.nlist:
        raise ValueError(f"{factory} has {ivf.nlist} IVF lists but the corpus only {count} "
                         "vectors: use fewer lists or kind='flat'")
    return index, factory


class FaissRetrievalIndex(RetrievalIndex):
    """The FAISS backend of the retrieval index (see the module docstring). Build with
    `build` (an Encoder and images), `from_embeddings` or `from_index` (an exact
    RetrievalIndex); open with `load` (or `RetrievalIndex.load`)."""

    backend = "faiss"

    def __init__(self, faiss_index, embeddings, ids: Sequence[str], model_hash: str, *,
                 factory: str, model_config: Optional[dict] = None,
                 search_params: Optional[dict] = None, directory: Optional[Path] = None):
        super().__init__(embeddings, ids, model_hash, model_config=model_config, directory=directory)
        if faiss_index.ntotal != len(self) or faiss_index.d != self.dim:
            raise ValueError(f"the FAISS index holds {faiss_index.ntotal} vectors of dimension "
                             f"{faiss_index.d}, the embeddings {len(self)} of dimension {self.dim}")
        self.faiss_index = faiss_index
        self.factory = factory
        self.search_params = {"nprobe": DEFAULT_NPROBE, "ef_search": DEFAULT_EF_SEARCH, "rerank": 0,
                              **check_search_params(search_params or {})}

    def __repr__(self) -> str:
        where = f", directory={str(self.directory)!r}" if self.directory else ""
        return (f"FaissRetrievalIndex(size={len(self)}, dim={self.dim}, factory={self.factory!r}, "
                f"model_hash={self.model_hash!r}{where})")

    @property
    def memory_bytes(self) -> int:
        """Bytes the FAISS structure takes (its serialised size; the stored embeddings are
        memory-mapped and read only by re-ranking and recall measurement)."""
        return int(require_faiss().serialize_index(self.faiss_index).size)

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def from_embeddings(cls, embeddings, ids: Sequence[str], model_hash: str, *, kind: str = "flat",
                        model_config: Optional[dict] = None, train_size: Optional[int] = None,
                        seed: int = 0, **search_params) -> "FaissRetrievalIndex":
        """A FAISS index of `kind` over [N, D] L2-normalised embeddings (rows in the order of
        `ids`). IVF and PQ kinds train on `train_size` rows drawn with `seed` (default: all
        rows up to 256 per IVF list, at least 65536). search_params: nprobe, ef_search,
        rerank defaults (None: the built-in default)."""
        x = _as_matrix(embeddings, "embeddings")
        ids = [str(i) for i in ids]
        check_row_ids(ids, x.shape[0])   # before training, not after
        search_params = check_search_params(search_params)
        index, factory = _new_faiss_index(kind, x.shape[0], x.shape[1])
        if not index.is_trained:
            faiss = require_faiss()
            ivf = faiss.try_extract_index_ivf(index)
            lists = ivf.nlist if ivf is not None else 1
            n_train = train_size or min(x.shape[0], max(256 * lists, 65536))
            rows = np.random.default_rng(seed).choice(x.shape[0], size=min(n_train, x.shape[0]), replace=False)
            if ivf is not None:
                ivf.cp.seed = seed   # k-means initialisation: the same corpus gives the same lists
            index.train(x[np.sort(rows)])
        index.add(x)
        return cls(index, x, ids, model_hash, factory=factory, model_config=model_config,
                   search_params=search_params)

    @classmethod
    def from_index(cls, exact, *, kind: str = "flat", **kwargs) -> "FaissRetrievalIndex":
        """The FAISS index of an exact `RetrievalIndex` (its embeddings, ids and model)."""
        return cls.from_embeddings(np.asarray(exact.embeddings), exact.ids, exact.model_hash, kind=kind,
                                   model_config=exact.model_config, **kwargs)

    @classmethod
    def build(cls, encoder, source, *, ids: Optional[Sequence[str]] = None,
              directory: Optional[PathLike] = None, kind: str = "flat",
              **kwargs) -> "FaissRetrievalIndex":
        """Embed every image of `source` (a folder, a manifest, or a list of paths/PIL images)
        with `encoder`, build the FAISS index, and save it to `directory` when given. kwargs:
        from_embeddings' (nprobe, ef_search, rerank, train_size, seed)."""
        images, default_ids = resolve_corpus(source)
        ids = list(ids) if ids is not None else default_ids
        check_row_ids(ids, len(images), "images")
        # every check that needs no embedding first, not after hours of embedding
        check_search_params({k: v for k, v in kwargs.items() if k not in ("train_size", "seed")})
        _new_faiss_index(kind, len(images), encoder.embed_dim)
        if directory is not None:
            _check_target(Path(directory))
        index = cls.from_embeddings(encoder.embed_images(images), ids, encoder.fingerprint, kind=kind,
                                    model_config=encoder.config.to_dict(), **kwargs)
        if directory is not None:
            index.save(directory)
        return index

    def add(self, embeddings, ids: Sequence[str]) -> None:
        """Append rows (an IVF index keeps its trained lists; re-build after large changes)."""
        x = _as_matrix(embeddings, "embeddings", self.dim)
        ids = [str(i) for i in ids]
        if len(ids) != x.shape[0]:
            raise ValueError(f"{len(ids)} ids for {x.shape[0]} embeddings")
        if len(set(ids)) != len(ids):
            raise ValueError("ids must be unique: the new ids repeat")
        taken = sorted(set(ids) & set(self.ids))
        if taken:
            raise ValueError(f"ids must be unique: {taken[:3]} are already in the index")
        self.faiss_index.add(x)
        self.embeddings = np.concatenate([np.asarray(self.embeddings), x])
        self.ids += ids

    # -- saving / loading (RetrievalIndex.save / load, with these hooks) ----------------------
    def _save_backend_files(self, directory: Path, token: str, files: dict) -> dict:
        faiss = require_faiss()
        name = f"faiss-{token}.index"
        files[name] = write_index_file(directory / name, lambda tmp: faiss.write_index(self.faiss_index, tmp))
        return {"faiss": {"file": name, "factory": self.factory, "metric": "inner_product",
                          "search_params": self.search_params, "faiss_version": faiss.__version__}}

    @classmethod
    def load(cls, directory: PathLike, *, encoder=None, mmap: bool = True,
             verify: bool = True) -> "FaissRetrievalIndex":
        """Open a FAISS index folder with RetrievalIndex.load's checks (structure, every file
        inside the folder with its recorded size; SHA-256 of the files and ids unless
        verify=False). CorruptFileError names a damaged file."""
        return RetrievalIndex.load(directory, encoder=encoder, mmap=mmap, verify=verify, backend=cls.backend)

    @classmethod
    def check_record(cls, directory: Path, meta: dict) -> None:
        meta_path = Path(directory) / INDEX_FILE
        spec = meta.get("faiss")
        if not isinstance(spec, dict):
            raise CorruptFileError(meta_path, "backend 'faiss' without a 'faiss' record: the index record "
                                              "is damaged; rebuild the index")
        for key, kind in (("file", str), ("factory", str), ("search_params", dict)):
            if not isinstance(spec.get(key), kind):
                raise CorruptFileError(meta_path, f"faiss.{key} must be a {kind.__name__}: the index record "
                                                  "is damaged; rebuild the index")
        if spec["file"] not in meta["files"]:
            raise CorruptFileError(meta_path, f"'files' does not record the FAISS file {spec['file']!r}")

    @classmethod
    def from_record(cls, directory: Path, meta: dict, embeddings) -> "FaissRetrievalIndex":
        spec = meta["faiss"]
        faiss_path = member_path(directory, spec["file"])
        try:
            index = require_faiss().read_index(str(faiss_path))
        except RuntimeError as e:
            reason = str(e).strip().splitlines()[-1]
            raise CorruptFileError(faiss_path, f"not a readable FAISS index ({reason})") from None
        if index.ntotal != meta["count"] or index.d != meta["dim"]:
            raise CorruptFileError(faiss_path, f"holds {index.ntotal} vectors of dimension {index.d}, but "
                                               f"{Path(directory) / INDEX_FILE} says {meta['count']} of "
                                               f"{meta['dim']}")
        try:
            params = check_search_params(spec["search_params"])
        except (TypeError, ValueError) as e:
            raise CorruptFileError(Path(directory) / INDEX_FILE, f"faiss.search_params: {e}") from None
        return cls(index, embeddings, meta["ids"], meta["model_hash"], factory=spec["factory"],
                   model_config=meta.get("model_config"), search_params=params, directory=directory)

    # -- searching ---------------------------------------------------------------------------
    def _faiss_params(self, nprobe: int, ef_search: int):
        """FAISS's per-call search parameters for this index's structure (None for flat)."""
        faiss = require_faiss()
        if faiss.try_extract_index_ivf(self.faiss_index) is not None:
            return faiss.SearchParametersIVF(nprobe=nprobe)
        if isinstance(faiss.downcast_index(self.faiss_index), faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(efSearch=ef_search)
        return None

    def search(self, queries, k: int = 10, *, nprobe: Optional[int] = None,
               ef_search: Optional[int] = None, rerank: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Top-k by cosine similarity: (scores [Q, k] float32, row indices [Q, k] int64), best
        first; places FAISS could not fill hold -1 / -inf. nprobe / ef_search / rerank
        override the index's defaults for this call (rerank r > 1: r x k candidates scored
        exactly from the stored embeddings)."""
        q = _as_matrix(queries, "queries", self.dim)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        knobs = {**self.search_params,
                 **check_search_params(dict(nprobe=nprobe, ef_search=ef_search, rerank=rerank))}
        k = min(k, len(self))
        rerank = knobs["rerank"]
        fetch = min(len(self), k * rerank) if rerank > 1 else k
        scores, index = self.faiss_index.search(q, fetch, params=self._faiss_params(knobs["nprobe"],
                                                                                    knobs["ef_search"]))
        if rerank > 1:
            scores, index = self._rescore(q, index, k)
        scores = np.where(index < 0, -np.inf, scores).astype(np.float32)
        return torch.from_numpy(scores), torch.from_numpy(index.astype(np.int64))

    def _rescore(self, q: np.ndarray, candidates: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Exact scores of each query's candidates (rows read from the stored embeddings), top k."""
        valid = candidates >= 0
        rows = np.unique(candidates[valid])
        block = np.asarray(self.embeddings[rows], dtype=np.float32)   # sorted rows: sequential reads
        where = np.searchsorted(rows, np.where(valid, candidates, 0)).clip(max=max(len(rows) - 1, 0))
        exact = np.full(candidates.shape, -np.inf, dtype=np.float32)
        for s in range(0, q.shape[0], 256):   # [256, C, D] at a time
            if rows.size:
                exact[s:s + 256] = np.einsum("qd,qcd->qc", q[s:s + 256], block[where[s:s + 256]])
        exact = np.where(valid, exact, -np.inf)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, order, 1), np.take_along_axis(np.where(valid, candidates, -1), order, 1)

    def exact_search(self, queries, k: int = 10, chunk_rows: int = 65536) -> Tuple[Tensor, Tensor]:
        """The exact answer over the stored embeddings (RetrievalIndex.search's scan)."""
        return RetrievalIndex.search(self, queries, k, chunk_rows=chunk_rows)

    def measure_recall(self, queries=None, k: int = 10, *, sample: int = 1000, seed: int = 0,
                       **search_kwargs) -> float:
        """recall@k: the fraction of the exact top-k rows that `search` returns, averaged over
        `queries` (default: `sample` stored embeddings drawn with `seed`, as queries)."""
        if queries is None:
            rows = np.sort(np.random.default_rng(seed).choice(len(self), size=min(sample, len(self)),
                                                              replace=False))
            queries = np.asarray(self.embeddings[rows], dtype=np.float32)
        _, found = self.search(queries, k, **search_kwargs)
        _, truth = self.exact_search(queries, k)
        hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)]
        return float(sum(hits) / (truth.shape[0] * truth.shape[1]))
