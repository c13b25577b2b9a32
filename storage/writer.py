"""Writing a store: buffer whole shards, encode them with the layout's codecs, commit each atomically.

`StoreWriter` owns the manifest (the store's, one worker's when several share a build, or `merging.json` while a
store is made from others) and commits shards one at a time, encoded from a record or copied from another store;
`BackgroundWriter` runs it on a thread fed by a bounded queue so the teacher never waits on compression. Records
are dicts of arrays whose leading axis is samples, except the flat `sampled_ids` / `sampled_counts`, whose entries
follow `sampled_nunique`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from storage.fs import Location
from storage.layout import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARDS_DIR,
    ArraySpec,
    chunking,
    codecs_for,
    quantize_logprobs,
    shard_name,
)
from storage.lock import is_lock_file
from storage.manifest import MERGING_NAME, WORKERS_DIR, Manifest, ShardInfo, header_differences
from storage.targets import array_specs, sample_stats
from storage.targets.topk import TOPK_EXCESS, TOPK_FLOOR, TOPK_LOGPROBS, split_logprobs
from storage.workers import WorkerSlot, check_agreement, entry_shard, shard_index

log = logging.getLogger(__name__)

_FLUSH, _ABORT = object(), object()


class StoreWriter:
    """Creates or resumes a store and commits shards to it.

    With `worker` set, this process is one of several that share the build: it writes only the shards that
    worker owns and commits them to its own manifest; `storage/workers.py` merges the workers' manifests. A store
    made from other stores (`open_merged`) commits its shards to `merging.json` and writes `manifest.json` last.

    The commands that write a store hold its lock (`storage.lock.OutputLock`, a worker its own part's) from before
    they check the output until they end; a resumed writer then cleans up after the interrupted one.
    """

    def __init__(self, location: Location, manifest: Manifest, worker: WorkerSlot | None = None, *,
                 manifest_name: str | None = None):
        self.location = location
        self.manifest = manifest
        self.worker = worker
        self.manifest_name = manifest_name or (MANIFEST_NAME if worker is None else worker.manifest_name)
        self.specs = array_specs(
            vocab_size=manifest.teacher["vocab_size"],
            targets=manifest.targets,
            format_version=manifest.format_version,
        )

    @classmethod
    def check_output(cls, location: Location, *, resume: bool, worker: WorkerSlot | None = None) -> None:
        """Refuse an output this build must not write to, before anything is loaded or written.

        Called with the output's lock held (`storage/lock.py`), whose lock files do not count as data.

        Raises:
            ValueError: without `resume`, the output holds data (for a worker: its own manifest, a finished
                store or foreign files); with `resume`, a store of workers resumed by a single process or the
                other way round.
        """
        existing = _entries(location)
        if worker is None:
            if existing and not resume:
                raise ValueError(
                    f"Output {location} already exists and is not empty ({len(existing)} entries). "
                    "Pass --resume to continue an interrupted build into it, or choose a new --output."
                )
            if resume and MANIFEST_NAME not in existing and WORKERS_DIR in existing:
                raise ValueError(
                    f"Cannot resume {location} in one process: it is built by several workers. Resume each "
                    "worker with its --num-workers and --worker-index (see `teacher-cache info`)."
                )
            return
        if MANIFEST_NAME in existing:
            stored = Manifest.load(location)
            if stored.complete:
                raise ValueError(f"{location} is already complete ({stored.num_samples} samples); nothing to "
                                 + ("resume." if resume else "build. Choose a new --output."))
            raise ValueError(
                f"Output {location} holds a build started without --num-workers; resume it the way it was "
                "started, or choose a new --output."
            )
        if not resume and location.exists(worker.manifest_name):
            raise ValueError(
                f"Worker {worker.index} of {worker.count} has already started in {location} "
                f"({worker.manifest_name}). Pass --resume to continue it, or choose a new --output."
            )
        if not resume and (foreign := sorted(set(existing) - {SHARDS_DIR, WORKERS_DIR})):
            raise ValueError(
                f"Output {location} already exists and holds files of no teacher-cache build "
                f"({', '.join(foreign[:5])}). Choose a new --output."
            )

    @classmethod
    def check_merged_output(cls, location: Location, *, resume: bool) -> None:
        """Refuse an output that a store made from other stores must not write to, before anything is read.

        Raises:
            ValueError: the output is a store already; or it holds data and `resume` is off; or `resume` is on and
                it holds no unfinished merge.
        """
        existing = _entries(location)
        if MANIFEST_NAME in existing:
            raise ValueError(f"Output {location} is a store already ({MANIFEST_NAME}); choose a new --output.")
        if resume and existing and MERGING_NAME not in existing:
            raise ValueError(f"Cannot resume {location}: it holds no unfinished merge ({MERGING_NAME}). Choose a new "
                             "--output, or empty it.")
        if existing and not resume:
            hint = (f"it holds an interrupted merge ({MERGING_NAME}): pass --resume to finish it, or delete it"
                    if MERGING_NAME in existing else f"it holds {len(existing)} entries: choose a new --output")
            raise ValueError(f"Output {location} already exists and is not empty; {hint}.")

    @classmethod
    def open_merged(cls, url: str | os.PathLike, manifest: Manifest, *, resume: bool) -> StoreWriter:
        """Start a store made from other stores at `url` (or continue an interrupted one when `resume` is set).

        Shards commit to `merging.json`; `finish` writes `manifest.json` last, so an interrupted merge never looks
        like a store, and a resumed one skips the shards already committed.

        Raises:
            ValueError: see `check_merged_output`; or `resume` is on and the interrupted merge was started with
                other inputs or options (every difference is named).
        """
        location = Location(url)
        cls.check_merged_output(location, resume=resume)
        if resume and location.exists(MERGING_NAME):
            stored = Manifest.load(location, MERGING_NAME)
            diffs = header_differences(stored.header(), manifest.header(), old_name="the interrupted merge",
                                       new_name="this one")
            if diffs:
                raise ValueError(f"Cannot resume {location}: the interrupted merge had other inputs or options.\n  "
                                 + "\n  ".join(diffs) + "\nRerun it as it was started, or merge into a new --output.")
            writer = cls(location, stored, manifest_name=MERGING_NAME)
            writer._remove_temporaries()
            writer._remove_uncommitted()
            log.info("resuming the merge into %s after %d committed shards", location, len(stored.shards))
            return writer
        location.makedirs(SHARDS_DIR)
        manifest.save(location, MERGING_NAME)
        return cls(location, manifest, manifest_name=MERGING_NAME)

    @classmethod
    def open(cls, url: str | os.PathLike, manifest: Manifest, *, resume: bool,
             worker: WorkerSlot | None = None) -> StoreWriter:
        """Start a new store at `url`, or continue the one there when `resume` is set.

        With `worker`, start or continue that worker's part of a store shared by several workers.

        Raises:
            ValueError: see `check_output`; or `resume` is on and the store was built with other options (every
                difference is named); or the store is complete already; or, for a worker, another worker of
                the store runs with another worker count or other options.
        """
        location = Location(url)
        cls.check_output(location, resume=resume, worker=worker)
        if worker is not None:
            return cls._open_worker(location, manifest, worker, resume=resume)
        if resume and _entries(location):
            return cls._resume(location, manifest)
        location.makedirs(SHARDS_DIR)
        manifest.save(location)
        return cls(location, manifest)

    @classmethod
    def _open_worker(cls, location: Location, manifest: Manifest, worker: WorkerSlot, *,
                     resume: bool) -> StoreWriter:
        if resume and location.exists(worker.manifest_name):
            writer = cls._resume(location, manifest, worker)
            check_agreement(location, worker, writer.manifest)
            return writer
        location.makedirs(SHARDS_DIR)
        location.makedirs(WORKERS_DIR)
        manifest.worker = {"index": worker.index, "count": worker.count, "stream_samples": None}
        manifest.save(location, worker.manifest_name)
        try:
            # After our own manifest is written: of two workers that start at once, the later one sees the other.
            check_agreement(location, worker, manifest)
        except ValueError:
            location.remove_file(worker.manifest_name)
            raise
        return cls(location, manifest, worker)

    @classmethod
    def _resume(cls, location: Location, manifest: Manifest, worker: WorkerSlot | None = None) -> StoreWriter:
        name = MANIFEST_NAME if worker is None else worker.manifest_name
        stored = Manifest.load(location, name)
        if stored.format_version != FORMAT_VERSION:
            raise ValueError(
                f"Cannot resume {location}: it was started by a release that writes store format version "
                f"{stored.format_version}, and this one writes version {FORMAT_VERSION}. Finish it with the release "
                "that started it, or build into a new --output; its committed shards stay readable."
            )
        diffs = header_differences(stored.header(), manifest.header())
        if diffs:
            raise ValueError(
                f"Cannot resume {location}: it was built with other options.\n  "
                + "\n  ".join(diffs)
                + "\nRerun with the store's options, or build into a new --output."
            )
        if stored.complete and worker is None:
            raise ValueError(f"{location} is already complete ({stored.num_samples} samples); nothing to resume.")
        writer = cls(location, stored, worker)
        writer._remove_temporaries()
        if stored.complete:
            log.info("worker %d of %d already finished (%d shards)", worker.index, worker.count, len(stored.shards))
            return writer
        writer._remove_uncommitted()
        log.info("resuming %s after %d committed shards (%d samples)%s", location, len(stored.shards),
                 stored.num_samples, "" if worker is None else f" of worker {worker.index} of {worker.count}")
        return writer

    def _remove_temporaries(self) -> None:
        """Delete the temporary files that writes of this writer's manifests left when they were interrupted.

        The output's lock is held, so no other process writes these manifests. A worker deletes only its own
        manifest's: the others may be in flight in another worker. A merge also writes `manifest.json` last.
        """
        names = [self.manifest_name, *([MANIFEST_NAME] if self.manifest_name == MERGING_NAME else [])]
        for rel in (rel for name in names for rel in self.location.temporaries(name)):
            log.info("removing %s, left by an interrupted manifest write", rel)
            self.location.remove_file(rel)

    def _remove_uncommitted(self) -> None:
        """Delete shard directories the manifest does not list: leftovers of an interrupted commit.

        A worker deletes only those of its own shards: the others may be in flight in another worker.
        """
        committed = {s.name for s in self.manifest.shards}
        for name in self.location.listdir(SHARDS_DIR):
            if f"{SHARDS_DIR}/{name}" in committed:
                continue
            if self.worker is None or ((index := entry_shard(name)) is not None and self.worker.owns(index)):
                log.info("removing uncommitted %s/%s", SHARDS_DIR, name)
                self.location.remove_tree(f"{SHARDS_DIR}/{name}")

    @property
    def committed_shards(self) -> set[int]:
        """Global indices of the shards this writer's manifest lists."""
        return {shard_index(s) for s in self.manifest.shards}

    def write_shard(self, index: int, record: dict[str, np.ndarray]) -> ShardInfo:
        """Encode global shard `index` and commit it: data first, then the manifest that lists it."""
        staging = self._staging(index)
        record = _with_offsets(record) if "sampled_nunique" in record else record
        # Statistics describe the stored values: quantize first (the codec's rounding, so writing is unchanged).
        record = quantized_record(record, self.specs)
        if "stats_num_tokens" in self.specs and "stats_num_tokens" not in record:
            record = {**record, **sample_stats(record, self.manifest.targets)}
        group = self.location.open_group(staging, mode="w")
        group.attrs.update({"shard_index": index, "num_samples": int(record["input_ids"].shape[0])})
        array_bytes = write_arrays(group, self.specs, record)
        files = {rel: self.location.sha256(f"{staging}/{rel}") for rel in self.location.files(staging)}
        return self._commit(staging, ShardInfo(
            name=shard_name(index),
            num_samples=int(record["input_ids"].shape[0]),
            num_positions=int(record["loss_mask"].size),
            num_tokens=int(record["loss_mask"].sum()),
            array_bytes=array_bytes,
            files=files,
        ))

    def copy_shard(self, index: int, source: Location, info: ShardInfo) -> ShardInfo:
        """Commit a copy of another store's shard (same arrays and encoding) as global shard `index`.

        The files are copied as they are (each shard is a self-contained Zarr group) and checked against the
        source manifest's SHA-256 on the way; only the group's `shard_index` attribute is rewritten.

        Raises:
            RuntimeError: a source file does not match its checksum (the source store is damaged).
        """
        staging = self._staging(index)
        files = {}
        for rel, digest in info.files.items():
            files[rel] = self.location.copy_from(source, f"{info.name}/{rel}", f"{staging}/{rel}")
            if files[rel] != digest:
                raise RuntimeError(f"{source}/{info.name}/{rel} does not match its checksum: the store is damaged "
                                   f"(`teacher-cache verify {source}` lists every damaged file).")
        self.location.open_group(staging, mode="r+").attrs.update({"shard_index": index})
        files["zarr.json"] = self.location.sha256(f"{staging}/zarr.json")
        return self._commit(staging, replace(info, name=shard_name(index), files=files))

    def _staging(self, index: int) -> str:
        """An empty directory to write shard `index` into: a temporary name on local stores, the final elsewhere."""
        final = shard_name(index)
        staging = f"{SHARDS_DIR}/.tmp-{os.path.basename(final)}-{os.getpid()}" if self.location.local else final
        self.location.remove_tree(staging)
        return staging

    def _commit(self, staging: str, info: ShardInfo) -> ShardInfo:
        """Move a written shard into place, then list it in the manifest: the manifest write is the commit."""
        if staging != info.name:
            self.location.remove_tree(info.name)
            self.location.rename(staging, info.name)
        self.manifest.shards = sorted([*self.manifest.shards, info], key=shard_index)
        self.manifest.save(self.location, self.manifest_name)
        return info

    def finish(self, stream_samples: int | None = None) -> Manifest:
        """Mark the store, or this worker's part of it, complete.

        A store made from others gets its `manifest.json` now (the commit point of the whole merge), and its
        `merging.json` is removed.

        Args:
            stream_samples: a worker's count of the samples in the whole stream, which the merge checks.
        """
        if self.worker is not None:
            self.manifest.worker["stream_samples"] = stream_samples
        self.manifest.complete = True
        if self.manifest_name == MERGING_NAME:
            self.manifest.save(self.location)
            self.location.remove_file(MERGING_NAME)
            return self.manifest
        self.manifest.save(self.location, self.manifest_name)
        return self.manifest


def _entries(location: Location) -> list[str]:
    """The entries of an output's directory, less the lock files of its writers."""
    return [name for name in location.listdir() if not is_lock_file(name)]


def _with_offsets(record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    per_sample = record["sampled_nunique"].sum(axis=1, dtype=np.uint64)
    offsets = np.concatenate([np.zeros(1, np.uint64), np.cumsum(per_sample, dtype=np.uint64)])
    assert offsets[-1] == record["sampled_ids"].shape[0]
    return {**record, "sampled_offsets": offsets}


def quantized_record(record: dict[str, np.ndarray], specs: dict[str, ArraySpec]) -> dict[str, np.ndarray]:
    """The logical record with its log-probs rounded as the store keeps them (`quantize_logprobs`), so that
    statistics computed from it describe the stored values (the codec would round the same way)."""
    quantized = {name for name, spec in specs.items() if spec.codec == "logprob_shuffle_zstd"}
    if TOPK_EXCESS in specs:
        quantized.add(TOPK_LOGPROBS)
    return {name: quantize_logprobs(value) if name in quantized else value for name, value in record.items()}


def write_arrays(group, specs: dict[str, ArraySpec], record: dict[str, np.ndarray]) -> dict[str, int]:
    """Write every array of `specs` from a (quantized) logical record into a zarr group; returns their stored bytes.

    Version 3 splits the logical `topk_logprobs` into its floor and excesses (`storage.targets.topk.split_logprobs`)."""
    if TOPK_EXCESS in specs and TOPK_LOGPROBS in record:
        floor, excess = split_logprobs(record[TOPK_LOGPROBS])
        record = {**record, TOPK_FLOOR: floor, TOPK_EXCESS: excess}
    return {name: _write_array(group, specs[name], record[name]) for name in specs}


def _write_array(group, spec: ArraySpec, data: np.ndarray) -> int:
    data = np.ascontiguousarray(data, dtype=spec.dtype)
    chunks, shard = chunking(data.shape, spec.dtype.itemsize)
    array = group.create_array(
        spec.name,
        shape=data.shape,
        dtype=spec.dtype,
        chunks=chunks,
        shards=shard,
        fill_value=0,
        attributes={"axes": list(spec.axes), "description": spec.description},
        **codecs_for(spec),
    )
    if data.size:
        array[...] = data
    return int(array.nbytes_stored())


def concat_records(records: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Join batch records along samples (flat arrays along entries)."""
    return {name: np.concatenate([r[name] for r in records], axis=0) for name in records[0]}


class BackgroundWriter:
    """Runs a StoreWriter on a thread: `put` batch records, they are grouped into shards and committed.

    A batch never spans two shards (the caller cuts batches at shard boundaries), so a shard is committed as
    soon as `samples_per_shard` samples are buffered, as global shard (first sample of its first batch) //
    `samples_per_shard`. Shards may be skipped (committed before a resume, or another worker's), not split.
    Errors on the thread are raised on the next `put` or at `close`. `put` blocks when `max_pending` batches
    wait, bounding host memory.
    """

    def __init__(self, writer: StoreWriter, samples_per_shard: int, *, max_pending: int = 8,
                 on_commit: Callable[[ShardInfo], None] | None = None):
        self.writer = writer
        self.samples_per_shard = samples_per_shard
        self.on_commit = on_commit
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def put(self, first_row: int, record: dict, ready: Callable[[], None] | None = None) -> None:
        """Queue the record of the batch that starts at global sample `first_row`.

        `ready` is called on the thread before reading the record (e.g. a CUDA event wait).
        """
        self._raise_if_failed()
        self._queue.put((first_row, record, ready))

    def close(self) -> None:
        """Flush the last, possibly partial, shard and wait for every commit."""
        self._queue.put(_FLUSH)
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop without committing buffered samples (the producer failed); committed shards stay."""
        self._queue.put(_ABORT)
        self._thread.join()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing the store failed: {self._error}") from self._error

    def _run(self) -> None:
        pending: list[dict[str, np.ndarray]] = []
        buffered = start = 0
        try:
            while (item := self._queue.get()) not in (_FLUSH, _ABORT):
                first_row, record, ready = item
                if not pending:
                    assert first_row % self.samples_per_shard == 0, "a shard must start at its first sample"
                    start = first_row
                assert first_row == start + buffered, "the batches of a shard must follow each other"
                if ready is not None:
                    ready()
                record = {k: np.asarray(v) for k, v in record.items()}
                pending.append(record)
                buffered += record["input_ids"].shape[0]
                if buffered >= self.samples_per_shard:
                    assert buffered == self.samples_per_shard, "a batch crossed a shard boundary"
                    self._commit(start // self.samples_per_shard, pending)
                    pending, buffered = [], 0
            if item is _FLUSH and pending:
                self._commit(start // self.samples_per_shard, pending)
        except BaseException as exc:  # surfaced to the producer by _raise_if_failed
            self._error = exc
            while self._queue.get() not in (_FLUSH, _ABORT):  # unblock a producer waiting on a full queue
                pass

    def _commit(self, index: int, records: list[dict[str, np.ndarray]]) -> None:
        info = self.writer.write_shard(index, concat_records(records))
        if self.on_commit is not None:
            self.on_commit(info)
