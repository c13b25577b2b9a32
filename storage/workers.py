"""Builds shared by several workers: which shards a worker writes, its own manifest, and the final merge.

Shards are the unit of work. Every worker reads the same sample stream; worker I of W computes and writes the
global shards s with s % W == I into the one store, and commits each to its own manifest
`workers/worker-IIIII-of-WWWWW.json` (the format of `manifest.json` plus a `worker` entry). No worker writes
another's files, so each locks only its own part (`storage/lock.py`) and resumes alone. The merge writes the
store's `manifest.json` once every worker has finished; that write is the commit point of the whole build. Merging
is idempotent: two workers that finish at once may both merge, and write the same manifest.
"""

from __future__ import annotations

import logging
import re
from contextlib import suppress
from dataclasses import dataclass

from storage.fs import Location
from storage.layout import MANIFEST_NAME
from storage.lock import OutputLock
from storage.manifest import WORKERS_DIR, Manifest, ShardInfo, header_differences

log = logging.getLogger(__name__)

_WORKER_MANIFEST = re.compile(r"worker-(\d+)-of-(\d+)\.json")
# A shard directory or its staging directory: shard-000007, .tmp-shard-000007-<host/pid>.
_SHARD_ENTRY = re.compile(r"(?:\.tmp-)?shard-(\d+)(?:-.+)?")


@dataclass(frozen=True)
class WorkerSlot:
    """Worker `index` of `count`: the shards it owns and where its manifest lives."""

    index: int
    count: int

    @property
    def manifest_name(self) -> str:
        return f"{WORKERS_DIR}/worker-{self.index:05d}-of-{self.count:05d}.json"

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.index


@dataclass(frozen=True)
class WorkerProgress:
    """What one worker's manifest says: `state` is "finished", "unfinished" (running or stopped) or "not started"."""

    slot: WorkerSlot
    state: str
    shards: int
    samples: int
    tokens: int


def entry_shard(entry: str) -> int | None:
    """The global shard index of a `shards/` entry (a shard or its staging directory); None for other names."""
    match = _SHARD_ENTRY.fullmatch(entry)
    return int(match[1]) if match else None


def shard_index(info: ShardInfo) -> int:
    """The global index of a committed shard, from its name."""
    index = entry_shard(info.name.rsplit("/", 1)[-1])
    assert index is not None, info.name
    return index


def load_workers(location: Location) -> dict[WorkerSlot, Manifest]:
    """Every worker manifest of the store, by worker (one that a merge removes meanwhile is left out)."""
    out = {}
    for name in location.listdir(WORKERS_DIR):
        if match := _WORKER_MANIFEST.fullmatch(name):
            slot = WorkerSlot(int(match[1]), int(match[2]))
            try:
                data = location.read_bytes(slot.manifest_name)
            except FileNotFoundError:
                continue
            out[slot] = Manifest.from_json(data.decode(errors="replace"), source=f"{location}/{slot.manifest_name}")
    return out


def check_agreement(location: Location, slot: WorkerSlot, manifest: Manifest) -> None:
    """Refuse to join a build whose other workers run with another worker count or other options.

    Raises:
        ValueError: naming the other worker and every difference.
    """
    for other, theirs in sorted(load_workers(location).items(), key=lambda item: item[0].manifest_name):
        if other == slot:
            continue
        if other.count != slot.count:
            raise ValueError(
                f"{location} is being built by {other.count} workers ({other.manifest_name}); this worker was "
                f"started with --num-workers {slot.count}. Start every worker of a build with the same "
                "--num-workers, or build into a new --output."
            )
        diffs = header_differences(theirs.header(), manifest.header(), old_name=f"worker {other.index}",
                                   new_name=f"worker {slot.index}")
        if diffs:
            raise ValueError(
                f"Worker {slot.index} of {slot.count} cannot join the build in {location}: worker {other.index} "
                "was started with other options.\n  " + "\n  ".join(diffs)
                + "\nStart every worker of a build with the same options, or build into a new --output."
            )


def worker_progress(location: Location) -> list[WorkerProgress]:
    """One entry per worker of the build(s) found under `workers/`; empty when there is none."""
    return _progress(load_workers(location))


def _progress(workers: dict[WorkerSlot, Manifest]) -> list[WorkerProgress]:
    out = []
    for count in sorted({slot.count for slot in workers}):
        for index in range(count):
            slot = WorkerSlot(index, count)
            manifest = workers.get(slot)
            if manifest is None:
                out.append(WorkerProgress(slot, "not started", 0, 0, 0))
                continue
            state = "finished" if manifest.complete else "unfinished"
            out.append(WorkerProgress(slot, state, len(manifest.shards), manifest.num_samples, manifest.num_tokens))
    return out


def unmerged_message(location: Location) -> str | None:
    """Why a store built by workers cannot be read yet, with what to do; None when it has no worker manifests."""
    progress = worker_progress(location)
    if not progress:
        return None
    waiting = [p for p in progress if p.state != "finished"]
    if not waiting:
        return (f"{location}: build not merged: all {len(progress)} workers have finished; run "
                f"`teacher-cache merge {location}`.")
    return (f"{location}: build incomplete: {_describe_waiting(waiting)}; rerun them with --resume, or run "
            f"`teacher-cache merge {location}` once they have.")


def merge_if_finished(location: Location) -> Manifest | None:
    """Merge the workers' manifests into `manifest.json` when every worker has finished; None while some have not.

    Raises:
        RuntimeError: every worker has finished but their shards do not form the whole stream (named).
    """
    merged = _merged(location)
    if merged is None:
        workers = load_workers(location)
        if not workers or _waiting(workers):
            # None, unless a worker that finished at the same time merged (and removed manifests) meanwhile.
            return _merged(location)
        merged = _merge(location, workers)
    _remove_worker_manifests(location)
    return merged


def merge_workers(location: Location) -> Manifest:
    """Merge by hand (`teacher-cache merge`): like `merge_if_finished`, but name what is missing.

    Raises:
        RuntimeError: workers that have not finished, shards that are absent, or a store that is no build by
            workers; the message says what to do.
        LockError: another writer holds the store's lock (`storage/lock.py`).
    """
    with OutputLock(location):
        if not location.exists(MANIFEST_NAME) and not location.listdir(WORKERS_DIR):
            raise RuntimeError(
                f"{location} has neither {MANIFEST_NAME} nor worker manifests: it is not a teacher-cache store."
            )
        merged = merge_if_finished(location)
        if merged is None:
            waiting = _waiting(load_workers(location))
            raise RuntimeError(
                f"Cannot merge {location}: {_describe_waiting(waiting)}. Rerun them with the same options and "
                "--resume; the last one to finish merges the store."
            )
        return merged


def _merged(location: Location) -> Manifest | None:
    """The store's merged manifest; None before the merge."""
    if not location.exists(MANIFEST_NAME):
        return None
    manifest = Manifest.load(location)
    if not manifest.complete:
        raise RuntimeError(
            f"{location} holds a build without workers that has not finished; there is nothing to merge. "
            "Resume it with `teacher-cache build ... --resume`."
        )
    return manifest


def _waiting(workers: dict[WorkerSlot, Manifest]) -> list[WorkerProgress]:
    """The workers (of the smallest worker count found, when several are mixed) that have not finished."""
    count = min(slot.count for slot in workers)
    return [p for p in _progress(workers) if p.slot.count == count and p.state != "finished"]


def _describe_waiting(waiting: list[WorkerProgress]) -> str:
    count = waiting[0].slot.count
    indices = ", ".join(str(p.slot.index) for p in waiting)
    noun, verb = ("worker", "has") if len(waiting) == 1 else ("workers", "have")
    text = f"{noun} {indices} of {count} {verb} not finished"
    if not_started := [str(p.slot.index) for p in waiting if p.state == "not started"]:
        text += f" ({', '.join(not_started)} {'has' if len(not_started) == 1 else 'have'} not started)"
    return text


def _merge(location: Location, workers: dict[WorkerSlot, Manifest]) -> Manifest:
    """Check that the finished workers' shards are the whole stream, then commit the store's manifest."""
    problems = _merge_problems(workers)
    if problems:
        raise RuntimeError(f"Cannot merge {location}:\n  " + "\n  ".join(problems))
    first = workers[min(workers, key=lambda slot: slot.index)]
    shards = sorted((s for m in workers.values() for s in m.shards), key=shard_index)
    merged = Manifest(**first.header(), shards=shards, complete=True, created_by=first.created_by)
    merged.save(location)  # the commit point of the whole build
    log.info("merged the manifests of %d workers: %d shards, %d samples", len(workers), len(shards),
             merged.num_samples)
    return merged


def _merge_problems(workers: dict[WorkerSlot, Manifest]) -> list[str]:
    counts = sorted({slot.count for slot in workers})
    if len(counts) > 1:
        return [f"worker manifests of builds with {', '.join(map(str, counts))} workers are mixed: "
                + ", ".join(sorted(slot.manifest_name for slot in workers))]
    slots = sorted(workers, key=lambda slot: slot.index)
    first = workers[slots[0]]
    problems = []
    for slot in slots[1:]:
        problems += header_differences(first.header(), workers[slot].header(), old_name=f"worker {slots[0].index}",
                                       new_name=f"worker {slot.index}")
    lengths = {slot.index: workers[slot].worker["stream_samples"] for slot in slots}
    if len(set(lengths.values())) > 1:
        problems.append("the workers read streams of different lengths: "
                        + ", ".join(f"worker {i}: {n} samples" for i, n in lengths.items()))
    if problems:
        return problems
    total, per_shard = lengths[slots[0].index], first.build["samples_per_shard"]
    expected = {i: min(per_shard, total - i * per_shard) for i in range(-(-total // per_shard))}
    found: dict[int, int] = {}
    for slot in slots:
        for info in workers[slot].shards:
            index = shard_index(info)
            if index in found or index not in expected:
                problems.append(f"worker {slot.index} lists shard {index}, which is "
                                + ("listed twice" if index in found else f"beyond the {len(expected)} of the stream"))
            elif info.num_samples != expected[index]:
                problems.append(f"shard {index} holds {info.num_samples} samples; the stream puts {expected[index]} "
                                "there")
            found[index] = info.num_samples
    if missing := sorted(set(expected) - set(found)):
        problems.append(f"shards {', '.join(map(str, missing))} of 0..{len(expected) - 1} are absent "
                        f"({total} samples in the stream)")
    return problems


def _remove_worker_manifests(location: Location) -> None:
    """After the merge: the worker manifests are superseded by `manifest.json` (tolerates a concurrent merge)."""
    for name in location.listdir(WORKERS_DIR):
        location.remove_file(f"{WORKERS_DIR}/{name}")
    with suppress(FileNotFoundError):
        if not location.listdir(WORKERS_DIR):
            location.remove_tree(WORKERS_DIR)
