"""Phase-2 loader: stream a teacher-cache store into student training as collated batches.

Flow: manifest -> `SampleOrder` (`student_train.order`: which global sample ids each rank reads, in which batches,
per epoch) -> `StoreDataset` (one torch IterableDataset per rank; each DataLoader worker reads its own batches
through a `ShardCache`, `student_train.shard_cache`, and collates them, `student_train.collate`) -> `StoreLoader`
(what the trainer iterates: prefetching, epoch and resume state).

The order is a pure function of (seed, epoch, shard sizes, options), so the loader's state is tiny: epoch, samples
consumed, seed. An evaluation shared by ranks wants every sample exactly once rather than equal batches on every
rank: `StoreLoader(..., interleave=True)` gives rank r the batches r, r + W, r + 2W, ... of the single-rank order
(W ranks).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from storage.reader import Store
from student_train.collate import Batch, collate
from student_train.order import SampleOrder, held_out_range
from student_train.shard_cache import ShardCache

logger = logging.getLogger(__name__)

STATE_VERSION = 1
# What a loader may apply to each collated batch (`StoreLoader(transform=...)`).
Transform = Callable[[Batch], Batch]


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


# --- datasets and the loader --------------------------------------------------------------------------------------


class StoreDataset(IterableDataset):
    """Batches of one rank in one epoch, from batch `start_batch` on, every `stride`-th; wrap it in
    DataLoader(batch_size=None).

    Worker w of N yields the w-th of every N of those batches; each worker opens the store itself and caches its own
    shards.
    """

    def __init__(self, url: str, order: SampleOrder, *, rank: int, epoch: int, start_batch: int, cache_shards: int,
                 stride: int = 1, verify: bool = True, transform: Transform | None = None):
        self.url, self.order, self.rank, self.epoch = url, order, rank, epoch
        self.start_batch, self.cache_shards, self.stride, self.verify = start_batch, cache_shards, stride, verify
        self.transform = transform

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = self.order.epoch_order(self.epoch)
        store = Store(self.url, verify=self.verify)
        cache = ShardCache(store, self.cache_shards)
        for index in range(self.start_batch + worker * self.stride, self.order.num_batches, num_workers * self.stride):
            ids = self.order.batch(order, self.rank, index)
            batch = collate(cache.rows(ids), ids, store.manifest.targets)
            yield batch if self.transform is None else self.transform(batch)


class StoreLoader:
    """What the trainer iterates: batches of this rank, prefetched, with a tiny resumable state.

    Args:
        config: loader options.
        rank: this process's rank.
        world_size: number of ranks.
        interleave: rank r reads the batches r, r + world_size, ... of the single-rank order, so the ranks read every
            sample exactly once but may get one batch fewer than others (an evaluation shared by ranks). Otherwise
            each step's block of world_size batches is split among the ranks (see the module docstring).
        transform: applied to each collated batch where it is made (in the worker processes, if any), e.g. a
            `student_train.cross_tokenizer.CrossTokenizer`; it must pickle for workers.

    Iterating yields the current epoch's batches from the current position and advances the state; once an epoch
    is exhausted the next iteration starts the following one. All ranks hold the same state (they consume equal
    batches), so one rank's `state_dict` resumes them all.
    """

    def __init__(self, config: LoaderConfig, *, rank: int = 0, world_size: int = 1, interleave: bool = False,
                 transform: Transform | None = None):
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
        self.rank, self.world_size, self.transform = rank, world_size, transform
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
                            cache_shards=self.config.shuffle_window, stride=self._stride, verify=self.config.verify,
                            transform=self.transform)

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
