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

On disk: the folder of a `RetrievalIndex` (`embeddings-<token>.npy`, index.json with the ids,
the model fingerprint and the size + SHA-256 of every file) plus `faiss-<token>.index`
(faiss.write_index), named in index.json under "faiss" and listed in its "files". Written in
the same order (data files atomically, index.json last: the commit point), opened with the
same checks (`vlmo_fast.index.read_index_meta`, `check_index_files`, `check_ids`). The
float32 embeddings stay because they are the source of truth the FAISS file is derived
from: exact re-ranking and recall measurement read them (memory-mapped), a rebuild with
other parameters needs no re-embedding, and `RetrievalIndex.load` opens the same folder for
an exact scan.

Search results are those of `RetrievalIndex.search`: (scores [Q, k] float32, row indices
[Q, k] int64), best first. An approximate index can find fewer than k rows (IVF with a small
nprobe): the missing places hold index -1 and score -inf, and `search_text` /
`search_image` leave them out.
"""
from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .index import (FORMAT, INDEX_FILE, VERSION, IndexModelMismatchError, check_ids, check_index_files,
                    ids_sha256, member_path, read_index_meta, resolve_corpus)
from .io import TMP_PREFIX, CorruptFileError, atomic_write, atomic_write_json, file_sha256, remove_stale_temporaries

__all__ = ["FaissRetrievalIndex", "KINDS", "factory_for"]

PathLike = Union[str, os.PathLike]
KINDS = ("flat", "ivf", "ivfpq", "hnsw")
DEFAULT_NPROBE = 32
DEFAULT_EF_SEARCH = 128
HNSW_M = 32
# FAISS warns below 39 training points per centroid; k-means quality drops below that too
POINTS_PER_CENTROID = 39


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError("the FAISS index backend needs faiss: pip install 'vlmo_fast[faiss]' "
                          "(faiss-cpu)") from e
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


class FaissRetrievalIndex:
    """The FAISS backend of the retrieval index (see the module docstring). Build with
    `build` (an Encoder and images), `from_embeddings` or `from_index` (an exact
    RetrievalIndex); open with `load`."""

    backend = "faiss"

    def __init__(self, faiss_index, embeddings, ids: Sequence[str], model_hash: str, *,
                 factory: str, model_config: Optional[dict] = None,
                 search_params: Optional[dict] = None, directory: Optional[Path] = None):
        if faiss_index.ntotal != len(ids) or embeddings.shape[0] != len(ids):
            raise ValueError(f"{len(ids)} ids for {faiss_index.ntotal} FAISS vectors and "
                             f"{embeddings.shape[0]} embeddings")
        if len(set(ids)) != len(ids):
            raise ValueError("ids must be unique")
        self.faiss_index = faiss_index
        self.embeddings = embeddings
        self.ids = list(ids)
        self.model_hash = model_hash
        self.model_config = model_config
        self.factory = factory
        self.search_params = {"nprobe": DEFAULT_NPROBE, "ef_search": DEFAULT_EF_SEARCH, "rerank": 0,
                              **(search_params or {})}
        self.directory = directory

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.faiss_index.d)

    def __repr__(self) -> str:
        where = f", directory={str(self.directory)!r}" if self.directory else ""
        return (f"FaissRetrievalIndex(size={len(self)}, dim={self.dim}, factory={self.factory!r}, "
                f"model_hash={self.model_hash!r}{where})")

    @property
    def memory_bytes(self) -> int:
        """Bytes the FAISS structure takes (its serialised size; the stored embeddings are
        memory-mapped and read only by re-ranking and recall measurement)."""
        return int(_faiss().serialize_index(self.faiss_index).size)

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def from_embeddings(cls, embeddings, ids: Sequence[str], model_hash: str, *, kind: str = "flat",
                        model_config: Optional[dict] = None, train_size: Optional[int] = None,
                        seed: int = 0, **search_params) -> "FaissRetrievalIndex":
        """A FAISS index of `kind` over [N, D] L2-normalised embeddings (rows in the order of
        `ids`). IVF and PQ kinds train on `train_size` rows drawn with `seed` (default: all
        rows up to 256 per IVF list, at least 65536). search_params: nprobe, ef_search,
        rerank defaults."""
        faiss = _faiss()
        x = _as_matrix(embeddings, "embeddings")
        ids = [str(i) for i in ids]
        if x.shape[0] == 0:
            raise ValueError("empty corpus: an index needs at least one embedding")
        if len(ids) != x.shape[0]:
            raise ValueError(f"{len(ids)} ids for {x.shape[0]} embeddings")
        if len(set(ids)) != len(ids):
            raise ValueError("ids must be unique")
        unknown = set(search_params) - {"nprobe", "ef_search", "rerank"}
        if unknown:
            raise TypeError(f"unknown search parameter(s) {sorted(unknown)}; expected nprobe, ef_search, rerank")
        factory = factory_for(kind, x.shape[0], x.shape[1])
        try:
            index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"kind {kind!r}: not one of {KINDS} and not a FAISS index_factory string "
                             f"FAISS accepts for d={x.shape[1]} ({str(e).strip().splitlines()[-1]})") from None
        inner = faiss.downcast_index(index)   # a view: `index` keeps owning the C++ object
        if hasattr(inner, "do_polysemous_training"):
            # the factory turns on polysemous code training for PQ, which only the Hamming
            # pre-filter (off here) uses, and which takes most of the training time
            inner.do_polysemous_training = False
        if not index.is_trained:
            ivf = faiss.try_extract_index_ivf(index)
            lists = ivf.nlist if ivf is not None else 1
            if x.shape[0] < lists:
                raise ValueError(f"{factory} has {lists} IVF lists but the corpus only {x.shape[0]} "
                                 "vectors: use fewer lists or kind='flat'")
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
        with `encoder`, build the FAISS index, and save it to `directory` when given."""
        images, default_ids = resolve_corpus(source)
        ids = list(ids) if ids is not None else default_ids
        if len(ids) != len(images):
            raise ValueError(f"{len(ids)} ids for {len(images)} images")
        if directory is not None:
            _check_target(Path(directory))   # before hours of embedding, not after
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

    # -- saving / loading --------------------------------------------------------------------
    def save(self, directory: PathLike) -> Path:
        """Write the folder (see the module docstring): data files first, index.json last."""
        faiss = _faiss()
        directory = Path(directory)
        _check_target(directory)
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(directory)
        token = uuid.uuid4().hex[:12]
        embeddings_name, faiss_name = f"embeddings-{token}.npy", f"faiss-{token}.index"
        files: Dict[str, dict] = {}
        data = np.ascontiguousarray(self.embeddings, dtype=np.float32)

        def write_embeddings(tmp: str):
            with open(tmp, "wb") as f:   # a file object: np.save would append ".npy" to a name
                np.save(f, data)
            files[embeddings_name] = {"bytes": os.path.getsize(tmp), "sha256": file_sha256(tmp)}

        def write_faiss(tmp: str):
            faiss.write_index(self.faiss_index, tmp)
            files[faiss_name] = {"bytes": os.path.getsize(tmp), "sha256": file_sha256(tmp)}

        atomic_write(directory / embeddings_name, write_embeddings)
        atomic_write(directory / faiss_name, write_faiss)
        atomic_write_json(directory / INDEX_FILE, {
            "format": FORMAT, "version": VERSION, "backend": self.backend,
            "embeddings_file": embeddings_name, "count": len(self), "dim": self.dim, "dtype": "float32",
            "model_hash": self.model_hash, "model_config": self.model_config, "ids": self.ids,
            "ids_sha256": ids_sha256(self.ids), "files": files,
            "faiss": {"file": faiss_name, "factory": self.factory, "metric": "inner_product",
                      "search_params": self.search_params, "faiss_version": faiss.__version__}})
        for old in list(directory.glob("embeddings-*.npy")) + list(directory.glob("faiss-*.index")):
            if old.name not in files:   # the previous build's files, now unreferenced
                old.unlink(missing_ok=True)
        self.directory = directory
        return directory

    @classmethod
    def load(cls, directory: PathLike, *, encoder=None, mmap: bool = True,
             verify: bool = True) -> "FaissRetrievalIndex":
        """Open a folder written by `save`, with RetrievalIndex.load's checks (structure, every
        file inside the folder with its recorded size; SHA-256 of the files and ids unless
        verify=False). CorruptFileError names a damaged file."""
        faiss = _faiss()
        directory = Path(directory)
        meta = read_index_meta(directory, verify=verify)
        meta_path = directory / INDEX_FILE
        spec = meta.get("faiss")
        if meta.get("backend", "exact") != cls.backend or not isinstance(spec, dict):
            raise ValueError(f"{directory} is an exact retrieval index (no FAISS structure): open it with "
                             "RetrievalIndex.load, or build one with "
                             "FaissRetrievalIndex.from_index(RetrievalIndex.load(folder), kind=...).save(...)")
        for key, kind in (("file", str), ("factory", str), ("search_params", dict)):
            if not isinstance(spec.get(key), kind):
                raise CorruptFileError(meta_path, f"faiss.{key} must be a {kind.__name__}: the index record "
                                                  "is damaged; rebuild the index")
        if spec["file"] not in meta["files"]:
            raise CorruptFileError(meta_path, f"'files' does not record the FAISS file {spec['file']!r}")
        check_index_files(directory, meta, verify=verify)
        if verify:
            check_ids(directory, meta)
        emb_path = member_path(directory, meta["embeddings_file"])
        try:
            embeddings = np.load(emb_path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise CorruptFileError(emb_path, f"not a readable .npy array ({e})") from None
        if embeddings.shape != (meta["count"], meta["dim"]) or embeddings.dtype != np.float32:
            raise CorruptFileError(emb_path, f"holds {embeddings.dtype} {embeddings.shape}, but {meta_path} "
                                             f"says float32 ({meta['count']}, {meta['dim']})")
        faiss_path = member_path(directory, spec["file"])
        try:
            index = faiss.read_index(str(faiss_path))
        except RuntimeError as e:
            reason = str(e).strip().splitlines()[-1]
            raise CorruptFileError(faiss_path, f"not a readable FAISS index ({reason})") from None
        if index.ntotal != meta["count"] or index.d != meta["dim"]:
            raise CorruptFileError(faiss_path, f"holds {index.ntotal} vectors of dimension {index.d}, but "
                                               f"{meta_path} says {meta['count']} of {meta['dim']}")
        out = cls(index, embeddings, meta["ids"], meta["model_hash"], factory=spec["factory"],
                  model_config=meta.get("model_config"), search_params=spec["search_params"],
                  directory=directory)
        if encoder is not None:
            out.check_encoder(encoder)
        return out

    # -- searching ---------------------------------------------------------------------------
    def check_encoder(self, encoder) -> None:
        if encoder.embed_dim != self.dim:
            raise IndexModelMismatchError(
                f"the index holds {self.dim}-d embeddings but the encoder makes {encoder.embed_dim}-d "
                "ones: it was built with another model; rebuild it with this one")
        if encoder.fingerprint != self.model_hash:
            raise IndexModelMismatchError(
                f"the index was built with model {self.model_hash}, the encoder is model "
                f"{encoder.fingerprint}: scores would be meaningless; rebuild the index with this model")

    def _params(self, nprobe: Optional[int], ef_search: Optional[int]):
        faiss = _faiss()
        nprobe = self.search_params["nprobe"] if nprobe is None else nprobe
        ef_search = self.search_params["ef_search"] if ef_search is None else ef_search
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
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
        rerank = self.search_params["rerank"] if rerank is None else rerank
        if isinstance(rerank, bool) or not isinstance(rerank, int) or rerank < 0:
            raise ValueError(f"rerank must be an int >= 0 (0 or 1: off), got {rerank!r}")
        k = min(k, len(self))
        fetch = min(len(self), k * rerank) if rerank > 1 else k
        params = self._params(nprobe, ef_search)
        scores, index = self.faiss_index.search(q, fetch, params=params)
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
        from .index import RetrievalIndex
        exact = RetrievalIndex(self.embeddings, self.ids, self.model_hash)
        return exact.search(queries, k, chunk_rows=chunk_rows)

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

    def _results(self, scores: Tensor, index: Tensor) -> List[List[Tuple[str, float]]]:
        return [[(self.ids[i], float(s)) for s, i in zip(srow.tolist(), irow.tolist()) if i >= 0]
                for srow, irow in zip(scores, index)]

    def search_text(self, encoder, texts: Sequence[str], k: int = 10, **search_kwargs
                    ) -> List[List[Tuple[str, float]]]:
        """Top-k images for each text: [[(id, cosine), ...], ...]."""
        self.check_encoder(encoder)
        return self._results(*self.search(encoder.embed_texts(texts), k, **search_kwargs))

    def search_image(self, encoder, images, k: int = 10, **search_kwargs) -> List[List[Tuple[str, float]]]:
        """Top-k corpus images for each query image (paths, PIL images or a tensor)."""
        self.check_encoder(encoder)
        return self._results(*self.search(encoder.embed_images(images), k, **search_kwargs))


def _check_target(directory: Path) -> None:
    """The folder is absent, empty, or an index (exact or FAISS) that may be replaced."""
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a folder")
    if directory.is_dir() and not (directory / INDEX_FILE).is_file():
        leftovers = [p.name for p in directory.iterdir()
                     if not p.name.startswith((TMP_PREFIX, "embeddings-", "faiss-"))]
        if leftovers:
            raise FileExistsError(f"{directory} is not empty and is not an index ({leftovers[:3]}); "
                                  "refusing to write an index into it")
