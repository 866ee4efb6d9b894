"""Training checkpoints that survive a kill at any moment, are verified before anything reads
them, hold no pickle of ours, and resume exactly.

Layout of a stage's checkpoint folder:

    <dir>/step_000040/                    one checkpoint (its "tag")
        checkpoint.json                   written FIRST, by rank 0: step, lineage, world size,
                                          the run's arguments, the lr schedule's segments
        mp_rank_00_model_states.pt ...    DeepSpeed's files (model, optimizer partitions,
                                          scheduler), read back weights-only (see below)
        client_rank{r}.json               our state per rank: step, skipped steps, data
        client_rank{r}.safetensors          position, RNG of every stream (JSON + tensors)
        manifest.json                     written LAST: size + SHA-256 of every file above
                                          (vlmo_fast.io's manifest format)
    <dir>/latest                          the tag of the last checkpoint saved: a hint

Order of a save (`save_checkpoint`, collective): rank 0 clears a leftover folder of the same
tag (see "Lineage") and writes checkpoint.json; every rank writes DeepSpeed's files and its
client files; barrier; the ranks hash the files (split between them, sizes balanced) and
rank 0 writes manifest.json; rank 0 moves `latest`, then prunes. A checkpoint is COMPLETE
when its manifest verifies: a kill before the manifest leaves an incomplete folder that is
never read; a kill after it leaves a complete checkpoint, whether `latest` moved or not.

Resume (`find_resume_checkpoint`, collective): the step_* folders newest first; the first
complete one wins (hashes split between the ranks, the result agreed over the process group).
Policies: "auto" skips a damaged checkpoint (manifest present but a file missing, truncated
or changed, or the one `latest` names without a manifest) with a warning naming the file and
falls back to the previous complete one; "strict" refuses instead; "never" starts afresh but
refuses when checkpoints exist (a fresh run never deletes or overwrites them). Checkpoints
present but none complete: refused with each one's problem, never a silent restart at step 0.
Only interrupted saves (incomplete, never pointed at: the first save of a run was killed) give
a fresh start, with a warning. `load_checkpoint` then checks the world size, lets DeepSpeed
read its files weights-only, and reads the client state.

Lineage: every run draws a lineage id (`new_lineage()`); a resumed run keeps its checkpoint's.
Pruning deletes only checkpoints OLDER than the one just written AND of the same lineage
(keep-last-K complete ones, and this lineage's older interrupted saves); newer folders and
other lineages' checkpoints are never deleted. A save whose tag folder already exists replaces
it when it is this lineage's or an incomplete save; a complete checkpoint of another lineage
or one written by an older vlmo_fast (pickled client state) stops the save with an error.

No pickle: DeepSpeed loads its files through its checkpoint engine, which calls
torch.load(weights_only=False). For the duration of `engine.load_checkpoint` this module
replaces that engine's `load` (an attribute of this engine object; no DeepSpeed file is
patched) with torch.load(weights_only=True) under `torch.serialization.safe_globals` of the
few DeepSpeed classes its files hold (`deepspeed_safe_globals`), and sets torch's
TORCH_FORCE_WEIGHTS_ONLY_LOAD so a torch.load elsewhere in DeepSpeed's load path is
weights-only too. Checkpoints of older vlmo_fast versions (client_rank*.pt pickles) are
read only with `trust_pickle=True`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ..distributed import all_reduce, barrier, world_and_rank
from ..io import (MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, OLD_PREFIX, TMP_PREFIX, CorruptFileError,
                  atomic_write, atomic_write_json, atomic_write_text, read_manifest, remove_stale_temporaries,
                  verify_files)

TAG_RE = re.compile(r"^step_(\d+)$")
LATEST = "latest"
META_NAME = "checkpoint.json"
META_FORMAT = "vlmo_fast.training_checkpoint"
CLIENT_FORMAT = "vlmo_fast.training_client"
FORMAT_VERSION = 1
RESUME_POLICIES = ("auto", "strict", "never")
# the client state's markers for what JSON cannot hold
_TENSOR, _NDARRAY, _TUPLE = "__tensor__", "__ndarray__", "__tuple__"
_MARKERS = (_TENSOR, _NDARRAY, _TUPLE)
_MESSAGE_BYTES = 4096  # longest error text rank 0 shares with the other ranks


class CheckpointError(ValueError):
    """A training checkpoint cannot be used: damaged, incomplete, of another run or world size,
    or of an older format. The message names the folder or file and says what to do."""


class ResumeWarning(UserWarning):
    """A checkpoint was skipped on resume (damaged or an interrupted save)."""


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def step_of_tag(tag: str) -> int:
    m = TAG_RE.match(tag)
    if not m:
        raise ValueError(f"{tag!r} is not a checkpoint tag (step_NNNNNN)")
    return int(m.group(1))


def new_lineage() -> str:
    """A fresh run's lineage id (recorded in each of its checkpoints)."""
    return uuid.uuid4().hex


# --------------------------------------------------------------------------- RNG state
def rng_state(generators: Dict[str, torch.Generator]) -> Dict:
    """Python's, NumPy's, torch's (CPU and every CUDA device) global RNG states and those of
    the named generators: a value the client state stores as JSON + tensors."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "generators": {k: g.get_state() for k, g in generators.items()}}


def set_rng_state(state: Dict, generators: Dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in generators.items():
        if k not in state["generators"]:
            raise KeyError(f"checkpoint has no state for random stream {k!r}")
        g.set_state(state["generators"][k])


# --------------------------------------------------------------------------- client state
def encode_state(value: Any) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """(JSON-able structure, tensors) for a client state made of JSON values, tuples, torch
    tensors and NumPy arrays/scalars; TypeError naming the key path of anything else."""
    tensors: Dict[str, torch.Tensor] = {}

    def enc(v, where):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = v.detach().cpu().contiguous().clone()
            return {_TENSOR: key}
        if isinstance(v, (np.ndarray, np.generic)):
            a = np.ascontiguousarray(v)
            if a.dtype.hasobject:
                raise TypeError(f"client state {where}: a NumPy array of Python objects cannot be stored")
            key = f"t{len(tensors)}"
            tensors[key] = torch.frombuffer(bytearray(a.tobytes()), dtype=torch.uint8) if a.nbytes else \
                torch.zeros(0, dtype=torch.uint8)
            return {_NDARRAY: key, "dtype": a.dtype.str, "shape": list(a.shape), "scalar": isinstance(v, np.generic)}
        if isinstance(v, tuple):
            return {_TUPLE: [enc(x, f"{where}[{i}]") for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [enc(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                if not isinstance(k, str):
                    raise TypeError(f"client state {where}: key {k!r} is not a string")
                if k in _MARKERS:
                    raise TypeError(f"client state {where}: key {k!r} is reserved")
                out[k] = enc(x, f"{where}.{k}")
            return out
        raise TypeError(f"client state {where}: cannot store a {type(v).__name__} (JSON values, "
                        "tuples, tensors and NumPy arrays only)")
    return enc(value, "state"), tensors


def decode_state(value: Any, tensors: Dict[str, torch.Tensor], where: str = "client state") -> Any:
    """The inverse of `encode_state`; ValueError naming `where` for a reference to a tensor
    that is not there."""
    def tensor(key):
        if key not in tensors:
            raise ValueError(f"{where}: refers to tensor {key!r}, which its .safetensors file does not hold")
        return tensors[key]

    def dec(v):
        if isinstance(v, list):
            return [dec(x) for x in v]
        if not isinstance(v, dict):
            return v
        if _TENSOR in v:
            return tensor(v[_TENSOR]).clone()
        if _NDARRAY in v:
            a = np.frombuffer(tensor(v[_NDARRAY]).numpy().tobytes(), dtype=np.dtype(v["dtype"]))
            a = a.reshape(v["shape"]).copy()
            return a[()] if v.get("scalar") else a
        if _TUPLE in v:
            return tuple(dec(x) for x in v[_TUPLE])
        return {k: dec(x) for k, x in v.items()}
    return dec(value)


def _client_paths(folder: Path, rank: int) -> Tuple[Path, Path]:
    return folder / f"client_rank{rank}.json", folder / f"client_rank{rank}.safetensors"


def write_client_state(folder, rank: int, state: Dict) -> None:
    """client_rank{rank}.json + .safetensors (each written atomically)."""
    from safetensors.torch import save_file
    encoded, tensors = encode_state(state)
    json_path, tensor_path = _client_paths(Path(folder), rank)
    atomic_write(tensor_path, lambda p: save_file(tensors, p))
    atomic_write_json(json_path, {"format": CLIENT_FORMAT, "version": FORMAT_VERSION, "rank": rank,
                                  "state": encoded})


def read_client_state(folder, rank: int) -> Dict:
    """The client state `write_client_state` wrote; CheckpointError naming the file if it is
    missing or not what it should be."""
    from safetensors.torch import load_file
    json_path, tensor_path = _client_paths(Path(folder), rank)
    for p in (json_path, tensor_path):
        if not p.is_file():
            raise CheckpointError(f"{p} is missing")
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != CLIENT_FORMAT or "state" not in doc:
        raise CheckpointError(f"{json_path}: not a {CLIENT_FORMAT} file")
    if doc.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{json_path}: client state version {doc.get('version')!r}; this vlmo_fast "
                              f"reads version {FORMAT_VERSION}")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"{tensor_path}: unreadable ({_first_line(e)})") from None
    return decode_state(doc["state"], tensors, where=str(json_path))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# --------------------------------------------------------------------------- agreement over ranks
def _reduce_device() -> torch.device:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _share_text(text: Optional[str], src: int = 0) -> Optional[str]:
    """Rank src's text (or None) on every rank. Collective; no pickle (UTF-8 bytes in a tensor)."""
    world, rank = world_and_rank()
    if world == 1:
        return text
    buf = torch.zeros(_MESSAGE_BYTES + 1, dtype=torch.uint8, device=_reduce_device())
    if rank == src and text is not None:
        data = text.encode("utf-8")[:_MESSAGE_BYTES]
        buf[0] = 1
        buf[1:1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    dist.broadcast(buf, src=src)
    if int(buf[0]) == 0:
        return None
    return bytes(buf[1:].cpu().tolist()).rstrip(b"\0").decode("utf-8", errors="replace")


def _agree(problem: Optional[str]) -> Optional[str]:
    """Every rank's answer to "is something wrong?" made one: the problem of the lowest rank
    that has one, on every rank, or None when no rank has one. Collective."""
    world, rank = world_and_rank()
    if world == 1:
        return problem
    first = torch.tensor([rank if problem is not None else world], dtype=torch.int64, device=_reduce_device())
    first = int(all_reduce(first, "min").item())
    return None if first == world else _share_text(problem, src=first)


def _run_on_rank0(fn: Callable[[], Any]) -> Any:
    """fn() on rank 0; an exception there is raised on EVERY rank (as a CheckpointError
    carrying its message on the others), so no rank waits forever in a later collective."""
    _, rank = world_and_rank()
    result, error, message = None, None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised below, after the other ranks have heard of it
            error, message = e, (str(e) if isinstance(e, CheckpointError) else _first_line(e))
    message = _share_text(message)
    if error is not None:
        raise error
    if message is not None:
        raise CheckpointError(f"rank 0: {message}")
    return result


def _assign_files(sizes: List[int], world: int) -> List[int]:
    """Rank that hashes each file: largest first to the least loaded rank (deterministic)."""
    load, owner = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def _sha256_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def _hash_files(folder: Path, names: List[str]) -> List[Tuple[int, str]]:
    """(bytes, SHA-256 hex) of each file, the hashing split over the ranks. Collective."""
    world, rank = world_and_rank()
    counts = all_reduce(torch.tensor([len(names), -len(names)], device=_reduce_device()), "max").tolist()
    if counts != [len(names), -len(names)]:   # the collectives below need the same list on every rank
        raise CheckpointError(f"the ranks see different files in {folder} ({-counts[1]} to {counts[0]}): "
                              "checkpoints need a folder every rank sees (a shared filesystem)")
    sizes = [(folder / n).stat().st_size for n in names]
    owner = _assign_files(sizes, world)
    digests = torch.zeros((len(names), 32), dtype=torch.uint8)
    for i, n in enumerate(names):
        if owner[i] == rank:
            digests[i] = torch.frombuffer(bytearray(_sha256_bytes(folder / n)), dtype=torch.uint8)
    digests = all_reduce(digests.to(torch.int32).to(_reduce_device()), "sum").cpu()
    return [(sizes[i], bytes(digests[i].to(torch.uint8).tolist()).hex()) for i in range(len(names))]


def _verify_files(folder: Path, manifest: Dict, verify_hashes: bool) -> Optional[str]:
    """What is wrong with the first damaged file the manifest lists (missing, another size,
    or with verify_hashes another SHA-256; vlmo_fast.io.verify_files' message naming the
    file), or None. Collective: each rank checks its share of the files (sizes balanced) and
    every rank returns the same answer."""
    world, rank = world_and_rank()
    names = sorted(manifest["files"])
    owner = _assign_files([manifest["files"][n]["bytes"] for n in names], world)
    mine = {n: manifest["files"][n] for i, n in enumerate(names) if owner[i] == rank}
    problem = None
    try:
        verify_files(folder, mine, verify_hashes=verify_hashes)
    except CorruptFileError as e:
        problem = str(e)
    return _agree(problem)


def _checkpoint_files(folder: Path) -> List[str]:
    """Every regular file under `folder` (relative POSIX paths), but the manifest and temporaries."""
    names = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((TMP_PREFIX, OLD_PREFIX)))
        for name in filenames:
            if name.startswith((TMP_PREFIX, OLD_PREFIX)):
                continue
            rel = Path(dirpath, name).relative_to(folder).as_posix()
            if rel != MANIFEST_NAME:
                names.append(rel)
    return sorted(names)


# --------------------------------------------------------------------------- what a folder holds
@dataclass
class _Folder:
    path: Path
    step: int
    kind: str                  # "complete?" (has a manifest), "incomplete", "legacy"
    lineage: Optional[str]
    meta: Optional[Dict]


def _read_meta(folder: Path) -> Optional[Dict]:
    try:
        meta = json.loads((folder / META_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == META_FORMAT else None


def _inspect(folder: Path) -> _Folder:
    meta = _read_meta(folder)
    lineage = meta.get("lineage") if meta else None
    if (folder / MANIFEST_NAME).is_file():
        kind = "manifest"
    elif meta is None and any(folder.glob("client_rank*.pt")):
        kind = "legacy"
    else:
        kind = "incomplete"
    return _Folder(folder, step_of_tag(folder.name), kind, lineage, meta)


def _tag_folders(directory: Path) -> List[Path]:
    if not directory.is_dir():
        return []
    return sorted((e for e in directory.iterdir() if e.is_dir() and TAG_RE.match(e.name)),
                  key=lambda e: step_of_tag(e.name), reverse=True)


def latest_tag(directory) -> Optional[str]:
    """The tag the `latest` pointer names (a hint: `find_resume_checkpoint` decides), None
    without a pointer; RuntimeError when it names no checkpoint folder."""
    p = Path(directory) / LATEST
    if not p.is_file():
        return None
    tag = p.read_text(errors="replace").strip()
    if not TAG_RE.match(tag) or not (Path(directory) / tag).is_dir():
        raise RuntimeError(f"{p} names {tag!r}, which is not a checkpoint folder in {directory}")
    return tag


# --------------------------------------------------------------------------- save
def _remove_tree(path: Path) -> None:
    """Delete a checkpoint folder so that a kill midway never leaves a half-deleted step_*
    folder: it is first renamed to a temporary name (`remove_stale_temporaries` clears it)."""
    doomed = path.parent / f"{TMP_PREFIX}{path.name}.deleted"
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _clear_for_save(folder: Path, lineage: str) -> None:
    """Make way for a save into `folder` (rank 0): a leftover of this lineage or an interrupted
    save is deleted; anything else is never touched and stops the save."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise CheckpointError(f"{folder} exists and is not a checkpoint folder: move it away")
    info = _inspect(folder)
    if info.kind == "legacy":
        raise CheckpointError(f"{folder} is a checkpoint written by an older vlmo_fast; a new save never "
                              f"overwrites it: move it away or use another --output-dir")
    if info.kind == "incomplete" or info.lineage == lineage:
        _remove_tree(folder)
        return
    raise CheckpointError(f"{folder} is a checkpoint of another run (lineage {info.lineage}, this run "
                          f"{lineage}); a run never deletes another run's checkpoints: move it away or "
                          f"use another --output-dir")


@contextlib.contextmanager
def _observe_writes(engine, on_file: Callable[[Path], None]):
    """Call on_file(path) after each file DeepSpeed's checkpoint engine saves."""
    ce = engine.checkpoint_engine
    original = ce.save

    def save(state_dict, path):
        original(state_dict, path)
        on_file(Path(path))
    with _instance_attribute(ce, "save", save):
        yield


@contextlib.contextmanager
def _instance_attribute(obj, name: str, value):
    """obj.name = value on this object only (its class untouched), restored on exit."""
    missing = object()
    before = obj.__dict__.get(name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if before is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, before)


def save_checkpoint(engine, directory, step: int, client_state: Dict, rank: int, keep_last: int = 2,
                    fault_hook: Optional[Callable[[str, int, Optional[Path]], None]] = None, *,
                    lineage: str, run_args: Optional[Dict] = None,
                    schedule: Optional[List[Dict]] = None) -> str:
    """Collective. Write checkpoint `step_<step>` into `directory`; returns the tag.

    client_state: this rank's state (JSON values, tuples, tensors, NumPy arrays; a callable
    value under "rng" is called at write time). lineage: the run's id (rank 0's is used).
    run_args: the run's arguments (`resume.record_run_args`), schedule: the lr schedule's
    segments (`resume.initial_schedule` / `ResumePlan.schedule`), both recorded for the
    resume checks. fault_hook: tests' kill points (`faults.checkpoint_hook`)."""
    directory = Path(directory)
    tag = tag_for(step)
    folder = directory / tag
    world, _ = world_and_rank()
    hook = fault_hook or (lambda point, at, path=None: None)
    scheduler = getattr(engine, "lr_scheduler", None)
    zero = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    meta = {"format": META_FORMAT, "version": FORMAT_VERSION, "step": int(step), "tag": tag,
            "lineage": lineage, "world_size": world, "zero_stage": int(zero or 0),
            "scheduler_step": getattr(scheduler, "last_epoch", None),
            "run_args": run_args, "schedule": schedule}
    json.dumps(meta)  # a run argument JSON cannot hold fails here, before anything is written

    def prepare():
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(directory)
        _clear_for_save(folder, lineage)
        folder.mkdir()
        atomic_write_json(folder / META_NAME, meta)
    _run_on_rank0(prepare)
    barrier()
    hook("save_started", step, None)
    # whatever DeepSpeed's save draws from the global RNGs must not shift the training stream
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), _observe_writes(engine, lambda p: hook("deepspeed_file", step, p)):
        engine.save_checkpoint(str(directory), tag=tag, client_state={"step": step}, save_latest=False)
    state = dict(client_state)
    if callable(state.get("rng")):
        state["rng"] = state["rng"]()
    write_client_state(folder, rank, state)
    hook("files_written", step, None)
    barrier()
    names = _checkpoint_files(folder)
    hashed = _hash_files(folder, names)

    def publish():
        manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": int(step),
                    "files": {n: {"bytes": b, "sha256": h} for n, (b, h) in zip(names, hashed)}}
        atomic_write_json(folder / MANIFEST_NAME, manifest)
        hook("manifest_written", step, None)
        atomic_write_text(directory / LATEST, tag + "\n")
        hook("latest_moved", step, None)
        prune(directory, tag, keep_last, lineage)
    _run_on_rank0(publish)
    barrier()
    hook("save_finished", step, None)
    return tag


def prune(directory, current: str, keep_last: int, lineage: str) -> List[str]:
    """Delete checkpoints of `lineage` older than `current`: complete ones beyond the newest
    keep_last (current included), and interrupted saves. Newer folders, other lineages' and
    older vlmo_fast versions' checkpoints are never deleted. Returns the tags deleted."""
    directory = Path(directory)
    cur = step_of_tag(current)
    older = [_inspect(p) for p in _tag_folders(directory) if step_of_tag(p.name) < cur]
    mine = [f for f in older if f.lineage == lineage and f.kind != "legacy"]
    complete = [f for f in mine if f.kind == "manifest"]   # newest first
    doomed = complete[max(1, keep_last) - 1:] + [f for f in mine if f.kind == "incomplete"]
    for f in doomed:
        _remove_tree(f.path)
    return sorted(f.path.name for f in doomed)


# --------------------------------------------------------------------------- resume
@dataclass
class ResumePoint:
    """The checkpoint a run resumes from (`find_resume_checkpoint`)."""
    directory: Path
    tag: str
    step: int
    lineage: Optional[str]
    meta: Dict
    legacy: bool = False                 # older format: no manifest, pickled client state
    skipped: List[str] = field(default_factory=list)  # why each newer folder was not used

    @property
    def path(self) -> Path:
        return self.directory / self.tag

    @property
    def run_args(self) -> Optional[Dict]:
        return self.meta.get("run_args")

    @property
    def schedule(self) -> Optional[List[Dict]]:
        return self.meta.get("schedule")

    @property
    def world_size(self) -> Optional[int]:
        return self.meta.get("world_size")

    @property
    def scheduler_step(self) -> Optional[int]:
        return self.meta.get("scheduler_step")


def _warn(message: str) -> None:
    if world_and_rank()[1] == 0:
        warnings.warn(message, ResumeWarning, stacklevel=3)


def _check_point(info: _Folder, verify_hashes: bool) -> Optional[str]:
    """Why the folder (which has a manifest) is not a usable checkpoint, or None. Collective."""
    problem, manifest = None, None
    try:
        manifest = read_manifest(info.path)
    except (CorruptFileError, OSError) as e:
        problem = str(e)
    problem = _agree(problem)   # every rank read the manifest before the collective check
    if problem is not None:
        return problem
    bad = _verify_files(info.path, manifest, verify_hashes)
    if bad is not None:
        return bad
    if info.meta is None or info.meta.get("version") != FORMAT_VERSION or info.meta.get("step") != info.step:
        return f"{info.path / META_NAME}: not a {META_FORMAT} version {FORMAT_VERSION} record of step {info.step}"
    return None


def find_resume_checkpoint(directory, policy: str = "auto", *, trust_pickle: bool = False,
                           verify_hashes: bool = True) -> Optional[ResumePoint]:
    """The checkpoint to resume from in `directory`, or None for a fresh start. Collective
    (every rank must call it). See the module docstring for the policies; raises
    CheckpointError when it must refuse, warns (ResumeWarning, rank 0) for each skipped one.

    verify_hashes=False checks only presence and sizes (fast, catches truncation)."""
    if policy not in RESUME_POLICIES:
        raise ValueError(f"resume policy must be one of {RESUME_POLICIES}, got {policy!r}")
    directory = Path(directory)
    folders = _tag_folders(directory)
    if policy == "never":
        kept = [p.name for p in folders if any(p.iterdir())]
        if kept:
            raise CheckpointError(f"--resume never: {directory} holds checkpoints of an earlier run "
                                  f"({', '.join(sorted(kept))}); a new run never deletes them: use another "
                                  f"--output-dir, or move them away, or resume (--resume auto)")
        return None
    pointer, pointer_note = None, None   # `latest` is a hint; what is wrong with it is reported
    pointer_path = directory / LATEST
    if pointer_path.is_file():
        text = pointer_path.read_text(errors="replace").strip()
        if not TAG_RE.match(text):
            pointer_note = f"{pointer_path} is damaged (holds {text[:40]!r})"
        elif not (directory / text).is_dir():
            pointer_note = f"{pointer_path} names {text}, which does not exist"
        else:
            pointer = text
    elif folders:
        pointer_note = f"{pointer_path} is missing"
    problems: List[str] = []      # damaged checkpoints
    interrupted: List[str] = []   # saves that never completed
    for path in folders:
        info = _inspect(path)
        where = f"checkpoint {path.name} (step {info.step})"
        if info.kind == "legacy":
            if not trust_pickle:
                raise CheckpointError(
                    f"{path} was written by an older vlmo_fast: its client state (client_rank*.pt) is a "
                    f"pickle, which can run code when loaded and is never loaded without an explicit "
                    f"opt-in: rerun with --trust-pickle if you trust this folder, or start a new run in "
                    f"another --output-dir")
            _warn(f"{where} was written by an older vlmo_fast (no manifest): resuming from it unverified "
                  f"(--trust-pickle)")
            return ResumePoint(directory, path.name, info.step, None, {}, legacy=True,
                               skipped=problems + interrupted)
        if info.kind == "incomplete":
            if path.name == pointer:
                problem = (f"{where}: {path / MANIFEST_NAME} is missing, but {pointer_path} names this "
                           "checkpoint (a save completes only with its manifest): damaged")
            else:
                interrupted.append(f"{where}: an interrupted save (no {MANIFEST_NAME})")
                continue
        else:
            problem = _check_point(info, verify_hashes)
            if problem is None:
                skipped = problems + interrupted
                if pointer is not None and step_of_tag(pointer) < info.step:
                    pointer_note = (f"{pointer_path} names {pointer} ({path.name}'s save ended after its "
                                    "manifest, before `latest` moved)")
                notes = skipped + ([pointer_note] if pointer_note else [])
                if notes:
                    _warn(f"resuming from the newest complete checkpoint, {where} in {directory}; "
                          + "; ".join(notes))
                return ResumePoint(directory, path.name, info.step, info.lineage, info.meta, skipped=skipped)
            problem = f"{where}: {problem}"
        if policy == "strict":
            raise CheckpointError(f"{problem}. --resume strict refuses a damaged checkpoint: restore the "
                                  f"file, or resume with --resume auto to fall back to an older checkpoint")
        problems.append(problem)
    if problems:
        raise CheckpointError(f"no complete checkpoint in {directory}: " + "; ".join(problems + interrupted)
                              + ". Nothing was deleted. Restore the damaged files, or move the folder away "
                              "to start again from step 0")
    if interrupted:
        _warn(f"no complete checkpoint in {directory}, only interrupted saves ({'; '.join(interrupted)}): "
              f"starting from step 0")
    return None


def check_world_size(point: ResumePoint) -> None:
    """CheckpointError unless this run has the number of processes that wrote `point`."""
    world, _ = world_and_rank()
    saved = point.world_size
    if saved is not None and saved != world:
        raise CheckpointError(
            f"{point.path} was written by {saved} process(es); this run has {world}. Optimizer "
            f"partitions, data shards and per-rank RNG streams belong to the world size: resume with "
            f"{saved} process(es), or start a new run from its weights in another --output-dir")


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its checkpoint files hold (loss scaler, ZeRO stage enum, optimizer
    fragment addresses): plain data, allowed to the weights-only unpickler by name."""
    found = []
    for module, name in (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                         ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                         ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                         ("deepspeed.utils.tensor_fragment", "fragment_address")):
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return found


@contextlib.contextmanager
def _env_var(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def weights_only_deepspeed_load(engine, where: str):
    """Inside the block, every file `engine.load_checkpoint` reads is loaded weights-only with
    `deepspeed_safe_globals()` allowed; a file that cannot be read raises CheckpointError
    naming it and `where` (the checkpoint and step)."""
    ce = engine.checkpoint_engine
    allowed = deepspeed_safe_globals()

    def load(path, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
                try:
                    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
                except Exception:
                    names = []
                raise CheckpointError(
                    f"{where}: {path} holds Python objects the weights-only loader does not allow "
                    f"({', '.join(names) or _first_line(e)}); vlmo_fast never unpickles them") from None
            raise CheckpointError(f"{where}: {path} is unreadable ({_first_line(e)})") from None
    with _instance_attribute(ce, "load", load), _env_var("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1"):
        yield


def load_checkpoint(engine, source, rank: int, tag: Optional[str] = None, *, policy: str = "auto",
                    trust_pickle: bool = False, plan=None) -> Dict:
    """Load DeepSpeed's state (module, optimizer, scheduler) and this rank's client state;
    returns the latter. Collective.

    source: a ResumePoint (from `find_resume_checkpoint`, already verified) or a checkpoint
    folder (then `tag`, verified here, or the point `find_resume_checkpoint(source, policy)`
    picks). plan: a `resume.ResumePlan`; its overrides and schedule are applied to the
    optimizer and scheduler after DeepSpeed restored the recorded ones."""
    if isinstance(source, ResumePoint):
        point = source
    elif tag is not None:
        point = _point_for_tag(Path(source), tag)
    else:
        point = find_resume_checkpoint(source, policy, trust_pickle=trust_pickle)
        if point is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {source}")
    where = f"checkpoint {point.tag} (step {point.step}) in {point.directory}"
    if point.legacy and not trust_pickle:
        raise CheckpointError(f"{where} was written by an older vlmo_fast (pickled client state): pass "
                              f"trust_pickle=True (--trust-pickle) to load it")
    check_world_size(point)
    fresh = None
    if plan is not None:
        from .resume import capture_settings
        fresh = capture_settings(engine.optimizer, engine.lr_scheduler)
    try:
        with weights_only_deepspeed_load(engine, where):
            path, _ = engine.load_checkpoint(str(point.directory), tag=point.tag, load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    except AssertionError as e:  # DeepSpeed's checks of what it read
        raise CheckpointError(f"{where}: DeepSpeed refused it ({_first_line(e) or 'assertion failed'})") from None
    if path is None:
        raise CheckpointError(f"{where}: DeepSpeed found no model states in it")
    if plan is not None:
        from .resume import apply_overrides
        apply_overrides(engine.optimizer, engine.lr_scheduler, plan, fresh)
    if point.legacy:
        client = point.path / f"client_rank{rank}.pt"
        if not client.is_file():
            raise CheckpointError(f"{where}: {client} is missing")
        return torch.load(client, map_location="cpu", weights_only=False)  # opted in: trust_pickle
    return read_client_state(point.path, rank)


def _point_for_tag(directory: Path, tag: str) -> ResumePoint:
    """The checkpoint `tag` in `directory`, verified (CheckpointError if it is not complete)."""
    path = directory / tag
    if not TAG_RE.match(tag) or not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    info = _inspect(path)
    if info.kind == "legacy":
        return ResumePoint(directory, tag, info.step, None, {}, legacy=True)
    problem = (f"{path / MANIFEST_NAME} is missing (an interrupted save)" if info.kind == "incomplete"
               else _check_point(info, True))
    if problem is not None:
        raise CheckpointError(f"checkpoint {tag} (step {info.step}): {problem}")
    return ResumePoint(directory, tag, info.step, info.lineage, info.meta)
