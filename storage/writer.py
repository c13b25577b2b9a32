"""Writing a store: buffer whole shards, encode them with the layout's codecs, commit each atomically.

`StoreWriter` owns the manifest and commits shards one at a time; `BackgroundWriter` runs it on a thread fed
by a bounded queue so the teacher never waits on compression. Records are dicts of arrays whose leading axis
is samples, except the flat `sampled_ids` / `sampled_counts`, whose entries follow `sampled_nunique`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable

import numpy as np

from storage.fs import Location
from storage.layout import SHARDS_DIR, ArraySpec, array_specs, chunking, codecs_for, shard_name
from storage.manifest import Manifest, ShardInfo, header_differences

log = logging.getLogger(__name__)

_FLUSH, _ABORT = object(), object()


class StoreWriter:
    """Creates or resumes a store and commits shards to it in order."""

    def __init__(self, location: Location, manifest: Manifest):
        self.location = location
        self.manifest = manifest
        self.specs = array_specs(
            vocab_size=manifest.teacher["vocab_size"],
            targets=manifest.targets,
            hidden_dtype=manifest.targets.get("hidden_states", {}).get("dtype", "float16"),
        )

    @classmethod
    def open(cls, url: str | os.PathLike, manifest: Manifest, *, resume: bool) -> StoreWriter:
        """Start a new store at `url`, or continue the one there when `resume` is set.

        Raises:
            ValueError: the output holds data and `resume` is off; or `resume` is on and the store was built
                with other options (every difference is named); or the store is complete already.
        """
        location = Location(url)
        existing = location.listdir()
        if existing and not resume:
            raise ValueError(
                f"Output {location} already exists and is not empty ({len(existing)} entries). "
                "Pass --resume to continue an interrupted build into it, or choose a new --output."
            )
        if resume and existing:
            return cls._resume(location, manifest)
        location.makedirs(SHARDS_DIR)
        manifest.save(location)
        return cls(location, manifest)

    @classmethod
    def _resume(cls, location: Location, manifest: Manifest) -> StoreWriter:
        stored = Manifest.load(location)
        diffs = header_differences(stored.header(), manifest.header())
        if diffs:
            raise ValueError(
                f"Cannot resume {location}: it was built with other options.\n  "
                + "\n  ".join(diffs)
                + "\nRerun with the store's options, or build into a new --output."
            )
        if stored.complete:
            raise ValueError(f"{location} is already complete ({stored.num_samples} samples); nothing to resume.")
        writer = cls(location, stored)
        writer._remove_uncommitted()
        log.info("resuming %s after %d committed shards (%d samples)", location, len(stored.shards),
                 stored.num_samples)
        return writer

    def _remove_uncommitted(self) -> None:
        """Delete shard directories the manifest does not list: leftovers of an interrupted commit."""
        committed = {s.name for s in self.manifest.shards}
        for name in self.location.listdir(SHARDS_DIR):
            if f"{SHARDS_DIR}/{name}" not in committed:
                log.info("removing uncommitted %s/%s", SHARDS_DIR, name)
                self.location.remove_tree(f"{SHARDS_DIR}/{name}")

    @property
    def committed_samples(self) -> int:
        return self.manifest.num_samples

    def write_shard(self, record: dict[str, np.ndarray]) -> ShardInfo:
        """Encode one full shard and commit it: data first, then the manifest that lists it."""
        index = len(self.manifest.shards)
        final = shard_name(index)
        staging = f"{SHARDS_DIR}/.tmp-{os.path.basename(final)}-{os.getpid()}" if self.location.local else final
        self.location.remove_tree(staging)
        record = _with_offsets(record) if "sampled_nunique" in record else record
        group = self.location.open_group(staging, mode="w")
        group.attrs.update({"shard_index": index, "num_samples": int(record["input_ids"].shape[0])})
        array_bytes = {name: _write_array(group, self.specs[name], record[name]) for name in self.specs}
        files = {rel: self.location.sha256(f"{staging}/{rel}") for rel in self.location.files(staging)}
        if staging != final:
            self.location.remove_tree(final)
            self.location.rename(staging, final)
        info = ShardInfo(
            name=final,
            num_samples=int(record["input_ids"].shape[0]),
            num_positions=int(record["loss_mask"].size),
            num_tokens=int(record["loss_mask"].sum()),
            array_bytes=array_bytes,
            files=files,
        )
        self.manifest.shards.append(info)
        self.manifest.save(self.location)
        return info

    def finish(self) -> Manifest:
        """Mark the store complete."""
        self.manifest.complete = True
        self.manifest.save(self.location)
        return self.manifest


def _with_offsets(record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    per_sample = record["sampled_nunique"].sum(axis=1, dtype=np.uint64)
    offsets = np.concatenate([np.zeros(1, np.uint64), np.cumsum(per_sample, dtype=np.uint64)])
    assert offsets[-1] == record["sampled_ids"].shape[0]
    return {**record, "sampled_offsets": offsets}


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
    soon as `samples_per_shard` samples are buffered. Errors on the thread are raised on the next `put` or at
    `close`. `put` blocks when `max_pending` batches wait, bounding host memory.
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

    def put(self, record: dict, ready: Callable[[], None] | None = None) -> None:
        """Queue a batch record; `ready` is called on the thread before reading it (e.g. a CUDA event wait)."""
        self._raise_if_failed()
        self._queue.put((record, ready))

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
        buffered = 0
        try:
            while (item := self._queue.get()) not in (_FLUSH, _ABORT):
                record, ready = item
                if ready is not None:
                    ready()
                record = {k: np.asarray(v) for k, v in record.items()}
                pending.append(record)
                buffered += record["input_ids"].shape[0]
                if buffered >= self.samples_per_shard:
                    assert buffered == self.samples_per_shard, "a batch crossed a shard boundary"
                    self._commit(pending)
                    pending, buffered = [], 0
            if item is _FLUSH and pending:
                self._commit(pending)
        except BaseException as exc:  # surfaced to the producer by _raise_if_failed
            self._error = exc
            while self._queue.get() not in (_FLUSH, _ABORT):  # unblock a producer waiting on a full queue
                pass

    def _commit(self, records: list[dict[str, np.ndarray]]) -> None:
        info = self.writer.write_shard(concat_records(records))
        if self.on_commit is not None:
            self.on_commit(info)
