"""Reading a batch's rows from the store's shards, with a small cache of whole decoded shards.

Sits between the store reader (`storage.Store`) and collation (`student_train.collate`): each loader worker (or
the loader's background thread) asks a `ShardCache` for the rows of one batch's global sample ids and collates them.
The shard-aware shuffle of `student_train.order` draws a window's batches from that window's shards only, so a cache
the size of one window serves most batches from shards it has already read.

Legend: B samples in a batch, E flat sampled entries (the rows' draws, one after another).
"""

from __future__ import annotations

import numpy as np

from storage.reader import Store
from storage.targets.sampled import FLAT_ARRAYS


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), without a Python loop."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - ends + lengths, lengths) + np.arange(int(ends[-1]) if len(ends) else 0)


def _take(record: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of a shard record; flat sampled arrays become those rows' entries, in row order."""
    out = {name: value[rows] for name, value in record.items() if name not in FLAT_ARRAYS and name != "sampled_offsets"}
    if "sampled_offsets" in record:
        offsets = record["sampled_offsets"].astype(np.int64)
        entries = _ranges(offsets[rows], offsets[rows + 1] - offsets[rows])
        out.update({name: record[name][entries] for name in FLAT_ARRAYS})
    return out


class ShardCache:
    """Reads the rows of a batch, holding at most `capacity` whole shards decoded between batches.

    A shard a batch needs is read whole and kept, least recently used evicted first. When a batch needs more shards
    than fit, those appearing last in the batch (the direction the order is heading) are kept and the others are
    read as a single row range each, without keeping them.
    """

    def __init__(self, store: Store, capacity: int):
        self.store = store
        self.capacity = capacity
        self._shards: dict[int, dict[str, np.ndarray]] = {}  # in order of last use
        self._starts = np.cumsum([0, *(len(s) for s in store.shards)], dtype=np.int64)

    def rows(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Arrays of the samples `ids`, in that order: dense ones [B, ...], flat sampled ones [E] in sample order."""
        shard_B = np.searchsorted(self._starts, ids, side="right") - 1
        row_B = ids - self._starts[shard_B]
        needed = {int(j): np.flatnonzero(shard_B == j) for j in np.unique(shard_B)}
        keep = sorted(needed, key=lambda j: -needed[j][-1])[:self.capacity]
        parts = {j: _take(self._use(j), row_B[needed[j]]) for j in needed if j in self._shards}
        missing = [j for j in keep if j not in self._shards]
        excess = max(0, len(self._shards) + len(missing) - self.capacity)
        for j in [j for j in self._shards if j not in keep][:excess]:  # least recently used first
            del self._shards[j]
        for j in missing:
            self._shards[j] = self.store.shards[j].read()
            parts[j] = _take(self._shards[j], row_B[needed[j]])
        for j in needed.keys() - parts.keys():
            rows = row_B[needed[j]]
            first = int(rows.min())
            parts[j] = _take(self.store.shards[j].read(slice(first, int(rows.max()) + 1)), rows - first)
        return _in_batch_order(parts, needed)

    def _use(self, shard: int) -> dict[str, np.ndarray]:
        self._shards[shard] = self._shards.pop(shard)
        return self._shards[shard]


def _in_batch_order(parts: dict[int, dict], positions: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate per-shard parts and put their rows (and their flat entries) back in batch order."""
    inverse = np.argsort(np.concatenate([positions[j] for j in parts]))
    out = {name: np.concatenate([p[name] for p in parts.values()]) for name in next(iter(parts.values()))}
    if "sampled_nunique" in out:
        lengths = out["sampled_nunique"].sum(axis=1, dtype=np.int64)
        entries = _ranges((np.cumsum(lengths) - lengths)[inverse], lengths[inverse])
        for name in FLAT_ARRAYS:
            out[name] = out[name][entries]
    return {name: value if name in FLAT_ARRAYS else value[inverse] for name, value in out.items()}

