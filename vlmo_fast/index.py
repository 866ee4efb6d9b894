"""A retrieval index of image embeddings on disk: build, save, load (memory-mapped), search.

    enc = Encoder.from_pretrained("ckpt")
    index = RetrievalIndex.build(enc, "photos/", directory="photos.index")   # streams to disk
    index = RetrievalIndex.load("photos.index", encoder=enc)                 # memory-mapped
    index.search_text(["a red square"], k=5)   # [[(id, score), ...]]

On disk (a folder):
- `embeddings-<token>.npy`: float32 [N, D] L2-normalised embeddings (numpy .npy, read with
  np.load(mmap_mode="r"), so corpora larger than RAM are searched chunk by chunk);
- `index.json`: format version, the embeddings file's name, N, D, the ids (one per row),
  the model's fingerprint (`vlmo_fast.inference.model_fingerprint`) and its config, and
  the integrity record: `files` (size and SHA-256 of every data file of the index, the
  schema of `vlmo_fast.io` manifests) and `ids_sha256` (of the ids list).
Both are written atomically (`vlmo_fast.io`), the embeddings first and index.json last:
index.json is the commit point, so a build killed at any moment leaves either the previous
index or the new one, never a half-written one (rebuilding writes a new embeddings file and
removes the old one only after index.json points to the new one).

Opening an index checks it (`check_index_files`, `check_ids`): every file index.json names
must be a plain name that stays inside the folder (no `..`, absolute path or symlink out of
it), exist, have the recorded size (always: catches truncation) and the recorded SHA-256
(unless `load(..., verify=False)`, the fast path for a trusted local index); the ids must
hash to `ids_sha256` (edited or reordered ids would label rows wrongly). Failures raise
`CorruptFileError` naming the file. These functions take the parsed index.json, so another
backend's files (e.g. a FAISS index) get the same checks by being listed in `files`.

An index only answers queries embedded by the model that built it: loading or searching with
an Encoder whose embedding size or fingerprint differs raises `IndexModelMismatchError`.

Backends (index.json's `backend`, "exact" when absent): "exact" is this module's scan;
"faiss" (`vlmo_fast.index_faiss.FaissRetrievalIndex`, a subclass) adds a `faiss-<token>.index`
file beside the same embeddings. `RetrievalIndex.build(..., backend="faiss", kind=...)` builds
one, and `RetrievalIndex.load` opens a folder with the backend its index.json names
(`backend="exact"` opens any index's embeddings for the exact scan).
"""
from __future__ import annotations

import csv
import io
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .io import (TMP_PREFIX, CorruptFileError, atomic_write, atomic_write_json, file_sha256,
                 remove_stale_temporaries, verify_files)

INDEX_FILE = "index.json"
FORMAT = "vlmo_fast.retrieval_index"
VERSION = 2   # 2: integrity record (files, ids_sha256); version 1 had none
BACKENDS = ("exact", "faiss")
# data files of an index: a rebuild replaces them, a killed first build may leave them behind
DATA_FILE_PREFIXES = ("embeddings-", "faiss-")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PathLike = Union[str, os.PathLike]


class IndexModelMismatchError(ValueError):
    """The index was built with another model than the one given to query it."""


# -- corpora ---------------------------------------------------------------------------------
def list_image_folder(folder: PathLike) -> Tuple[List[Path], List[str]]:
    """Image files under `folder` (recursive, sorted); ids are their paths relative to it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"empty corpus: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return paths, [p.relative_to(folder).as_posix() for p in paths]


_PATH_KEYS = ("image", "image_path", "filepath", "path", "file")


def _manifest_text(manifest: Path) -> str:
    from .data.formats import decode_text
    return decode_text(manifest.read_bytes(), str(manifest))


def read_image_manifest(manifest: PathLike) -> Tuple[List[Path], List[str]]:
    """Image paths and ids from a manifest. Relative paths are relative to its folder.

    - .txt: one image path per line;
    - .csv / .tsv: a header with an image column (image / image_path / filepath / path /
      file) and optionally `id`;
    - .jsonl: one object per line, .json: a list of objects (ALBEF-style
      [{"image": ..., "caption": ...}]), with the same keys.
    Repeated images (one row per caption) are kept once, in first-seen order. Paths must be
    strings and ids strings or integers (the data layer's field rules); the file must be UTF-8
    (a byte-order mark is fine): a DataError names the file and row otherwise."""
    from .data.formats import id_field, path_field
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    suffix = manifest.suffix.lower()
    rows: List[dict] = []
    if suffix == ".txt":
        rows = [{"image": line.strip()} for line in _manifest_text(manifest).splitlines() if line.strip()]
    elif suffix in (".csv", ".tsv"):
        rows = list(csv.DictReader(io.StringIO(_manifest_text(manifest), newline=""),
                                   delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix == ".jsonl":
        for n, line in enumerate(_manifest_text(manifest).splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{manifest}:{n}: not valid JSON: {exc}") from None
    elif suffix == ".json":
        data = json.loads(_manifest_text(manifest))
        if not isinstance(data, list):
            raise ValueError(f"{manifest}: expected a JSON list of objects with an image path")
        rows = data
    else:
        raise ValueError(f"manifest {manifest}: unknown format {suffix!r}; expected .txt, .csv, "
                         ".tsv, .jsonl or .json")
    paths, ids, seen = [], [], set()
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{manifest}: row {n} is not an object: {row!r}")
        key = next((k for k in _PATH_KEYS if k in row), None)
        if key is None:
            raise ValueError(f"{manifest}: row {n} has no image path (expected one of the keys "
                             f"{_PATH_KEYS}); got keys {sorted(row)}")
        raw = path_field(row[key], f"{manifest} row {n}", key)
        if raw in seen:
            continue
        seen.add(raw)
        path = Path(raw) if Path(raw).is_absolute() else manifest.parent / raw
        paths.append(path)
        ids.append(id_field(row.get("id", raw), f"{manifest} row {n}", "id"))
    if not paths:
        raise ValueError(f"empty corpus: the manifest {manifest} lists no images")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {manifest} do not exist, e.g. "
                                f"{missing[:3]}")
    return paths, ids


def resolve_corpus(source) -> Tuple[List, List[str]]:
    """A folder, a manifest file, or a list of image paths -> (images, ids)."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            return list_image_folder(p)
        if p.is_file():
            return read_image_manifest(p)
        raise FileNotFoundError(f"corpus not found: {p} is neither a folder nor a manifest file")
    images = list(source)
    if not images:
        raise ValueError("empty corpus: no images given")
    return images, [str(x) for x in images]


# -- the index -----------------------------------------------------------------------------
class RetrievalIndex:
    """The exact index: a cosine scan of memory-mapped embeddings (see the module docstring)."""

    backend = "exact"

    def __init__(self, embeddings, ids: Sequence[str], model_hash: str, *,
                 model_config: Optional[dict] = None, directory: Optional[Path] = None):
        embeddings = embeddings.numpy() if isinstance(embeddings, Tensor) else embeddings
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be [N, D], got shape {embeddings.shape}")
        check_row_ids(ids, embeddings.shape[0])
        self.embeddings = embeddings
        self.ids = list(ids)
        self.model_hash = model_hash
        self.model_config = model_config
        self.directory = directory

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __repr__(self) -> str:
        where = f", directory={str(self.directory)!r}" if self.directory else ""
        return f"RetrievalIndex(size={len(self)}, dim={self.dim}, model_hash={self.model_hash!r}{where})"

    # -- building / saving ---------------------------------------------------------------
    @classmethod
    def build(cls, encoder, source, *, ids: Optional[Sequence[str]] = None,
              directory: Optional[PathLike] = None, backend: str = "exact",
              **faiss_kwargs) -> "RetrievalIndex":
        """Embed every image of `source` (a folder, a manifest, or a list of paths/PIL images).
        With `directory`, embeddings stream straight into the on-disk file (never all in
        memory) and the returned index is the memory-mapped one.

        backend="faiss": `FaissRetrievalIndex.build` with faiss_kwargs (kind, nprobe,
        ef_search, rerank, train_size, seed)."""
        kind = backend_class(backend)
        if kind is not RetrievalIndex:
            return kind.build(encoder, source, ids=ids, directory=directory, **faiss_kwargs)
        if faiss_kwargs:
            raise TypeError(f"{sorted(faiss_kwargs)}: options of the FAISS backend; pass backend='faiss' "
                            "to build a FAISS index")
        images, default_ids = resolve_corpus(source)
        ids = list(ids) if ids is not None else default_ids
        check_row_ids(ids, len(images), "images")
        if directory is None:
            return cls(encoder.embed_images(images).numpy(), ids, encoder.fingerprint,
                       model_config=encoder.config.to_dict())
        n, d = len(images), encoder.embed_dim

        def fill(tmp: str):
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, d))
            row = 0
            for batch in encoder.iter_image_embeddings(images):
                out[row:row + batch.shape[0]] = batch.numpy()
                row += batch.shape[0]
            if row != n:
                raise RuntimeError(f"embedded {row} images, expected {n}")
            out.flush()
            del out

        directory = Path(directory)
        _check_target(directory)
        token = _start_build(directory)
        name = f"embeddings-{token}.npy"
        files = {name: write_index_file(directory / name, fill)}
        _commit(directory, name, files, n, d, ids, encoder.fingerprint, encoder.config.to_dict())
        # hashed while writing: opening it again needs only the cheap checks
        return cls.load(directory, encoder=encoder, verify=False, backend=cls.backend)

    def save(self, directory: PathLike) -> Path:
        """Write the folder: the data files first, index.json last (the commit point);
        the previous build's data files there are removed after it."""
        directory = Path(directory)
        _check_target(directory)
        token = _start_build(directory)
        data = np.ascontiguousarray(self.embeddings, dtype=np.float32)

        def write(tmp: str):
            with open(tmp, "wb") as f:   # a file object: np.save would append ".npy" to a name
                np.save(f, data)

        name = f"embeddings-{token}.npy"
        files = {name: write_index_file(directory / name, write)}
        record = self._save_backend_files(directory, token, files)
        _commit(directory, name, files, len(self), self.dim, self.ids, self.model_hash, self.model_config,
                backend=self.backend, record=record)
        self.directory = directory
        return directory

    def _save_backend_files(self, directory: Path, token: str, files: dict) -> dict:
        """A backend's own data files (added to `files`) and its index.json fields; the
        exact index has none."""
        return {}

    @classmethod
    def load(cls, directory: PathLike, *, encoder=None, mmap: bool = True, verify: bool = True,
             backend: Optional[str] = None) -> "RetrievalIndex":
        """Open an index folder. Always checked: index.json's structure, that every file it
        names stays inside the folder and has its recorded size, the array's shape and
        dtype. verify=True (default) also checks the SHA-256 of every file (one read of the
        embeddings) and of the ids; verify=False skips the hashes, for a trusted local
        index. Damage raises CorruptFileError naming the file.

        backend: None opens the folder with the backend index.json names (a FAISS folder
        gives a FaissRetrievalIndex); "exact" opens any index's embeddings for the exact
        scan; "faiss" requires a FAISS folder."""
        directory = Path(directory)
        meta = read_index_meta(directory, verify=verify)
        built_with = meta.get("backend", "exact")
        kind = backend_class(built_with if backend is None else backend)
        if kind is not RetrievalIndex and kind.backend != built_with:
            raise ValueError(f"{directory} is not a {kind.backend} index (its {INDEX_FILE} says backend "
                             f"{built_with!r}): open it with RetrievalIndex.load, or rebuild it with "
                             f"backend={kind.backend!r}")
        kind.check_record(directory, meta)   # before hashing: a bad record fails fast
        check_index_files(directory, meta, verify=verify)
        if verify:
            check_ids(directory, meta)
        index = kind.from_record(directory, meta, read_embeddings(directory, meta, mmap=mmap))
        if encoder is not None:
            index.check_encoder(encoder)
        return index

    @classmethod
    def check_record(cls, directory: Path, meta: dict) -> None:
        """A backend's own index.json fields (the exact index has none beyond the common ones)."""

    @classmethod
    def from_record(cls, directory: Path, meta: dict, embeddings) -> "RetrievalIndex":
        """The index of a checked folder (index.json `meta`, the embeddings read from it)."""
        return cls(embeddings, meta["ids"], meta["model_hash"], model_config=meta.get("model_config"),
                   directory=directory)

    # -- searching -----------------------------------------------------------------------
    def check_encoder(self, encoder) -> None:
        if encoder.embed_dim != self.dim:
            raise IndexModelMismatchError(
                f"the index holds {self.dim}-d embeddings but the encoder makes {encoder.embed_dim}-d "
                "ones: it was built with another model; rebuild it with this one")
        if encoder.fingerprint != self.model_hash:
            raise IndexModelMismatchError(
                f"the index was built with model {self.model_hash}, the encoder is model "
                f"{encoder.fingerprint}: scores would be meaningless; rebuild the index with this model")

    def search(self, queries, k: int = 10, chunk_rows: int = 65536) -> Tuple[Tensor, Tensor]:
        """Top-k by cosine similarity: (scores [Q, k] float32, row indices [Q, k] int64),
        best first. The corpus is read `chunk_rows` rows at a time (memory-mapped)."""
        q = torch.as_tensor(queries, dtype=torch.float32)
        if q.dim() == 1:
            q = q[None]
        if q.dim() != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got shape {tuple(q.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, len(self))
        best_scores = torch.full((q.shape[0], 0), float("-inf"))
        best_index = torch.zeros((q.shape[0], 0), dtype=torch.long)
        for start in range(0, len(self), chunk_rows):
            # a copy: memory-mapped rows are read-only (and a page-cache read anyway)
            block = torch.from_numpy(np.array(self.embeddings[start:start + chunk_rows], dtype=np.float32))
            scores = q @ block.T
            top = scores.topk(min(k, scores.shape[1]), dim=1)
            best_scores = torch.cat([best_scores, top.values], 1)
            best_index = torch.cat([best_index, top.indices + start], 1)
            keep = best_scores.topk(min(k, best_scores.shape[1]), dim=1)
            best_scores, best_index = keep.values, best_index.gather(1, keep.indices)
        return best_scores, best_index

    def _results(self, scores: Tensor, index: Tensor) -> List[List[Tuple[str, float]]]:
        # row -1: a place an approximate backend could not fill
        return [[(self.ids[i], float(s)) for s, i in zip(srow.tolist(), irow.tolist()) if i >= 0]
                for srow, irow in zip(scores, index)]

    def search_text(self, encoder, texts: Sequence[str], k: int = 10,
                    **search_kwargs) -> List[List[Tuple[str, float]]]:
        """Top-k images for each text: [[(id, cosine), ...], ...]; search_kwargs go to `search`."""
        self.check_encoder(encoder)
        return self._results(*self.search(encoder.embed_texts(texts), k, **search_kwargs))

    def search_image(self, encoder, images, k: int = 10, **search_kwargs) -> List[List[Tuple[str, float]]]:
        """Top-k corpus images for each query image (paths, PIL images or a tensor)."""
        self.check_encoder(encoder)
        return self._results(*self.search(encoder.embed_images(images), k, **search_kwargs))


def check_row_ids(ids: Sequence[str], rows: int, what: str = "embeddings") -> None:
    """One unique id per row of a non-empty corpus; ValueError saying which rule is broken."""
    if rows == 0:
        raise ValueError("empty corpus: an index needs at least one embedding")
    if len(ids) != rows:
        raise ValueError(f"{len(ids)} ids for {rows} {what}")
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique")


def backend_class(backend: str) -> type:
    """The index class of a backend name ("exact" or "faiss"); ValueError for another name.
    "faiss" needs the faiss package (ImportError naming the `faiss` extra)."""
    if backend == "exact":
        return RetrievalIndex
    if backend == "faiss":
        from .index_faiss import FaissRetrievalIndex, require_faiss
        require_faiss()   # before any embedding or hashing
        return FaissRetrievalIndex
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_target(directory: Path) -> None:
    """The folder is absent, empty, or an index (of any backend) that may be replaced."""
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a folder")
    if directory.is_dir() and not (directory / INDEX_FILE).is_file():
        # a killed first build may leave temporaries or unreferenced data files
        leftovers = [p.name for p in directory.iterdir()
                     if not p.name.startswith((TMP_PREFIX, *DATA_FILE_PREFIXES))]
        if leftovers:
            raise FileExistsError(f"{directory} is not empty and is not an index ({leftovers[:3]}); "
                                  "refusing to write an index into it")


def _start_build(directory: Path) -> str:
    """Create the folder, clear what a killed build left, and return the new build's token
    (in the names of its data files, so they never overwrite the files index.json names)."""
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    return uuid.uuid4().hex[:12]


def _commit(directory: Path, embeddings_file: str, files: dict, n: int, d: int, ids, model_hash: str,
            config, *, backend: str = "exact", record: Optional[dict] = None) -> None:
    """Write index.json (the commit point), then remove the data files it no longer names."""
    ids = list(ids)
    atomic_write_json(directory / INDEX_FILE, {
        "format": FORMAT, "version": VERSION, "backend": backend, "embeddings_file": embeddings_file,
        "count": n, "dim": d, "dtype": "float32", "model_hash": model_hash, "model_config": config,
        "ids": ids, "ids_sha256": ids_sha256(ids), "files": files, **(record or {})})
    for old in directory.iterdir():   # the previous build's files, now unreferenced
        if old.name.startswith(DATA_FILE_PREFIXES) and old.name not in files:
            old.unlink(missing_ok=True)


def read_embeddings(directory: PathLike, meta: dict, mmap: bool = True) -> np.ndarray:
    """The embeddings file index.json names (memory-mapped with mmap=True), checked against
    its count, dim and dtype; CorruptFileError naming the file."""
    directory = Path(directory)
    emb_path = member_path(directory, meta["embeddings_file"])
    if not emb_path.is_file():   # version 1 has no `files` record to have caught it
        raise CorruptFileError(emb_path, f"missing (named by {INDEX_FILE})")
    try:
        embeddings = np.load(emb_path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CorruptFileError(emb_path, f"not a readable .npy array ({e})") from None
    if embeddings.shape != (meta["count"], meta["dim"]) or embeddings.dtype != np.float32:
        raise CorruptFileError(emb_path, f"holds {embeddings.dtype} {embeddings.shape}, but "
                                         f"{directory / INDEX_FILE} says float32 ({meta['count']}, {meta['dim']})")
    if not embeddings.flags.c_contiguous:   # a Fortran-order header would scramble the rows
        raise CorruptFileError(emb_path, "is not a row-major (C-order) array")
    return embeddings


# -- integrity (shared by every index backend: each lists its data files in `files`) ----------
def write_index_file(path: PathLike, write_fn) -> dict:
    """write_fn(temp_path) writes a data file of an index; it is hashed and put at `path`
    atomically. Returns its `files` entry {"bytes", "sha256"} for index.json, which is
    written after every data file (the commit point)."""
    entry = {}

    def write_and_hash(tmp: str):
        write_fn(tmp)
        entry.update(bytes=os.path.getsize(tmp), sha256=file_sha256(tmp))

    atomic_write(path, write_and_hash)
    return entry


def ids_sha256(ids: Sequence[str]) -> str:
    """SHA-256 of the ids in their order (compact UTF-8 JSON list): an edited, removed,
    added or reordered id changes it."""
    text = json.dumps(list(ids), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def read_index_meta(directory: PathLike, verify: bool = True) -> dict:
    """Parse `directory/index.json` and check its structure (fields and their types);
    CorruptFileError naming it when it is not a valid index record. A version-1 index (no
    integrity record) opens only with verify=False."""
    directory = Path(directory)
    meta_path = directory / INDEX_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a retrieval index (no {INDEX_FILE}); build one "
                                "with RetrievalIndex.build or `vlmo-fast index`")
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(meta_path, f"not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptFileError(meta_path, f"not a {FORMAT} record (format "
                                          f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("version")
    if version == 1 and verify:
        raise CorruptFileError(meta_path, (
            "index format version 1 records no hashes of its files, so it cannot be verified; rebuild "
            "it (`vlmo-fast index` / RetrievalIndex.build), or open it unverified with "
            "RetrievalIndex.load(..., verify=False) and .save() it to a new folder"))
    if version not in (1, VERSION):
        raise CorruptFileError(meta_path, f"index format version {version!r}; this vlmo_fast reads "
                                          f"versions 1 (unverified) and {VERSION}")

    def bad(what: str):
        raise CorruptFileError(meta_path, f"{what}: the index record is damaged; rebuild the index")

    for key, kind in (("embeddings_file", str), ("count", int), ("dim", int), ("model_hash", str),
                      ("ids", list)):
        if type(meta.get(key)) is not kind:
            bad(f"field {key!r} must be a {kind.__name__}, got {type(meta.get(key)).__name__}")
    if meta["count"] < 1 or meta["dim"] < 1:
        bad(f"count {meta['count']} and dim {meta['dim']} must be >= 1")
    if meta.get("backend", "exact") not in BACKENDS:
        raise CorruptFileError(meta_path, f"backend {meta.get('backend')!r}: this vlmo_fast reads the "
                                          f"backends {BACKENDS}")
    if meta.get("dtype", "float32") != "float32":
        bad(f"dtype {meta.get('dtype')!r}, expected 'float32'")
    ids = meta["ids"]
    if len(ids) != meta["count"]:
        bad(f"{len(ids)} ids for count {meta['count']}")
    if not all(isinstance(i, str) for i in ids):
        bad("every id must be a string")
    if len(set(ids)) != len(ids):
        bad("ids are not unique")
    if version == 1:
        meta = dict(meta, files={})
    else:
        files = meta.get("files")
        if not isinstance(files, dict) or meta["embeddings_file"] not in files:
            bad(f"'files' must record the embeddings file {meta['embeddings_file']!r}")
        for name, entry in files.items():
            if (not isinstance(entry, dict) or type(entry.get("bytes")) is not int
                    or not _is_sha256(entry.get("sha256"))):
                bad(f"malformed 'files' entry for {name!r} (expected bytes and sha256)")
        if not _is_sha256(meta.get("ids_sha256")):
            bad("'ids_sha256' is missing or not a SHA-256 hex digest")
    return meta


def member_path(directory: PathLike, name) -> Path:
    """The path of a file index.json names, refusing a name that leaves the index folder: an
    absolute path, a `..` component, or a symlink (of the file or a folder on its way) that
    resolves outside. An index must never make a reader open files elsewhere."""
    directory = Path(directory)
    meta_path = directory / INDEX_FILE
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CorruptFileError(meta_path, f"names the file {name!r}: an index's files must be relative "
                                          "names inside its folder (no absolute path, no '..')")
    path = directory / name
    root, real = directory.resolve(), path.resolve()
    if real == root or root not in real.parents:
        raise CorruptFileError(path, f"resolves to {real}, outside the index folder {root} (a symlink?): "
                                     "refusing to read it")
    return path


def check_index_files(directory: PathLike, meta: dict, verify: bool = True) -> None:
    """Every file in meta["files"]: inside the folder (`member_path`), present, of the
    recorded size (always) and SHA-256 (verify=True). CorruptFileError naming the file."""
    verify_files(directory, meta["files"], verify_hashes=verify, recorded_in=INDEX_FILE, locate=member_path,
                 advice="rebuild the index")


def check_ids(directory: PathLike, meta: dict) -> None:
    """The ids still hash to meta["ids_sha256"]; CorruptFileError naming index.json if not."""
    if ids_sha256(meta["ids"]) != meta["ids_sha256"]:
        raise CorruptFileError(Path(directory) / INDEX_FILE, (
            "its ids do not match ids_sha256 (ids edited, removed or reordered after the index was "
            "built, so rows would be served under the wrong ids); rebuild the index"))
