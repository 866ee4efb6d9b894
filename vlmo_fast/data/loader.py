"""Loaders: rank-sharded, resumable batch sampling over map-style datasets, wrapped in a
torch DataLoader (workers, pinned memory on CUDA, persistent workers).

Sharding: each epoch draws one permutation of the whole dataset from (seed, epoch), the same
on every rank; rank r takes positions r, r + world, r + 2 world, ... So ranks never overlap,
and with drop_last=False their union is the whole epoch, every sample once. (When
len(dataset) % world != 0 the first ranks get one sample more; pass drop_last=True to give
every rank the same number of full batches, as a multi-rank trainer needs.)

Resume: the loader counts the batches it has handed out; `state_dict()` stores that position
(epoch, batch index) with what defines the sample order (seed, dataset size, batch size,
rank, world), and `load_state_dict` continues from exactly the next batch: keys and masks of
every later batch are the ones the uninterrupted run would have produced.
"""
from __future__ import annotations

import abc
import logging
from typing import Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .formats import DataError

log = logging.getLogger(__name__)
_MAX_LISTED = 20   # unreadable samples a loader remembers per epoch, to name them when it stops


class ShardedBatchSampler(Sampler):
    """Batches of keys (epoch * N + index) of this rank's shard, from `start_batch` on."""

    def __init__(self, num_samples: int, batch_size: int, *, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world) and world >= 1, got rank={rank} world={world}")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.rank, self.world, self.seed = int(rank), int(world), int(seed)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.epoch = 0
        self.start_batch = 0
        if self.drop_last and len(self) == 0:
            raise ValueError(f"drop_last=True with {num_samples} samples over world={world} ranks leaves "
                             f"no full batch of {batch_size}")
        if not self.drop_last and self.world > 1 and self.num_samples % self.world and self.rank == 0:
            log.warning("%d samples do not split evenly over %d ranks: the first %d ranks read one sample more "
                        "per epoch, so their last batches differ in size (or number); collective ops over "
                        "batches need drop_last=True", self.num_samples, self.world, self.num_samples % self.world)

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's indices for `epoch`, in order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, int(epoch), 0x5A4D]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        if self.drop_last:
            per_rank = (self.num_samples // self.world) // self.batch_size * self.batch_size
            return order[self.rank::self.world][:per_rank]
        return order[self.rank::self.world]

    def __len__(self) -> int:
        per_rank = self.num_samples // self.world
        if self.drop_last:
            return per_rank // self.batch_size
        per_rank += int(self.rank < self.num_samples % self.world)
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[List[int]]:
        epoch, start = self.epoch, self.start_batch
        keys = self.shard(epoch).astype(np.int64) + epoch * self.num_samples
        for b in range(start, len(self)):
            yield keys[b * self.batch_size:(b + 1) * self.batch_size].tolist()


class BadSampleLimit(abc.ABC):
    """The skip-and-count machinery every loader shares: unreadable samples are counted per
    epoch (`num_skipped`, `epoch_skipped`, the first errors in `epoch_bad_samples`), and past
    `max_bad_fraction` of the samples this rank reads per epoch the loader stops with a
    TooManyBadSamples that lists them. Subclasses say how many samples that is
    (`_rank_epoch_samples`; None while a streaming loader does not know it yet: the check
    then waits until it does) and which epoch they are in (`epoch`)."""

    def _init_bad_limit(self, max_bad_fraction: float, description: str) -> None:
        self.max_bad_fraction = float(max_bad_fraction)
        self.description = description
        self.num_skipped = 0          # unreadable samples skipped so far (this rank, all epochs)
        self.epoch_skipped = 0        # ... in the current epoch (what max_bad_fraction limits)
        self.epoch_bad_samples: List[str] = []   # their errors (file, reason, record), the first _MAX_LISTED

    def _reset_epoch_bad(self) -> None:
        self.epoch_skipped = 0
        self.epoch_bad_samples = []

    def _bad_state(self) -> dict:
        return {"num_skipped": self.num_skipped, "epoch_skipped": self.epoch_skipped,
                "epoch_bad_samples": list(self.epoch_bad_samples)}

    def _load_bad_state(self, state: dict, mid_epoch: bool) -> None:
        self.num_skipped = int(state.get("num_skipped", 0))
        self.epoch_skipped = int(state.get("epoch_skipped", 0)) if mid_epoch else 0
        self.epoch_bad_samples = [str(x) for x in state.get("epoch_bad_samples", ())][:_MAX_LISTED] if mid_epoch else []

    @abc.abstractmethod
    def _rank_epoch_samples(self) -> Optional[int]:
        """Samples this rank reads per epoch (the limit's denominator); None: not known yet."""

    def _rank_epoch_samples_phrase(self, n: int) -> str:
        return f"the {n} samples this rank reads per epoch"

    def _count_skipped(self, n: int, errors: List[str]) -> None:
        self.num_skipped += n
        self.epoch_skipped += n
        self.epoch_bad_samples.extend(errors[:_MAX_LISTED - len(self.epoch_bad_samples)])
        self._check_bad_limit()

    def _check_bad_limit(self) -> None:
        # the same broken file is met again every epoch: the limit is per epoch, over the
        # samples this rank reads in one
        per_rank = self._rank_epoch_samples()
        if per_rank is None or self.epoch_skipped <= self.max_bad_fraction * per_rank:
            return
        listed = self.epoch_bad_samples
        more = self.epoch_skipped - len(listed)
        raise TooManyBadSamples(
            f"{self.description or 'loader'}: {self.epoch_skipped} samples were unreadable and skipped in "
            f"epoch {self.epoch}, more than max_bad_fraction={self.max_bad_fraction:g} of "
            f"{self._rank_epoch_samples_phrase(per_rank)}; fix the data or raise max_bad_fraction. "
            f"The unreadable samples:" + "".join(f"\n  {e}" for e in listed)
            + (f"\n  ... and {more} more (each was logged as a warning)" if more > 0 else ""))


class Loader(BadSampleLimit):
    """An iterable of batches with set_epoch / state_dict / load_state_dict / len.

    Iterating yields this rank's remaining batches of the current epoch; breaking out early
    keeps the position (the next iteration continues there). After the last batch the
    position reads (epoch, len(loader)); then either set_epoch(epoch + 1) or simply iterating
    again starts the next epoch. set_epoch(e) is a no-op while already in epoch e, so a
    resumed run may call it with the resumed epoch without losing its place.

    Unreadable samples (the datasets replace them and report them in each batch's
    num_skipped / skipped_samples; this class takes skipped_samples out of the batch) are
    counted per epoch; past max_bad_fraction of this rank's samples the loader stops with a
    TooManyBadSamples (a DataError: the jobs exit 2 with it) that lists them (file, reason,
    record; the first 20 of the epoch).
    """

    def __init__(self, dataset: Dataset, collate_fn, batch_size: int, *, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False, num_workers: int = 0,
                 pin_memory: Optional[bool] = None, persistent_workers: bool = True,
                 prefetch_factor: Optional[int] = None, max_bad_fraction: float = 0.01,
                 description: str = ""):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset, self.collate_fn = dataset, collate_fn
        self.sampler = ShardedBatchSampler(len(dataset), batch_size, rank=rank, world=world, seed=seed,
                                           shuffle=shuffle, drop_last=drop_last)
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.prefetch_factor = prefetch_factor
        self._init_bad_limit(max_bad_fraction, description)
        self._loader: Optional[DataLoader] = None

    # -- position --------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def batch_index(self) -> int:
        """Batches of the current epoch already handed out."""
        return self.sampler.start_batch

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of `epoch` (a no-op when already inside that epoch, so a resumed
        run that calls set_epoch(resumed epoch) keeps its position)."""
        if int(epoch) != self.sampler.epoch:
            self.sampler.epoch, self.sampler.start_batch = int(epoch), 0

    def state_dict(self) -> dict:
        s = self.sampler
        return {"epoch": s.epoch, "batch_index": s.start_batch, "seed": s.seed,
                "num_samples": s.num_samples, "batch_size": s.batch_size, "rank": s.rank,
                "world": s.world, "shuffle": s.shuffle, "drop_last": s.drop_last,
                **self._bad_state(), "description": self.description}

    def load_state_dict(self, state: dict) -> None:
        s = self.sampler
        if state.get("kind", "indexed") != "indexed":
            raise ValueError(f"loader state_dict is the position of a {state['kind']!r} loader; this loader reads "
                             f"an indexed source: resume with the same data source, or start the data position "
                             f"afresh")
        # rank is not compared: in synchronous training every rank has consumed the same number
        # of batches, so rank 0's state (the one a checkpoint usually keeps) resumes every rank
        for name in ("seed", "num_samples", "batch_size", "world", "shuffle", "drop_last"):
            if name in state and state[name] != getattr(s, name):
                raise ValueError(f"loader state_dict does not match this loader: {name}={state[name]!r} "
                                 f"in the state, {getattr(s, name)!r} here (resume with the same data "
                                 f"settings, or start the data position afresh)")
        epoch, index = int(state["epoch"]), int(state["batch_index"])
        if not 0 <= index <= len(s):
            raise ValueError(f"loader state_dict: batch_index {index} outside [0, {len(s)}]")
        s.epoch, s.start_batch = epoch, index
        self._load_bad_state(state, mid_epoch=index > 0)

    # -- iteration -------------------------------------------------------------------------
    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            extra = {}
            if self.num_workers > 0:
                extra["persistent_workers"] = self.persistent_workers
                if self.prefetch_factor is not None:
                    extra["prefetch_factor"] = self.prefetch_factor
            self._loader = DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=self.collate_fn,
                                      num_workers=self.num_workers, pin_memory=self.pin_memory,
                                      worker_init_fn=_worker_init, **extra)
        return self._loader

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict]:
        s = self.sampler
        if s.start_batch >= len(s):
            s.epoch, s.start_batch = s.epoch + 1, 0
        if s.start_batch == 0:
            self._reset_epoch_bad()
        epoch = s.epoch
        for batch in self._dataloader():
            s.start_batch += 1
            bad = batch.pop("skipped_samples", None) or []
            skipped = int(batch.get("num_skipped", 0))
            if skipped:
                self._count_skipped(skipped, bad)
            yield batch
            if s.epoch != epoch:  # set_epoch() / load_state_dict() called mid-iteration
                return
        if self.epoch_skipped:
            log.warning("%s: %d corrupt or unreadable samples skipped in epoch %d (%d in all epochs)",
                        self.description or "loader", self.epoch_skipped, epoch, self.num_skipped)
        # the position stays "epoch finished" (batch_index == len): a trainer that calls
        # set_epoch(epoch + 1) next and one that just iterates again both get the next epoch

    def _rank_epoch_samples(self) -> int:
        return -(-len(self.dataset) // self.sampler.world)


class TooManyBadSamples(DataError):
    """More than the allowed fraction of an epoch's samples could not be read (bad data, not a
    bug: a user error under vlmo_fast.errors, exit code 2)."""


def _worker_init(worker_id: int) -> None:
    # decoding/rendering is numpy/PIL work: one intra-op thread per worker avoids oversubscription
    torch.set_num_threads(1)
