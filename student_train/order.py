"""The order of samples: which global sample ids each rank reads, in which batches, in each epoch.

Sits between the store's manifest (its shard sizes) and the loader (`student_train.loader`), which reads the ids
this module names. Everything here is a pure function of (seed, epoch, shard sizes, options, ranks): no I/O, no
torch. Every rank and DataLoader worker computes the order alone, so resuming or changing the worker count needs no
shared memory.

Shuffle: shard-aware. The shards are permuted, grouped into windows of `shuffle_window` shards, and samples are
shuffled within a window, so a worker that holds one window's shards can serve every batch of that window.

Partition: step b of the epoch takes the block `order[b*W*B : (b+1)*W*B]` (W ranks, B samples per rank) and rank
r gets its r-th B-sized part; so the samples of a step do not depend on the world size for a given global batch.
Batches of a rank are numbered b = 0, 1, ...; DataLoader worker w of N produces the batches b = w (mod N), which
torch's round-robin collection returns in the order 0, 1, 2, ... whatever N is.

An evaluation shared by ranks wants every sample exactly once rather than equal batches on every rank: the loader
then builds a single-rank order and gives rank r its batches r, r + W, r + 2W, ...
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np


@dataclass(frozen=True, eq=False)
class SampleOrder:
    """Which global sample ids each rank reads in each epoch, batch by batch; a pure function of its fields.

    Attributes:
        shard_sizes: samples per shard, in store order.
        seed: shuffle seed.
        shuffle: shard-aware shuffle (ignored with a selection).
        shuffle_window: shards per shuffle window.
        id_range: [start, stop) of the global ids read (the held-out split); unused with a selection.
        selection: explicit ids in order, or None.
        batch_size: samples per batch per rank.
        world_size: number of ranks.
        drop_last: see `LoaderConfig.drop_last`.
    """

    shard_sizes: tuple[int, ...]
    seed: int
    shuffle: bool
    shuffle_window: int
    id_range: tuple[int, int]
    selection: np.ndarray | None
    batch_size: int
    world_size: int
    drop_last: bool

    @cached_property
    def shard_starts(self) -> np.ndarray:
        return np.cumsum([0, *self.shard_sizes], dtype=np.int64)

    @property
    def num_samples(self) -> int:
        """Samples in an epoch's order, before the partition drops its tail."""
        return len(self.selection) if self.selection is not None else self.id_range[1] - self.id_range[0]

    @property
    def _full_batches(self) -> int:
        return self.num_samples // (self.world_size * self.batch_size)

    @property
    def last_batch_size(self) -> int:
        """Size of each rank's short final batch; 0 when there is none."""
        if self.drop_last:
            return 0
        return (self.num_samples - self._full_batches * self.world_size * self.batch_size) // self.world_size

    @property
    def num_batches(self) -> int:
        """Batches per epoch, the same on every rank."""
        return self._full_batches + (self.last_batch_size > 0)

    @property
    def rank_samples(self) -> int:
        """Samples per epoch on each rank."""
        return self._full_batches * self.batch_size + self.last_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Every global id of the epoch, in reading order (int64)."""
        if self.selection is not None:
            return self.selection
        start, stop = self.id_range
        if not self.shuffle:
            return np.arange(start, stop, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        shards = rng.permutation(len(self.shard_sizes))
        windows = []
        for first in range(0, len(shards), self.shuffle_window):
            ids = np.concatenate([np.arange(self.shard_starts[j], self.shard_starts[j + 1])
                                  for j in shards[first:first + self.shuffle_window]])
            windows.append(rng.permutation(ids[(ids >= start) & (ids < stop)]))
        return np.concatenate(windows)

    def batch(self, order: np.ndarray, rank: int, index: int) -> np.ndarray:
        """Global ids of batch `index` of `rank`, given the epoch's `order`."""
        assert 0 <= index < self.num_batches
        step = self.world_size * self.batch_size
        if index < self._full_batches:
            first = index * step + rank * self.batch_size
            return order[first:first + self.batch_size]
        first = self._full_batches * step + rank * self.last_batch_size
        return order[first:first + self.last_batch_size]


class HeldOutSplit(Protocol):
    """The options that split off the held-out tail (`LoaderConfig` has them)."""

    exclude_fraction_from_end: float
    only_fraction_from_end: float


def held_out_range(num_samples: int, config: HeldOutSplit) -> tuple[int, int]:
    """[start, stop) of the global ids read: all, all but the held-out tail, or only that tail."""
    if config.only_fraction_from_end:
        return num_samples - round(num_samples * config.only_fraction_from_end), num_samples
    return 0, num_samples - round(num_samples * config.exclude_fraction_from_end)
