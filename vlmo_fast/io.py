"""Crash-safe file and directory writes, and integrity manifests.

Every file vlmo_fast writes (weights, configs, tokenizers, logs' pointers, training
checkpoints) goes through here, so a process killed at any moment (SIGKILL, OOM killer,
preemption) leaves either the old state or the new one, never a torn one.

Files: `atomic_write` writes a hidden temporary sibling (`.vlmo-tmp-<name>.*.tmp`), fsyncs
it, renames it over the target (atomic within a filesystem) and fsyncs the directory.

Directories (a checkpoint is several files that must match each other): `atomic_directory`
yields a hidden sibling temporary directory to write into; on leaving the block every file
and directory in it is fsynced and it is swapped in by two renames:

    path -> .vlmo-old-<name>      (only when path exists)
    .vlmo-tmp-<name>.XXXX -> path
    delete .vlmo-old-<name>

Guarantee (single writer): at every instant either `path` is the complete old directory,
or `path` is the complete new one, or (killed between the two renames) `path` is absent and
`.vlmo-old-<name>` is the complete old one. Readers go through `resolve_directory`, which
returns the old copy in that last case, so a reader always sees exactly one complete
directory. The next `atomic_directory` on the same path (or `recover_directory`) puts the
old copy back and deletes what a killed writer left (temporary directories and files).

Integrity: `write_manifest` records every file's size and SHA-256 in `manifest.json`;
`verify_manifest` checks sizes always (cheap: catches truncation) and hashes on request,
raising `CorruptFileError` naming the file.

Multi-writer folders (a DeepSpeed checkpoint, every rank writing its shards): write the tag
folder, barrier, then move a pointer with `atomic_write_text(dir / "latest", tag)` on one
rank; a folder no pointer names is never read. Logs: `append_jsonl` / `read_jsonl` (a killed
append leaves at most a torn last line, which both skip).

Permissions follow the umask as for a plain `open()`/`mkdir()` (files 0666 & ~umask,
directories 0777 & ~umask), not mkstemp's 0600 / mkdtemp's 0700.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]
TMP_PREFIX = ".vlmo-tmp-"
OLD_PREFIX = ".vlmo-old-"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "vlmo_fast.manifest"
MANIFEST_VERSION = 1


class CorruptFileError(ValueError):
    """A file is missing, truncated, unreadable or does not match its recorded hash."""

    def __init__(self, path: PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _umask_mode(base: int = 0o666) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def fsync_directory(directory: PathLike) -> None:
    """Make a rename/creation inside `directory` durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: PathLike, write_fn: Callable[[str], None]) -> Path:
    """Call write_fn(temp_path) to produce the file's content, then atomically put it at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, _umask_mode())
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def remove_stale_temporaries(directory: PathLike) -> int:
    """Delete temporaries a killed writer left in `directory` (files from `atomic_write`,
    directories from `atomic_directory`); returns how many. Assumes no other writer is
    working in `directory` at the same time."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for entry in directory.iterdir():
        if not entry.name.startswith(TMP_PREFIX):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed


# -- whole directories ------------------------------------------------------------------------
_TMP_SUFFIX = re.compile(r"[a-z0-9_]{8}")  # tempfile's random part


def _old_path(path: Path) -> Path:
    return path.parent / f"{OLD_PREFIX}{path.name}"


def _normalise_dir(path: PathLike) -> Path:
    path = Path(path)
    if path.is_symlink():  # swap the directory the link points to, keep the link
        path = path.resolve()
    return Path(os.path.abspath(path))


def resolve_directory(path: PathLike) -> Path:
    """The directory a reader should read for `path`: `path` itself, or its complete old copy
    when a writer was killed between the two renames of a swap. Never modifies anything."""
    path = _normalise_dir(path)
    if not path.exists():
        old = _old_path(path)
        if old.is_dir():
            return old
    return path


def recover_directory(path: PathLike) -> None:
    """Finish or undo what a killed `atomic_directory` writer left around `path`: put the old
    copy back if the swap was interrupted, delete a leftover old copy and the temporaries."""
    path = _normalise_dir(path)
    old = _old_path(path)
    if old.exists():
        if path.exists():  # the swap completed; deleting the old copy was interrupted
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, path)  # interrupted between the renames: the old copy is complete
            fsync_directory(path.parent)
    prefix = f"{TMP_PREFIX}{path.name}."
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            # exactly our temporaries for this name (mkdtemp's 8 random characters), not those
            # of a sibling such as "<name>.v2" that another writer may be filling right now
            if (entry.name.startswith(prefix) and _TMP_SUFFIX.fullmatch(entry.name[len(prefix):])
                    and entry.is_dir() and not entry.is_symlink()):
                shutil.rmtree(entry, ignore_errors=True)
    if path.is_dir():
        remove_stale_temporaries(path)


def _fsync_tree(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                fsync_file(p)
        fsync_directory(dirpath)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem / no hard links: a copy keeps the guarantee
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path, keep: Callable[[str], bool]) -> None:
    """Hard-link the entries of `old` that `keep` names (and `new` lacks) into `new`."""
    for entry in old.iterdir():
        if entry.name.startswith((TMP_PREFIX, OLD_PREFIX)) or not keep(entry.name):
            continue
        target = new / entry.name
        if target.exists() or target.is_symlink():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(target))


@contextlib.contextmanager
def atomic_directory(path: PathLike, keep: Optional[Callable[[str], bool]] = None) -> Iterator[Path]:
    """Replace the directory `path` as a whole with what the block writes into the yielded
    temporary directory (see the module docstring for the guarantee).

    keep(name) -> bool: entries of the existing directory to carry into the new one (hard
    links) when the block did not write that name; by default nothing is carried, the new
    directory is exactly what the block wrote. If the block raises, `path` is untouched.
    """
    path = _normalise_dir(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}."))
    try:
        os.chmod(tmp, _umask_mode(0o777))
        yield tmp
        if keep is not None and path.is_dir():
            _carry_over(path, tmp, keep)
        _fsync_tree(tmp)
        old = _old_path(path)
        moved_old = path.exists()
        if moved_old:
            os.rename(path, old)
            fsync_directory(path.parent)
        try:
            os.rename(tmp, path)
        except BaseException:
            if moved_old and not path.exists():  # e.g. EXDEV/EBUSY: put the old one back now
                os.rename(old, path)
            raise
        fsync_directory(path.parent)
        # the new directory is in place: a failure to delete the old copy is not the caller's
        # (the next save or recover_directory deletes what is left)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- integrity manifests ----------------------------------------------------------------------
def file_sha256(path: PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: PathLike, files: Optional[Iterable[str]] = None,
                   name: str = MANIFEST_NAME, extra: Optional[Dict[str, Any]] = None) -> Path:
    """Record size and SHA-256 of `files` (relative names; default: every regular file at the
    top of `directory` but the manifest and temporaries) in `directory/name`. Write it last:
    a manifest names only files that were complete when it was written."""
    directory = Path(directory)
    if files is None:
        files = sorted(e.name for e in directory.iterdir()
                       if e.is_file() and e.name != name and not e.name.startswith((TMP_PREFIX, OLD_PREFIX)))
    entries = {}
    for rel in files:
        p = directory / rel
        entries[str(rel)] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": entries}
    if extra:
        manifest.update(extra)
    return atomic_write_json(directory / name, manifest)


def read_manifest(directory: PathLike, name: str = MANIFEST_NAME) -> Dict[str, Any]:
    """Parse and check the structure of `directory/name`; CorruptFileError if it is not a
    manifest (FileNotFoundError if absent)."""
    path = Path(directory) / name
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(path, f"not valid JSON ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
            or not isinstance(files, dict)):
        raise CorruptFileError(path, f"not a {MANIFEST_FORMAT} file")
    if manifest.get("version") != MANIFEST_VERSION:
        raise CorruptFileError(path, f"manifest version {manifest.get('version')!r}; this vlmo_fast "
                                     f"reads version {MANIFEST_VERSION}")
    for rel, entry in files.items():
        if (not isinstance(entry, dict) or type(entry.get("bytes")) is not int
                or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64):
            raise CorruptFileError(path, f"malformed entry for {rel!r}")
    return manifest


def verify_manifest(directory: PathLike, verify_hashes: bool = True,
                    name: str = MANIFEST_NAME) -> Dict[str, Any]:
    """Check every file the manifest names: present, recorded size (always) and SHA-256
    (verify_hashes=True). Returns the manifest; raises CorruptFileError naming the file."""
    directory = Path(directory)
    manifest = read_manifest(directory, name)
    verify_files(directory, manifest["files"], verify_hashes=verify_hashes, recorded_in=name)
    return manifest


def verify_files(directory: PathLike, entries: Dict[str, Dict[str, Any]], *, verify_hashes: bool = True,
                 recorded_in: str = MANIFEST_NAME, locate: Optional[Callable[[Path, str], Path]] = None,
                 advice: str = "") -> None:
    """Check files against their recorded {"bytes", "sha256"} entries (a manifest's "files"):
    present, recorded size (always), SHA-256 (verify_hashes=True). `locate(directory, name)`
    turns a name into a path (default directory / name; e.g. a check that it stays inside the
    folder); `advice` is appended to every message. Raises CorruptFileError naming the file."""
    directory = Path(directory)
    tail = f"; {advice}" if advice else ""
    for rel, entry in entries.items():
        p = locate(directory, rel) if locate is not None else directory / rel
        if not p.is_file():
            raise CorruptFileError(p, f"missing (listed in {recorded_in}){tail}")
        size = p.stat().st_size
        if size != entry["bytes"]:
            raise CorruptFileError(p, f"has {size} bytes, {recorded_in} records {entry['bytes']} "
                                      f"(truncated or overwritten){tail}")
        if verify_hashes and file_sha256(p) != entry["sha256"]:
            raise CorruptFileError(p, f"SHA-256 differs from the one recorded in {recorded_in} "
                                      f"(corrupted, or modified after it was written){tail}")


# -- append-only JSON-lines logs ---------------------------------------------------------------
def append_jsonl(path: PathLike, record: Any, fsync: bool = True) -> None:
    """Append one JSON record as a line. A writer killed mid-append leaves at most a torn last
    line: this function cuts such a tail off before appending, `read_jsonl` skips it, so every
    complete line stays readable. fsync=True makes the line durable before returning."""
    path = Path(path)
    line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")  # json escapes newlines
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":  # a torn tail from a killed writer: cut back to the last newline
                pos, keep = end, 0
                while pos > 0:
                    step = min(65536, pos)
                    pos -= step
                    f.seek(pos)
                    cut = f.read(step).rfind(b"\n")
                    if cut >= 0:
                        keep = pos + cut + 1
                        break
                f.truncate(keep)
        f.write(line)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def read_jsonl(path: PathLike) -> list:
    """The records of a JSON-lines file; a torn last line (killed writer) is skipped, a bad line
    elsewhere raises CorruptFileError naming the file and line."""
    raw = Path(path).read_bytes()
    lines = raw.split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if number == len(lines):  # no newline after it: the torn tail of a killed append
                break
            raise CorruptFileError(path, f"line {number} is not valid JSON ({e})") from None
    return records
