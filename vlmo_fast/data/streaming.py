"""Streaming WebDataset / img2dataset shards: no index before the first step.

The indexed tar reader (`formats.read_tar_shards`) scans every member header of every shard
before training starts, so its startup grows with the dataset and it reads only local files.
This reader opens a shard only when a worker reaches it and reads it front to back, so startup
costs the same for 10 shards or 100,000, and a shard may come from anywhere a byte stream
comes from:

- local paths, brace patterns (`data/{00000..41455}.tar`, `{a,b}`; several patterns joined
  with `::`), globs and folders of .tar files (local only);
- `pipe:COMMAND` (the command writes the shard to stdout, e.g. `pipe:aws s3 cp s3://b/x.tar -`;
  a non-zero exit is a broken shard);
- fsspec URLs: `file://`, `s3://` (needs s3fs), `gs://` (gcsfs), `https://` (aiohttp), ...

Samples are WebDataset's: consecutive members sharing a key (the name up to the first dot of
its file name), `{key}.jpg|jpeg|png|webp` + `{key}.txt` and/or `{key}.json` (the caption is the
txt member, else `caption_key` or "text" of the json), as img2dataset writes them. The tar
stream, URL opening (`pipe:`) and key grouping are the `webdataset` package's
(`webdataset.gopen`, `webdataset.tariterators`); its `WebDataset` pipeline is not used because
its position cannot be saved and restored exactly, which is what this module adds around them.

Sharding. An epoch's shard order is one permutation of the shard list drawn from (seed, epoch)
(the list's own order with shuffle=False), the same on every rank. There are
G = world x streams_per_rank streams (streams_per_rank = max(1, num_workers): each DataLoader
worker reads one stream); stream g = rank * streams_per_rank + worker reads the shards at
positions g, g + G, g + 2G, ... of that order. No shard is read by two streams, and every
sample is read once per epoch. When the number of shards is not a multiple of G, the first
(n mod G) streams read one shard more; with drop_last=True every stream reads n // G shards
and the (n mod G) last shards of that epoch's order are left out (other ones each epoch when
shuffling). Fewer shards than streams is an error (a stream with nothing to read would leave
its rank without batches). Shards may hold different numbers of samples, so ranks may get
different numbers of batches per epoch; the training loop counts steps, not epochs, so each
rank simply starts its next epoch when its own ends.

Order inside a stream. A shard is read in blocks of `shuffle_block` consecutive samples; each
block is permuted by a generator seeded with (seed, epoch, shard, block) (WebDataset's
shuffle buffer, made reproducible). A worker builds whole batches from its own stream; the
loader hands out the workers' batches round-robin by stream (streams that have ended are
passed over), whatever order the worker processes deliver them in.

Exact resume. `state_dict()` is (epoch, for every stream of this rank: (position in its shard
list, samples of that shard already consumed in the permuted order), the stream whose batch
comes next) plus the bad-sample counters. `load_state_dict` reopens each stream's shard, skips
the consumed whole blocks without decoding them (a stream cannot seek), re-reads and permutes
the current block and continues: the next batches equal the uninterrupted run's. Each rank
keeps its own state (the training checkpoint stores one per rank); a state from another rank,
another worker count or other shards is refused.

Keys. A sample's key is (epoch * num_shards + shard) * 2**24 + its index in the shard's file
order: unique per epoch, it seeds the sample's crop and the batch's masks as for the indexed
sources; `image_ids` / `caption_ids` are shard * 2**24 + index (the same every epoch).

Bad data, counted under the loaders' shared limit (`loader.BadSampleLimit`): a sample with a
missing member (no image, no caption), an image that cannot be decoded (transforms.py), a
caption member that is not UTF-8 or JSON, or a caption field of the wrong type is skipped and
counted; in a stream the per-sample rule covers the typed-field errors too, and the
too-many-bad stop lists them. A shard that cannot be opened or stops early (missing file,
truncated or corrupt tar, failed `pipe:` command) ends that shard; the samples it lost count
as skipped: its img2dataset count (`{shard}_stats.json` "successes", else the rows with
status "success" of `{shard}.parquet` when pyarrow is installed; never required) minus the
samples read, else the mean size of the shards read whole so far minus the samples read (at
least 1), else 1. The limit's denominator, the samples this rank reads per epoch, is not known
before reading; it is estimated as (this rank's shards this epoch) x (that mean shard size),
and the check waits until the first shard has been read whole (at the latest, the end of the
epoch, against the samples it tried).
"""
from __future__ import annotations

import glob
import hashlib
import importlib
import json
import logging
import re
import tarfile
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .datasets import STAGES, item_rng
from .formats import IMAGE_EXTENSIONS, DataError, decode_text, tar_sample_caption
from .loader import BadSampleLimit, _worker_init
from .transforms import ImageTransform

log = logging.getLogger(__name__)

WEBDATASET_REQUIREMENT = "webdataset>=1.0"
WEBDATASET_MISSING = (f"streaming shards needs the webdataset package ({WEBDATASET_REQUIREMENT}): "
                      f"pip install 'vlmo_fast[train]' (or pip install '{WEBDATASET_REQUIREMENT}')")
KEY_SHARD_STRIDE = 1 << 24         # samples per shard a key can tell apart
DEFAULT_SHUFFLE_BLOCK = 1000       # WebDataset's usual shuffle buffer
# auto choice: local shard sets up to this many go to the indexed reader (random access, a true
# global shuffle, per-rank batches of equal count); above, its up-front scan costs more than it
# gives: it grows with the members (~4 s per 1,000 shards of 16 samples here,
# benchmarks/results/data-streaming-cpu.md), so an img2dataset shard of 10,000 samples takes
# seconds, 16 of them most of a minute, before the first step
INDEXED_MAX_SHARDS = 16
STREAM_OPTIONS = ("caption_key", "require_caption", "skip_bad", "max_image_pixels", "scale", "shuffle_block")
_IMAGE_EXTS = tuple(e[1:] for e in IMAGE_EXTENSIONS)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
# what reading a shard's bytes can raise: missing / unreadable files, failed pipe commands
# (OSError), truncated or corrupt archives, duplicate member names in one sample (ValueError)
_SHARD_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError, zlib.error)


def _webdataset():
    """(webdataset.gopen, webdataset.tariterators), or ImportError naming the extra."""
    try:
        # the modules, not the package's re-exported functions of the same names
        gopen = importlib.import_module("webdataset.gopen")
        tariterators = importlib.import_module("webdataset.tariterators")
    except ImportError as e:
        raise ImportError(WEBDATASET_MISSING) from e
    return gopen, tariterators


# -- shard lists ------------------------------------------------------------------------------
def is_stream_url(spec) -> bool:
    """True for `pipe:` commands and URLs with a scheme (file://, s3://, https://, ...): sources
    only the streaming reader reads."""
    spec = str(spec)
    return spec.startswith("pipe:") or bool(_URL.match(spec))


def _is_local(url: str) -> bool:
    return not is_stream_url(url)


def expand_shard_urls(spec) -> List[str]:
    """Shard URLs of a spec: `::`-joined parts, each brace-expanded (`{000..009}`, `{a,b}`,
    with the braceexpand package WebDataset uses); a local part may also be a glob (sorted) or
    a folder (its *.tar files, sorted). Nothing is opened."""
    _webdataset()
    from braceexpand import braceexpand
    urls: List[str] = []
    for part in str(spec).split("::"):
        part = part.strip()
        if not part:
            continue
        local = _is_local(part)
        if not local and not part.startswith("pipe:") and "*" in part:
            raise ValueError(f"{part}: glob patterns work for local paths only; list remote shards with a brace "
                             f"pattern such as s3://bucket/data-{{0000..0999}}.tar")
        if local and "{" not in part and Path(part).is_dir():
            found = sorted(str(p) for p in Path(part).glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"{part}: a folder without .tar shards")
            urls.extend(found)
        elif local and any(ch in part for ch in "*?["):
            for pattern in braceexpand(part):
                found = sorted(glob.glob(pattern))
                if not found:
                    raise FileNotFoundError(f"no shards match {pattern}")
                urls.extend(found)
        else:
            # names only: no file system call per shard, so startup does not grow with the dataset
            urls.extend(braceexpand(part))
    if not urls:
        raise FileNotFoundError(f"no shards in {spec!r}")
    return urls


def _protocol(url: str) -> Optional[str]:
    """fsspec protocol of a URL (None for local paths and pipe: commands)."""
    if url.startswith("pipe:") or not _URL.match(url):
        return None
    return url.split("://", 1)[0].lower()


def check_shard_urls(urls: Sequence[str], spec) -> None:
    """Startup checks that cost the same for any number of shards: the first local shard
    exists (a mistyped pattern fails here, not as a run of missing shards), each URL protocol
    has its fsspec implementation installed, `pipe:` is allowed."""
    first = urls[0]
    if _is_local(first) and not Path(first).is_file():
        raise FileNotFoundError(f"shard {first} (the first of {spec}) does not exist")
    import fsspec
    # the protocols of the spec's `::` parts: a brace pattern does not change its scheme
    parts = [p.strip() for p in str(spec).split("::") if p.strip()]
    for proto in sorted({p for p in (_protocol(u) for u in parts) if p is not None}):
        example = next(u for u in parts if _protocol(u) == proto)
        try:
            fsspec.get_filesystem_class(proto)
        except (ImportError, ValueError) as e:
            raise ImportError(f"{example}: cannot read {proto}:// URLs ({e}); install the fsspec "
                              f"implementation for {proto}, or stream it through pipe:COMMAND") from None
    if any(u.startswith("pipe:") for u in parts):
        from webdataset import utils
        if utils.enforce_security:
            raise ValueError(f"{spec}: pipe: shards are disabled by WDS_SECURE=1 (webdataset's safe mode)")


def open_shard(url: str):
    """A binary stream of the shard: a local file, a `pipe:` command's stdout (webdataset's
    Pipe: a non-zero exit raises OSError), or an fsspec URL."""
    if url.startswith("pipe:"):
        gopen, _ = _webdataset()
        return gopen.gopen(url, "rb")
    if _is_local(url):
        return open(url, "rb")
    import fsspec
    return fsspec.open(url, "rb").open()


def _read_small(url: str) -> bytes:
    if _is_local(url):
        return Path(url).read_bytes()
    import fsspec
    with fsspec.open(url, "rb") as f:
        return f.read()


def img2dataset_count(url: str) -> Optional[int]:
    """Samples img2dataset wrote to this shard: "successes" of `{shard}_stats.json`, else the
    rows with status "success" of `{shard}.parquet` (needs pyarrow); None when neither can be
    read (they are never required)."""
    if url.startswith("pipe:") or not url.endswith(".tar"):
        return None
    stem = url[:-len(".tar")]
    try:
        stats = json.loads(_read_small(stem + "_stats.json"))
        count = stats.get("successes") if isinstance(stats, dict) else None
        if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
            return count
    except (OSError, ValueError):
        pass
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    try:
        if _is_local(stem + ".parquet"):
            table = pq.read_table(stem + ".parquet", columns=["status"])
        else:
            import fsspec
            with fsspec.open(stem + ".parquet", "rb") as f:
                table = pq.read_table(f, columns=["status"])
        return sum(1 for s in table.column("status").to_pylist() if s == "success")
    except (OSError, ValueError, KeyError):
        return None


def _reason(e: BaseException) -> str:
    """One line for a shard read error (webdataset appends ' @ <stream>' to messages; a
    failed pipe: command says its exit status)."""
    if isinstance(e, PipeCommandFailed):
        return str(e)
    text = " ".join(str(e.args[0] if e.args else e).split())
    text = text.split(" @ ")[0]
    m = re.search(r": exit (\d+) \(read\)", text)
    if m:
        return f"the command exited with status {m.group(1)}"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def iter_raw_samples(url: str) -> Iterator[dict]:
    """The shard's samples in file order, as WebDataset groups them: {"__key__", ext: bytes}.
    Raises what the stream raises (see _SHARD_ERRORS), including a pipe: command's failure
    found only when it is closed."""
    _, tariterators = _webdataset()
    stream = open_shard(url)
    try:
        files = ({**f, "__url__": url} for f in tariterators.tar_file_iterator(stream))
        yield from tariterators.group_by_keys(files)
    except Exception as e:
        # a pipe: command that failed usually shows first as an empty or cut-off archive; its exit
        # status is the real reason (SIGPIPE after we stop reading is not)
        status = _close_quietly(stream)
        if isinstance(status, int) and status > 0 and status != 141:
            raise PipeCommandFailed(f"the command exited with status {status}") from e
        raise
    except BaseException:   # the consumer stopped early
        _close_quietly(stream)
        raise
    stream.close()


class PipeCommandFailed(OSError):
    """A `pipe:` shard's command exited with an error."""


def _close_quietly(stream) -> Optional[int]:
    """Close a shard stream, ignoring errors; a pipe's exit status (None for files)."""
    try:
        stream.close()
    except Exception:
        pass
    return getattr(stream, "status", None)


@dataclass(frozen=True)
class MemberBytes:
    """An image member read from a stream: its bytes in memory, named for errors (the
    transforms read any object with read_bytes() and a str(), as ImageRef)."""
    where: str
    data: bytes = field(repr=False)

    def read_bytes(self) -> bytes:
        return self.data

    def __str__(self) -> str:
        return self.where


# -- reading (in the workers) -------------------------------------------------------------------
class ShardStreams:
    """What every worker needs to turn shards into items: the shard list, the stage, the
    transform and the caption rules; `stream_shards` (which shards a stream reads in an
    epoch) and `envelopes` (one stream's batches with their positions)."""

    def __init__(self, urls: Sequence[str], stage: str, *, img_size: int = 224, seed: int = 0,
                 shuffle: bool = True, flip: bool = False, scale: Tuple[float, float] = (0.5, 1.0),
                 caption_key: str = "caption", require_caption: bool = True, skip_bad: bool = True,
                 max_image_pixels: Optional[int] = None, shuffle_block: int = DEFAULT_SHUFFLE_BLOCK):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if isinstance(shuffle_block, bool) or not isinstance(shuffle_block, int) or shuffle_block < 1:
            raise ValueError(f"shuffle_block must be a whole number of samples >= 1, got {shuffle_block!r}")
        self.urls = list(urls)
        self.stage, self.seed, self.shuffle = stage, int(seed), bool(shuffle)
        self.caption_key, self.skip_bad, self.shuffle_block = caption_key, bool(skip_bad), shuffle_block
        self.needs_caption = stage == "text" or (stage == "vl" and require_caption)
        self.transform = (ImageTransform(img_size, True, flip=flip, scale=scale, max_pixels=max_image_pixels)
                          if stage != "text" else None)

    @property
    def num_shards(self) -> int:
        return len(self.urls)

    def shard_order(self, epoch: int) -> np.ndarray:
        n = self.num_shards
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, int(epoch), 0x5348]).permutation(n)

    def stream_shards(self, epoch: int, stream: int, streams: int, drop_last: bool) -> List[int]:
        """Shard ids global stream `stream` of `streams` reads in `epoch`, in order."""
        order = self.shard_order(epoch)
        if drop_last:
            order = order[:len(order) - len(order) % streams]
        return order[stream::streams].tolist()

    # -- one shard -----------------------------------------------------------------------------
    def _block_order(self, epoch: int, shard: int, block: int, n: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, int(epoch), int(shard), int(block), 0x424C]).permutation(n)

    def read_shard(self, epoch: int, shard: int, start: int):
        """(kind, payload, end) for the positions `start`, start + 1, ... of the shard in its
        block-permuted order: kind "item" (payload the item), "bad" (its error) or "fatal";
        `end` is None, or on the shard's last position ("done", shard, samples) /
        ("broken", shard, samples read, img2dataset count, url, reason). A shard with no
        position left gives one ("end", None, end)."""
        url, B = self.urls[shard], self.shuffle_block
        raw = iter_raw_samples(url)
        read, error = 0, None
        ahead: List[dict] = []

        def take(n: int) -> List[dict]:
            nonlocal read, error
            out: List[dict] = []
            while error is None and len(out) < n:
                try:
                    out.append(next(raw))
                except StopIteration:
                    break
                except _SHARD_ERRORS as e:
                    error = _reason(e)
                    break
                read += 1
            return out

        def next_block() -> Tuple[List[dict], bool]:
            nonlocal ahead
            block = ahead + take(B - len(ahead))
            ahead = take(1) if len(block) == B else []   # one sample ahead: is this block the last?
            return block, not ahead

        def end_info():
            if error is None:
                return ("done", shard, read)
            return ("broken", shard, read, img2dataset_count(url), url, error)

        first_block, skip = divmod(int(start), B)
        last = False
        for _ in range(first_block):   # consumed whole blocks: read, not decoded
            block, last = next_block()
            if last:
                break
        if last:
            yield "end", None, end_info()
            return
        b = first_block
        while True:
            block, last = next_block()
            n = len(block)
            if read > KEY_SHARD_STRIDE:
                yield "fatal", f"{url}: more than {KEY_SHARD_STRIDE:,} samples in one shard; split it", None
                return
            order = self._block_order(epoch, shard, b, n)
            for j in range(skip, n):
                end = end_info() if last and j == n - 1 else None
                index = b * B + int(order[j])
                try:
                    yield "item", self.decode(block[order[j]], url, epoch, shard, index), end
                except DataError as e:
                    yield "bad", str(e), end
            if last:
                if skip >= n:
                    yield "end", None, end_info()
                return
            b, skip = b + 1, 0

    def decode(self, raw: dict, url: str, epoch: int, shard: int, index: int) -> dict:
        """A raw WebDataset sample -> a pretraining item (DataError naming shard and sample when
        a member is missing or unreadable)."""
        name = raw.get("__key__", "?")
        origin = f"{url} sample {name!r}"
        key = (epoch * self.num_shards + shard) * KEY_SHARD_STRIDE + index
        item = {"key": key}
        caption = None
        if self.stage != "vision":
            txt = decode_text(raw["txt"], f"{url} member {name}.txt") if "txt" in raw else None
            js = decode_text(raw["json"], f"{url} member {name}.json") if "json" in raw else None
            caption = tar_sample_caption(txt, js, origin, self.caption_key)
            if self.needs_caption and not caption:
                raise DataError(f"{origin}: no caption (.txt member or {self.caption_key!r} in .json) "
                                f"or an empty one")
        if self.stage == "text":
            item["text"] = caption
            return item
        ext = next((e for e in _IMAGE_EXTS if e in raw), None)
        if ext is None:
            raise DataError(f"{origin}: no image member (.jpg/.png/.webp); members: "
                            f"{sorted(k for k in raw if not k.startswith('__'))}")
        image = MemberBytes(f"{url} member {name}.{ext}", raw[ext])
        item["image"], caption = self.transform.load(image, origin, item_rng(self.seed, key, 2), caption)
        if self.stage == "vl":
            item.update(text=caption, image_id=shard * KEY_SHARD_STRIDE + index,
                        caption_id=shard * KEY_SHARD_STRIDE + index)
        return item

    # -- one stream ----------------------------------------------------------------------------
    def envelopes(self, stream: int, epoch: int, shards: List[int], position: Tuple[int, int], collate_fn,
                  batch_size: int, drop_last: bool) -> Iterator[dict]:
        """One stream's batches from `position` = (index into `shards`, offset), each in an
        envelope {"stream", "batch", "position" after it, "bad" (errors of the samples skipped
        since the previous envelope), "events" (shards finished or broken meanwhile)}; the last
        envelope has batch None (the stream's end); {"stream", "fatal"} stops the loader."""
        pos, offset = int(position[0]), int(position[1])
        items: List[dict] = []
        bad: List[str] = []
        events: List[tuple] = []

        def envelope(batch):
            return {"stream": stream, "batch": batch, "position": (pos, offset), "bad": bad, "events": events}

        while pos < len(shards):
            for kind, payload, end in self.read_shard(epoch, shards[pos], offset):
                if kind == "fatal" or (kind == "bad" and not self.skip_bad):
                    yield {"stream": stream, "fatal": payload}
                    return
                if kind == "item":
                    items.append(payload)
                elif kind == "bad":
                    bad.append(payload)
                offset += kind != "end"
                if end is not None:
                    events.append(end)
                    pos, offset = pos + 1, 0
                if len(items) == batch_size:
                    yield envelope(collate_fn(items))
                    items, bad, events = [], [], []
        if items and not drop_last:
            yield envelope(collate_fn(items))
            items, bad, events = [], [], []
        yield envelope(None)


class _EpochStreams(IterableDataset):
    """This rank's streams from their positions: DataLoader worker w reads stream w (in the
    main process, the only stream)."""

    def __init__(self, source: ShardStreams, epoch: int, plans: List[Tuple[List[int], Tuple[int, int]]],
                 collate_fn, batch_size: int, drop_last: bool):
        self.source, self.epoch, self.plans = source, epoch, plans
        self.collate_fn, self.batch_size, self.drop_last = collate_fn, batch_size, drop_last

    def __iter__(self):
        info = get_worker_info()
        stream = 0 if info is None else info.id
        shards, position = self.plans[stream]
        return self.source.envelopes(stream, self.epoch, shards, position, self.collate_fn, self.batch_size,
                                     self.drop_last)


def _envelope_as_is(envelope):
    return envelope


# -- the loader (main process) ------------------------------------------------------------------
class StreamingLoader(BadSampleLimit):
    """The streaming counterpart of `loader.Loader`: iterate for this rank's batches of the
    current epoch; set_epoch / state_dict / load_state_dict; num_skipped, epoch_skipped,
    epoch_bad_samples and the max_bad_fraction stop as there. It has no len() (the epoch's size
    is not known without reading the shards). Worker processes are started per pass over the
    data (not persistent: each pass starts the workers at the loader's positions)."""

    def __init__(self, source: ShardStreams, collate_fn, batch_size: int, *, rank: int = 0, world: int = 1,
                 drop_last: bool = False, num_workers: int = 0, pin_memory: Optional[bool] = None,
                 prefetch_factor: Optional[int] = None, max_bad_fraction: float = 0.01, description: str = "",
                 spec: str = ""):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world) and world >= 1, got rank={rank} world={world}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.source, self.collate_fn, self.batch_size = source, collate_fn, int(batch_size)
        self.rank, self.world, self.drop_last = int(rank), int(world), bool(drop_last)
        self.num_workers = int(num_workers)
        self.streams_per_rank = max(1, self.num_workers)
        total = self.world * self.streams_per_rank
        if source.num_shards < total:
            raise ValueError(f"{spec or 'shards'}: {source.num_shards} shards cannot feed {self.world} ranks x "
                             f"{self.streams_per_rank} streams = {total} (each stream, one per data worker, reads "
                             f"its own shards); use fewer workers or ranks, more shards, or the indexed reader "
                             f"(stream=False) for a small local dataset")
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.prefetch_factor = prefetch_factor
        self._init_bad_limit(max_bad_fraction, description)
        self.shards_sha256 = hashlib.sha256("\n".join(source.urls).encode("utf-8")).hexdigest()[:16]
        self.shard_sizes = [0, 0]      # samples in, and number of, the shards whose size is known
        self._generation = 0           # bumped by set_epoch / load_state_dict: a running pass stops
        self._start_epoch(0)

    # -- position --------------------------------------------------------------------------
    def _start_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.positions = [[0, 0] for _ in range(self.streams_per_rank)]
        self.turn = 0
        self.batch_index = 0         # batches handed out in this epoch
        self.epoch_attempted = 0     # samples read (good, bad, lost) in this epoch
        self._epoch_over = False
        self._generation += 1

    def _global_stream(self, s: int) -> int:
        return self.rank * self.streams_per_rank + s

    def _stream_shards(self, epoch: int, s: int) -> List[int]:
        return self.source.stream_shards(epoch, self._global_stream(s), self.world * self.streams_per_rank,
                                         self.drop_last)

    def _stream_length(self, s: int) -> int:
        n, total = self.source.num_shards, self.world * self.streams_per_rank
        if self.drop_last:
            return n // total
        return len(range(self._global_stream(s), n, total))

    def _ended(self, s: int) -> bool:
        return self.positions[s][0] >= self._stream_length(s)

    def _next_active(self, start: int) -> Optional[int]:
        for k in range(self.streams_per_rank):
            s = (start + k) % self.streams_per_rank
            if not self._ended(s):
                return s
        return None

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of `epoch` (a no-op when already inside it, as Loader.set_epoch)."""
        if int(epoch) != self.epoch:
            self._start_epoch(epoch)

    def state_dict(self) -> dict:
        return {"kind": "stream", "epoch": self.epoch, "batch_index": self.batch_index,
                "streams": [list(p) for p in self.positions], "turn": self.turn,
                "seed": self.source.seed, "num_shards": self.source.num_shards,
                "shards_sha256": self.shards_sha256, "batch_size": self.batch_size, "rank": self.rank,
                "world": self.world, "streams_per_rank": self.streams_per_rank, "shuffle": self.source.shuffle,
                "shuffle_block": self.source.shuffle_block, "drop_last": self.drop_last,
                "stage": self.source.stage, "shard_sizes": list(self.shard_sizes),
                "epoch_attempted": self.epoch_attempted, **self._bad_state(), "description": self.description}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "stream":
            raise ValueError("loader state_dict is the position of an indexed loader (a manifest, folder or "
                             "indexed .tar source); this loader streams shards: resume with the same data "
                             "source, or start the data position afresh")
        here = {"seed": self.source.seed, "num_shards": self.source.num_shards,
                "shards_sha256": self.shards_sha256, "batch_size": self.batch_size, "rank": self.rank,
                "world": self.world, "streams_per_rank": self.streams_per_rank, "shuffle": self.source.shuffle,
                "shuffle_block": self.source.shuffle_block, "drop_last": self.drop_last,
                "stage": self.source.stage}
        hints = {"streams_per_rank": " (one stream per data worker: resume with the same number of workers)",
                 "rank": " (each rank resumes from its own state)",
                 "shards_sha256": " (the shard list changed)"}
        for name, value in here.items():
            if name in state and state[name] != value:
                raise ValueError(f"loader state_dict does not match this loader: {name}={state[name]!r} in the "
                                 f"state, {value!r} here{hints.get(name, '')}; resume with the same data settings, "
                                 f"or start the data position afresh")
        streams = state["streams"]
        if len(streams) != self.streams_per_rank:
            raise ValueError(f"loader state_dict: {len(streams)} stream positions for {self.streams_per_rank} streams")
        self._start_epoch(int(state["epoch"]))
        for s, (pos, offset) in enumerate(streams):
            if not (0 <= int(pos) <= self._stream_length(s) and int(offset) >= 0):
                raise ValueError(f"loader state_dict: stream {s} position ({pos}, {offset}) outside its "
                                 f"{self._stream_length(s)} shards")
            self.positions[s] = [int(pos), int(offset)]
        self.turn = int(state.get("turn", 0)) % self.streams_per_rank
        self.batch_index = int(state.get("batch_index", 0))
        self.epoch_attempted = int(state.get("epoch_attempted", 0))
        self.shard_sizes = [int(x) for x in state.get("shard_sizes", (0, 0))]
        started = self.batch_index > 0 or any(p != [0, 0] for p in self.positions)
        self._load_bad_state(state, mid_epoch=started)

    def __len__(self) -> int:
        raise TypeError("a streaming loader has no length: the number of samples is not known before the shards "
                        "are read (train for a number of steps)")

    # -- the bad-sample limit ---------------------------------------------------------------------
    def _mean_shard_size(self) -> Optional[float]:
        total, count = self.shard_sizes
        return total / count if count else None

    def _rank_epoch_samples(self) -> Optional[int]:
        mean = self._mean_shard_size()
        if mean is None:
            return self.epoch_attempted if self._epoch_over else None
        shards = sum(self._stream_length(s) for s in range(self.streams_per_rank))
        return max(int(round(mean * shards)), self.epoch_attempted)

    def _rank_epoch_samples_phrase(self, n: int) -> str:
        return (f"the ~{n} samples this rank reads per epoch (estimated: its shards x the mean shard size "
                f"read so far)")

    def _apply_events(self, events) -> Tuple[int, List[str]]:
        """(samples lost, their messages) of finished / broken shards; updates the known sizes."""
        lost_total, messages = 0, []
        for event in events:
            if event[0] == "done":
                self.shard_sizes[0] += event[2]
                self.shard_sizes[1] += 1
                continue
            _, shard, read, known, url, reason = event
            mean = self._mean_shard_size()
            if known is not None:
                lost, basis = max(known - read, 0), f"img2dataset counted {known}"
                self.shard_sizes[0] += known
                self.shard_sizes[1] += 1
            elif mean is not None:
                lost, basis = max(int(round(mean)) - read, 1), f"estimated from the mean shard size {mean:.0f}"
            else:
                lost, basis = 1, "its size is unknown: counted as 1"
            message = f"{url}: shard unreadable after {read} samples ({reason}); {lost} samples lost ({basis})"
            log.warning("skipping the rest of a shard: %s", message)
            self.epoch_attempted += lost
            lost_total += lost
            if lost:
                messages.append(message)
        return lost_total, messages

    # -- iteration -------------------------------------------------------------------------
    def _envelopes(self):
        plans = [(self._stream_shards(self.epoch, s), tuple(self.positions[s])) for s in range(self.streams_per_rank)]
        dataset = _EpochStreams(self.source, self.epoch, plans, self.collate_fn, self.batch_size, self.drop_last)
        if self.num_workers == 0:
            return iter(dataset), None
        extra = {} if self.prefetch_factor is None else {"prefetch_factor": self.prefetch_factor}
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_envelope_as_is,
                            pin_memory=self.pin_memory, worker_init_fn=_worker_init, persistent_workers=False,
                            **extra)
        it = iter(loader)
        return it, it

    def __iter__(self) -> Iterator[dict]:
        if self._next_active(0) is None:       # the epoch is over: the next one starts
            self._start_epoch(self.epoch + 1)
        if self.batch_index == 0 and all(p == [0, 0] for p in self.positions):
            self._reset_epoch_bad()
        generation, epoch = self._generation, self.epoch
        source, workers = self._envelopes()
        pending: Dict[int, deque] = {s: deque() for s in range(self.streams_per_rank)}
        try:
            while True:
                s = self._next_active(self.turn)
                if s is None:
                    break
                while not pending[s]:
                    try:
                        envelope = next(source)
                    except StopIteration:
                        raise RuntimeError(f"{self.description or 'streaming loader'}: stream {s} ended without "
                                           f"its end marker") from None
                    pending[envelope["stream"]].append(envelope)
                envelope = pending[s].popleft()
                if "fatal" in envelope:
                    raise DataError(envelope["fatal"])
                self.positions[s] = list(envelope["position"])
                self.turn = (s + 1) % self.streams_per_rank
                lost, messages = self._apply_events(envelope["events"])
                for message in envelope["bad"]:
                    log.warning("skipping unreadable sample: %s", message)
                errors = list(envelope["bad"]) + messages
                skipped = len(envelope["bad"]) + lost
                batch = envelope["batch"]
                if batch is None:
                    self.positions[s][0] = self._stream_length(s)
                else:
                    self.batch_index += 1
                    self.epoch_attempted += len(batch["keys"])
                    batch.pop("skipped_samples", None)
                    batch["num_skipped"] = torch.tensor(skipped, dtype=torch.long)
                self.epoch_attempted += len(envelope["bad"])
                if skipped:
                    self._count_skipped(skipped, errors)
                else:
                    self._check_bad_limit()
                if batch is not None:
                    yield batch
                    if self._generation != generation:   # set_epoch() / load_state_dict() meanwhile
                        return
        finally:
            del source, workers
        self._epoch_over = True
        self._check_bad_limit()
        if self.batch_index == 0:
            raise DataError(f"{self.description or 'streaming loader'}: no readable sample in this rank's "
                            f"shards in epoch {epoch}" + "".join(f"\n  {e}" for e in self.epoch_bad_samples))
        if self.epoch_skipped:
            log.warning("%s: %d unreadable samples skipped in epoch %d (%d in all epochs)",
                        self.description or "streaming loader", self.epoch_skipped, epoch, self.num_skipped)


def build_streaming_loader(spec, stage: str, collate_fn, batch_size: int, *, rank: int = 0, world: int = 1,
                           seed: int = 0, img_size: int = 224, shuffle: bool = True, drop_last: bool = False,
                           num_workers: int = 0, pin_memory: Optional[bool] = None, max_bad_fraction: float = 0.01,
                           flip: bool = False, num_samples: Optional[int] = None, **options) -> StreamingLoader:
    """A StreamingLoader over the shards of `spec` (module docstring). options: caption_key,
    require_caption, skip_bad, max_image_pixels, scale, shuffle_block."""
    unknown = sorted(set(options) - set(STREAM_OPTIONS))
    if unknown:
        raise TypeError(f"{spec}: options {unknown} do not apply to streaming shards (they take "
                        f"{', '.join(STREAM_OPTIONS)})")
    if num_samples is not None:
        raise ValueError(f"{spec}: num_samples does not apply to streaming shards (their size is not read up "
                         f"front); select fewer shards with the pattern instead")
    urls = expand_shard_urls(spec)
    check_shard_urls(urls, spec)
    source = ShardStreams(urls, stage, img_size=img_size, seed=seed, shuffle=shuffle, flip=flip, **options)
    description = f"{spec} stage {stage} (streaming {len(urls)} shards)"
    return StreamingLoader(source, collate_fn, batch_size, rank=rank, world=world, drop_last=drop_last,
                           num_workers=num_workers, pin_memory=pin_memory, max_bad_fraction=max_bad_fraction,
                           description=description, spec=str(spec))
