"""Atomic file writes: every file vlmo_fast writes (weights, configs, tokenizers, logs'
pointers, training checkpoints) goes through here, so a process killed at any moment leaves
either the old file or the new one, never a torn one.

A file is written to a hidden temporary sibling, flushed and fsynced, then renamed over the
target (rename is atomic within a filesystem) and the directory entry is fsynced. Temporary
files carry the prefix `.vlmo-tmp-` so a later writer can clean up what a killed one left.
New files get the permissions a plain `open()` would give (0666 minus the umask), not
mkstemp's 0600.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

PathLike = Union[str, os.PathLike]
TMP_PREFIX = ".vlmo-tmp-"


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


def atomic_write(path: PathLike, write_fn: Callable[[str], None]) -> Path:
    """Call write_fn(temp_path) to produce the file's content, then atomically put it at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, _umask_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
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
    """Delete temporaries a killed writer left in `directory`; returns how many."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for entry in directory.iterdir():
        if entry.name.startswith(TMP_PREFIX) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed += 1
    return removed
