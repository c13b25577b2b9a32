"""Phase-2 loader: stream a teacher-cache store into student training as collated batches.

Flow: manifest -> `SampleOrder` (which global sample ids each rank reads, in which batches, per epoch) ->
`StoreDataset` (one torch IterableDataset per rank; each DataLoader worker collates its own batches through a
`ShardCache`) -> `StoreLoader` (what the trainer iterates: prefetching, epoch and resume state).

The order is a pure function of (seed, epoch, shard sizes, options): every rank and worker computes it alone, so
resuming or changing the worker count needs no shared memory. Shuffling is shard-aware: the shards are permuted,
grouped into windows of `shuffle_window` shards, and samples are shuffled within a window, so a worker that holds
one window's shards can serve every batch of that window.

Partition: step b of the epoch takes the block `order[b*W*B : (b+1)*W*B]` (W ranks, B samples per rank) and rank
r gets its r-th B-sized part; so the samples of a step do not depend on the world size for a given global batch.
Batches of a rank are numbered b = 0, 1, ...; DataLoader worker w of N produces the batches b = w (mod N), which
torch's round-robin collection returns in the order 0, 1, 2, ... whatever N is.

An evaluation shared by ranks wants every sample exactly once rather than equal batches on every rank:
`StoreLoader(..., interleave=True)` gives rank r the batches r, r + W, r + 2W, ... of the single-rank order.

Legend: B samples in a batch, L positions per sample (`seq_len`), K top-k entries, M sampled ids per position
(padded to the batch's maximum), H hidden size, E flat sampled entries, P = B*L positions.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from storage.layout import FLAT_ARRAYS
from storage.reader import Store
from student_train.losses import TAIL_BUCKET

logger = logging.getLogger(__name__)

STATE_VERSION = 1
Batch = dict[str, torch.Tensor]


@dataclass(kw_only=True)
class LoaderConfig:
    """Options of the store loader.

    Attributes:
        store: store path or fsspec URL (written by `teacher-cache build`).
        batch_size: samples per batch, per rank.
        seed: seed of the shuffle; the order of epoch e is a function of (seed, e).
        shuffle: shard-aware shuffle; False reads samples in store order.
        shuffle_window: shards whose samples are shuffled together; each worker holds at most this many shards.
        num_workers: DataLoader worker processes; 0 collates in a background thread of the training process.
        prefetch_factor: batches prepared ahead, per worker (or by the background thread).
        selection: JSON file with {"sample_ids": [...]} or a bare list: train on exactly those ids, in that order,
            every epoch (no shuffle). With exclude_fraction_from_end, the ids must lie below the held-out tail.
        exclude_fraction_from_end: hold out the last round(fraction * samples) global ids for evaluation.
        only_fraction_from_end: read only that held-out tail (for the evaluation loader).
        drop_last: drop the epoch's tail that does not fill a batch on every rank. Otherwise every rank ends with
            one short batch of the same size, and the fewer than world_size samples left over are dropped.
        verify: check each store file against its SHA-256 before its first read in a process (see `storage.Store`).
    """

    store: str
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    shuffle_window: int = 4
    num_workers: int = 0
    prefetch_factor: int = 2
    selection: str | None = None
    exclude_fraction_from_end: float = 0.0
    only_fraction_from_end: float = 0.0
    drop_last: bool = True
    verify: bool = True

    def __post_init__(self) -> None:
        for name, minimum in (("batch_size", 1), ("shuffle_window", 1), ("prefetch_factor", 1), ("seed", 0),
                              ("num_workers", 0)):
            if getattr(self, name) < minimum:
                raise ValueError(f"{name}: must be at least {minimum}, got {getattr(self, name)}.")
        for name in ("exclude_fraction_from_end", "only_fraction_from_end"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}.")
        if self.exclude_fraction_from_end and self.only_fraction_from_end:
            raise ValueError("exclude_fraction_from_end and only_fraction_from_end: set at most one (the training "
                             "loader excludes the tail, the evaluation loader reads only it).")
        if self.selection is not None and self.only_fraction_from_end:
            raise ValueError("selection: a selection file names exactly the samples to read; do not combine it with "
                             "only_fraction_from_end.")


# --- order and partition ------------------------------------------------------------------------------------------


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


def read_selection(path: str, num_samples: int, held_out_from: int | None = None) -> np.ndarray:
    """The ids of a selection file ({"sample_ids": [...]} or a bare list), checked against the store's size and,
    given `held_out_from`, against the held-out tail (ids from there on are evaluated on, never trained on)."""
    data = json.loads(Path(path).read_text())
    ids = data["sample_ids"] if isinstance(data, dict) and "sample_ids" in data else data
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"selection {path}: expected {{\"sample_ids\": [int, ...]}} or a list of ints.")
    ids = np.asarray(ids, dtype=np.int64)
    bad = ids[(ids < 0) | (ids >= num_samples)]
    if len(bad):
        raise ValueError(f"selection {path}: sample ids {bad[:10].tolist()}{' ...' if len(bad) > 10 else ''} "
                         f"are out of range for a store of {num_samples} samples (ids 0..{num_samples - 1}).")
    held = ids[ids >= held_out_from] if held_out_from is not None else ids[:0]
    if len(held):
        raise ValueError(f"selection {path}: sample ids {held[:10].tolist()}{' ...' if len(held) > 10 else ''} are in "
                         f"the held-out tail (ids {held_out_from}..{num_samples - 1}) that evaluation reads; select "
                         "below it (`teacher-cache select --held-out-fraction` equal to --eval-fraction) or evaluate "
                         "on another store (--eval-store).")
    return ids


def held_out_range(num_samples: int, config: LoaderConfig) -> tuple[int, int]:
    """[start, stop) of the global ids read: all, all but the held-out tail, or only that tail."""
    if config.only_fraction_from_end:
        return num_samples - round(num_samples * config.only_fraction_from_end), num_samples
    return 0, num_samples - round(num_samples * config.exclude_fraction_from_end)


# --- reading and collation ----------------------------------------------------------------------------------------


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


def tail_bucket(targets: dict) -> int | None:
    """The store id of the sampled draws' tail bucket (see the manifest's targets.sampled), or None."""
    return targets.get("sampled", {}).get("tail_bucket_id")


def pad_sampled(ids_E: np.ndarray, counts_E: np.ndarray, nunique_BL: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat sampled entries -> [B, L, M] ids (int64) and counts (float32); padding is id 0 with count 0."""
    n_P = nunique_BL.reshape(-1).astype(np.int64)
    start_P = np.cumsum(n_P) - n_P
    m = int(n_P.max()) if len(n_P) else 0
    col_M = np.arange(m)
    valid_PM = col_M < n_P[:, None]
    index_PM = np.where(valid_PM, start_P[:, None] + col_M, 0)
    ids_PM = np.where(valid_PM, ids_E[index_PM], 0).astype(np.int64)
    counts_PM = np.where(valid_PM, counts_E[index_PM], 0).astype(np.float32)
    shape = (*nunique_BL.shape, m)
    return ids_PM.reshape(shape), counts_PM.reshape(shape)


def collate(record: dict[str, np.ndarray], ids: np.ndarray, tail_bucket_id: int | None = None) -> Batch:
    """Torch batch of the rows `record` (from `ShardCache.rows`) of the global samples `ids`.

    `tail_bucket_id` is the store's id for the tail bucket of sampled draws (None when draws are from the full
    distribution); it becomes `losses.TAIL_BUCKET`.
    """
    batch = {
        "input_ids": torch.from_numpy(record["input_ids"].astype(np.int64)),
        "attention_mask": torch.from_numpy(record["attention_mask"]),
        "loss_mask": torch.from_numpy(record["loss_mask"]),
        "segment_ids": torch.from_numpy(record["segment_ids"].astype(np.int64)),
        "sample_ids": torch.from_numpy(np.array(ids, dtype=np.int64)),
    }
    floats = ["entropy", "true_logprob", "topk_logprobs", "tail_logmass"]
    floats += [name for name in record if name.startswith("hidden_states_")]
    batch.update({name: torch.from_numpy(record[name].astype(np.float32)) for name in floats if name in record})
    if "topk_ids" in record:
        batch["topk_ids"] = torch.from_numpy(record["topk_ids"].astype(np.int64))
    if "sampled_nunique" in record:
        ids_BLM, counts_BLM = pad_sampled(record["sampled_ids"], record["sampled_counts"], record["sampled_nunique"])
        if tail_bucket_id is not None:
            ids_BLM[ids_BLM == tail_bucket_id] = TAIL_BUCKET
        batch["sampled_ids"], batch["sampled_counts"] = torch.from_numpy(ids_BLM), torch.from_numpy(counts_BLM)
    return batch


# --- datasets and the loader --------------------------------------------------------------------------------------


class StoreDataset(IterableDataset):
    """Batches of one rank in one epoch, from batch `start_batch` on, every `stride`-th; wrap it in
    DataLoader(batch_size=None).

    Worker w of N yields the w-th of every N of those batches; each worker opens the store itself and caches its own
    shards.
    """

    def __init__(self, url: str, order: SampleOrder, *, rank: int, epoch: int, start_batch: int, cache_shards: int,
                 stride: int = 1, verify: bool = True):
        self.url, self.order, self.rank, self.epoch = url, order, rank, epoch
        self.start_batch, self.cache_shards, self.stride, self.verify = start_batch, cache_shards, stride, verify

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = self.order.epoch_order(self.epoch)
        store = Store(self.url, verify=self.verify)
        tail_bucket_id = tail_bucket(store.manifest.targets)
        cache = ShardCache(store, self.cache_shards)
        for index in range(self.start_batch + worker * self.stride, self.order.num_batches, num_workers * self.stride):
            ids = self.order.batch(order, self.rank, index)
            yield collate(cache.rows(ids), ids, tail_bucket_id)


class StoreLoader:
    """What the trainer iterates: batches of this rank, prefetched, with a tiny resumable state.

    Args:
        config: loader options.
        rank: this process's rank.
        world_size: number of ranks.
        interleave: rank r reads the batches r, r + world_size, ... of the single-rank order, so the ranks read every
            sample exactly once but may get one batch fewer than others (an evaluation shared by ranks). Otherwise
            each step's block of world_size batches is split among the ranks (see the module docstring).

    Iterating yields the current epoch's batches from the current position and advances the state; once an epoch
    is exhausted the next iteration starts the following one. All ranks hold the same state (they consume equal
    batches), so one rank's `state_dict` resumes them all.
    """

    def __init__(self, config: LoaderConfig, *, rank: int = 0, world_size: int = 1, interleave: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}.")
        self.config = config
        store = Store(config.store, verify=config.verify)
        self.targets: dict = store.manifest.targets
        num_samples = len(store)
        id_range = held_out_range(num_samples, config)
        selection = None if config.selection is None else read_selection(config.selection, num_samples, id_range[1])
        self.order = SampleOrder(
            shard_sizes=tuple(s.num_samples for s in store.manifest.shards), seed=config.seed, shuffle=config.shuffle,
            shuffle_window=config.shuffle_window, id_range=id_range, selection=selection,
            batch_size=config.batch_size, world_size=1 if interleave else world_size, drop_last=config.drop_last,
        )
        if self.order.num_batches == 0:
            per_rank = self.order.num_samples // world_size
            raise ValueError(
                f"batch_size: {config.batch_size} is larger than the {per_rank} samples available to each of "
                f"{world_size} rank(s) ({self.order.num_samples} samples in {config.store} after selection and "
                "held-out split); lower batch_size or set drop_last=False."
            )
        self.rank, self.world_size = rank, world_size
        # Batch b of this rank is batch first + b * stride of the order, read as the order's rank `order_rank`.
        self._first, self._stride, self._order_rank = (rank, world_size, 0) if interleave else (0, 1, rank)
        self.epoch, self.samples_consumed = 0, 0
        if rank == 0:
            dropped = self.order.num_samples - self.order.world_size * self.order.rank_samples
            logger.info("loader: %d samples, %d batches of %d per rank and epoch, %d dropped per epoch",
                        self.order.num_samples, len(self), config.batch_size, dropped)

    def __len__(self) -> int:
        return len(range(self._first, self.order.num_batches, self._stride))

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning; a no-op for the current epoch, so a resumed position is kept."""
        if epoch != self.epoch:
            self.epoch, self.samples_consumed = epoch, 0

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "samples_consumed": self.samples_consumed,
                "seed": self.order.seed, "batch_size": self.order.batch_size, "world_size": self.world_size,
                "num_samples": self.order.num_samples}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the last batch counted in `state` (any num_workers; same ranks and batch size)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}; this loader reads {STATE_VERSION}.")
        ours = {"batch_size": self.order.batch_size, "world_size": self.world_size,
                "num_samples": self.order.num_samples}
        changed = [f"{k} {state[k]} (now {v})" for k, v in ours.items() if state[k] != v]
        if changed and state["samples_consumed"]:
            raise ValueError(f"loader state was saved mid-epoch with {', '.join(changed)}: resume mid-epoch with the "
                             "same world size, batch size and samples, or from an epoch boundary.")
        consumed = state["samples_consumed"]
        if consumed != self.order.rank_samples and consumed % self.order.batch_size:
            raise ValueError(f"loader state: samples_consumed={consumed} is not a whole number of batches.")
        self.order = replace(self.order, seed=state["seed"])
        self.epoch, self.samples_consumed = state["epoch"], consumed

    def dataset(self) -> StoreDataset:
        """This rank's remaining batches of the current epoch, for a DataLoader(batch_size=None) of your own."""
        start = self._first + self._stride * (self.samples_consumed // self.order.batch_size)
        return StoreDataset(self.config.store, self.order, rank=self._order_rank, epoch=self.epoch, start_batch=start,
                            cache_shards=self.config.shuffle_window, stride=self._stride, verify=self.config.verify)

    def __iter__(self) -> Iterator[Batch]:
        if self.samples_consumed >= self.order.rank_samples:
            self.epoch, self.samples_consumed = self.epoch + 1, 0
        dataset = self.dataset()
        if self.config.num_workers:
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.config.num_workers,
                                      prefetch_factor=self.config.prefetch_factor))
        else:
            batches = _in_background(iter(dataset), self.config.prefetch_factor)
        try:
            for batch in batches:
                self.samples_consumed += len(batch["sample_ids"])
                yield batch
        finally:
            if not self.config.num_workers:
                batches.close()  # stop the prefetch thread now; DataLoader workers stop when their iterator is freed
        self.epoch, self.samples_consumed = self.epoch + 1, 0


@dataclass
class _Failure:
    error: BaseException


def _in_background(source: Iterator, depth: int) -> Iterator:
    """Items of `source`, produced by a thread that runs up to `depth` items ahead (bounded memory)."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in source:
                if not put(item):
                    return
            put(done)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(_Failure(error))

    thread = threading.Thread(target=produce, name="store-loader-prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
