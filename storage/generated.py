"""The dataset that `teacher-cache generate` writes: a teacher's answers to prompts, as Parquet shards of
conversations that `teacher-cache build` then reads like any other `messages` dataset.

Layout (specified in `storage/FORMAT.md`, "Generated datasets"):

    OUT/
      header.json                 the run's options, written when the output is created; --resume must match them
      data/shard-NNNNN.parquet    the rows of prompts [N*P, (N+1)*P), P = prompts_per_shard
      data/shard-NNNNN.json       the shard's sidecar (rows, SHA-256 of the Parquet file, filter counts): its commit
      generation.json             the manifest, written last: the commit point of the whole output

Shards are the unit of work, as in a build shared by workers (`storage/workers.py`): worker I of W writes the
shards s with s % W == I under its own lock, each as a Parquet file replaced atomically and then its sidecar. A
resumed worker keeps the shards whose sidecar matches their Parquet file and writes the others again. Whoever
finds every sidecar in place writes `generation.json` (the header, the shards, totals and its own SHA-256); two
workers that finish at once write the same bytes. `read_generated` checks all of it before it returns a row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import ExitStack

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from storage.fs import Location
from storage.integrity import DIGEST_KEY, StoreDamaged, canonical_digest
from storage.lock import OutputLock, is_lock_file, lock_name
from storage.manifest import header_differences

log = logging.getLogger(__name__)

FORMAT_NAME = "teacher-cache-generated"
FORMAT_VERSION = 2
# Versions this release reads. Version 1 lacks `prompt_token_ids`: its replies can be built on as text only, not as
# rollouts (`storage.rollouts`).
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "generation.json"
HEADER_NAME = "header.json"
DATA_DIR = "data"
# Keys the writer puts next to the caller's header in the manifest; a header must not use them.
_MANIFEST_KEYS = ("format", "format_version", "shards", "rows", "counts", DIGEST_KEY)

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
# One row per response: the conversation (prompt turns, then the generated assistant turn) and what the generator
# reported about it. Every shard has exactly this schema, so the shards concatenate.
ROW_SCHEMA = pa.schema([
    pa.field("messages", pa.list_(_MESSAGE), nullable=False),
    pa.field("prompt_id", pa.int64(), nullable=False),
    pa.field("response_index", pa.int32(), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("response_token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("response_logprobs", pa.list_(pa.float32()), nullable=False),
    pa.field("sampling_logprobs", pa.list_(pa.float32())),  # null where the generator cannot give them
    pa.field("prompt_tokens", pa.int32(), nullable=False),
    pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),  # as the generator read them (version 2)
])


def shard_path(shard: int) -> str:
    """The Parquet file of a shard, relative to the output."""
    return f"{DATA_DIR}/shard-{shard:05d}.parquet"


def sidecar_path(shard: int) -> str:
    """The sidecar of a shard (its commit), relative to the output."""
    return f"{DATA_DIR}/shard-{shard:05d}.json"


def shard_prompts(shard: int, *, prompts_per_shard: int, num_prompts: int) -> range:
    """The prompt ids whose responses shard `shard` holds."""
    return range(shard * prompts_per_shard, min((shard + 1) * prompts_per_shard, num_prompts))


def num_shards(*, prompts_per_shard: int, num_prompts: int) -> int:
    return -(-num_prompts // prompts_per_shard)


class GeneratedWriter:
    """Writes one worker's shards of a generated dataset. Made by `open`, which takes the lock; use it as a context
    manager, whose exit releases the lock."""

    def __init__(self, location: Location, header: dict, lock: OutputLock, *, worker_index: int, num_workers: int):
        self.location = location
        self.header = header
        self.worker_index = worker_index
        self.num_workers = num_workers
        self._lock = lock

    @classmethod
    def open(cls, output: str | os.PathLike, header: dict, *, resume: bool, worker_index: int = 0,
             num_workers: int = 1, prompts_per_shard: int, num_prompts: int) -> GeneratedWriter:
        """Lock the output (this worker's part of it when `num_workers` > 1), check it and create it if needed.

        Args:
            output: the output directory (or fsspec URL).
            header: what the output's content depends on (generator, sampling, prompts, filters, ...), as plain
                JSON values; `prompts_per_shard` and `num_prompts` are added to it.
            resume: continue an output that exists (with an equal header); its committed shards are kept.
            worker_index: this worker's index I; it writes the shards s with s % num_workers == I.
            num_workers: how many workers write the output together.
            prompts_per_shard: prompts whose responses go into one shard.
            num_prompts: prompts in all (ids 0 .. num_prompts - 1).

        Raises:
            ValueError: the output exists and `resume` is off (for a worker of several: it has written shards
                already), holds files of something else, or was started with another header (every difference
                named). Nothing is written or removed then.
            LockError: another process writes the output (or this worker's part of it).
            StoreDamaged: the output's header.json is not valid JSON.
        """
        assert not set(header) & set(_MANIFEST_KEYS), f"the header must not hold {_MANIFEST_KEYS}"
        sizes = {"prompts_per_shard": prompts_per_shard, "num_prompts": num_prompts}
        assert all(header.get(key, value) == value for key, value in sizes.items()), (header, sizes)
        # As JSON gives it back (tuples become lists), so that a resumed run compares equal values.
        header = json.loads(json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **header, **sizes}))
        location = Location(output)
        lock = OutputLock(location, lock_name(worker_index) if num_workers > 1 else lock_name())
        writer = cls(location, header, lock, worker_index=worker_index, num_workers=num_workers)
        with ExitStack() as stack:
            stack.enter_context(lock)
            writer._prepare(resume)
            stack.pop_all()  # keep the lock: the caller's `with` releases it
        return writer

    def __enter__(self) -> GeneratedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._lock.__exit__(exc_type, exc, tb)

    @property
    def num_shards(self) -> int:
        return num_shards(prompts_per_shard=self.header["prompts_per_shard"], num_prompts=self.header["num_prompts"])

    def shard_prompts(self, shard: int) -> range:
        """The prompt ids of a shard."""
        return shard_prompts(shard, prompts_per_shard=self.header["prompts_per_shard"],
                             num_prompts=self.header["num_prompts"])

    def pending(self) -> list[int]:
        """This worker's shards that are not committed yet, ascending: no sidecar, or a Parquet file that does not
        match it (a kill between the two writes, or damage)."""
        return [shard for shard in self._owned() if not self._committed(shard)]

    def write_shard(self, shard: int, rows: list[dict], counts: dict[str, int]) -> None:
        """Write and commit one of this worker's shards.

        Args:
            shard: the shard's index.
            rows: its rows (the columns of `ROW_SCHEMA`), in (prompt_id, response_index) order, all of prompts of
                `shard_prompts(shard)`.
            counts: the shard's filter counts (e.g. responses kept, and dropped per reason).
        """
        assert shard in self._owned(), f"shard {shard} is not worker {self.worker_index}'s"
        prompts = self.shard_prompts(shard)
        keys = [(row["prompt_id"], row["response_index"]) for row in rows]
        assert keys == sorted(keys) and all(key[0] in prompts for key in keys), (shard, keys[:5])
        table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
        assert all(table.column(f.name).null_count == 0 for f in ROW_SCHEMA if not f.nullable), "a value is missing"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        # A finished output whose damaged shard is written again is unfinished until `finish` lists the new file.
        self.location.remove_file(MANIFEST_NAME)
        self.location.write_bytes_atomic(shard_path(shard), data)  # in place, not yet committed
        sidecar = {"path": shard_path(shard), "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest(),
                   "prompts": [prompts.start, prompts.stop], "counts": dict(counts)}
        self.location.write_bytes_atomic(sidecar_path(shard), _dumps(sidecar))  # the shard's commit
        log.debug("committed shard %d: %d rows of prompts [%d, %d)", shard, len(rows), prompts.start, prompts.stop)

    def finish(self) -> dict | None:
        """Write `generation.json` once every shard (of every worker) is committed, and return it; None (and log
        which shards are missing) before that.

        Raises:
            StoreDamaged: a sidecar is not valid.
        """
        sidecars = {shard: read_sidecar(self.location, shard) for shard in range(self.num_shards)}
        if missing := [shard for shard, sidecar in sidecars.items() if sidecar is None]:
            workers = sorted({shard % self.num_workers for shard in missing})
            log.info("%s: %d of %d shards written; waiting for shards %s (of workers %s of %d)", self.location,
                     self.num_shards - len(missing), self.num_shards, _listing(missing), _listing(workers),
                     self.num_workers)
            return None
        manifest = _manifest(self.header, sidecars)
        self.location.write_bytes_atomic(MANIFEST_NAME, _dumps(manifest))  # the commit point of the whole output
        log.info("%s: finished: %d rows in %d shards", self.location, manifest["rows"], self.num_shards)
        return manifest

    def _owned(self) -> list[int]:
        return list(range(self.worker_index, self.num_shards, self.num_workers))

    def _prepare(self, resume: bool) -> None:
        """Check the output (lock held), create it when new, and remove this worker's stray temporary files."""
        entries = [entry for entry in self.location.listdir() if not is_lock_file(entry)]
        if HEADER_NAME in entries:
            self._check_existing(resume)
        elif entries:
            raise ValueError(f"Output {self.location} holds files of no `teacher-cache generate` output "
                             f"({', '.join(entries[:5])}). Choose another --output.")
        else:
            self.location.write_bytes_atomic(HEADER_NAME, _dumps(self.header))
        self.location.makedirs(DATA_DIR)
        for shard in self._owned():
            for rel in self.location.temporaries(shard_path(shard)) + self.location.temporaries(sidecar_path(shard)):
                log.info("removing %s/%s, left by an interrupted write", self.location, rel)
                self.location.remove_file(rel)

    def _check_existing(self, resume: bool) -> None:
        """Refuse an output that exists, unless resumed (or joined by another worker) with an equal header."""
        stored = _read_json(self.location, HEADER_NAME, fix="restore it, or choose another --output")
        if not resume and self.num_workers == 1:
            raise ValueError(f"Output {self.location} already holds a `teacher-cache generate` output. Pass --resume "
                             "to continue it, or choose another --output.")
        if not resume and self._started():
            raise ValueError(f"Worker {self.worker_index} of {self.num_workers} has already written to "
                             f"{self.location}. Pass --resume to continue it, or choose another --output.")
        if diffs := header_differences(stored, self.header, old_name="the output", new_name="this run"):
            action = "resume" if resume else f"join worker {self.worker_index} of {self.num_workers} to"
            raise ValueError(f"Cannot {action} {self.location}: it was started with other options.\n  "
                             + "\n  ".join(diffs) + "\nUse the options it was started with, or choose another "
                             "--output.")

    def _started(self) -> bool:
        """Whether the output is finished or holds a shard (committed or not) of this worker."""
        return self.location.exists(MANIFEST_NAME) or any(
            self.location.exists(rel) for shard in self._owned() for rel in (shard_path(shard), sidecar_path(shard)))

    def _committed(self, shard: int) -> bool:
        try:
            sidecar = read_sidecar(self.location, shard)
        except StoreDamaged as exc:
            log.warning("%s: writing shard %d again", exc.problem, shard)
            return False
        if sidecar is None:
            if self.location.exists(shard_path(shard)):
                log.info("%s/%s has no sidecar (its write was interrupted): writing it again", self.location,
                         shard_path(shard))
            return False
        if not self.location.exists(shard_path(shard)) or self.location.sha256(shard_path(shard)) != sidecar["sha256"]:
            log.warning("%s/%s is missing or does not match the SHA-256 of its sidecar: writing it again",
                        self.location, shard_path(shard))
            return False
        return True


def read_sidecar(location: Location, shard: int) -> dict | None:
    """A shard's sidecar; None when the shard is not committed.

    Raises:
        StoreDamaged: the sidecar is not valid JSON with `rows`, `sha256` and `counts`.
    """
    rel = sidecar_path(shard)
    if not location.exists(rel):
        return None
    fix = "rerun `teacher-cache generate` with --resume to write the shard again"
    sidecar = _read_json(location, rel, fix=fix)
    if not (isinstance(sidecar, dict) and _whole(sidecar.get("rows")) and isinstance(sidecar.get("sha256"), str)
            and isinstance(sidecar.get("counts"), dict)):
        raise _damaged(location, rel, "is not a shard sidecar (an object with rows, sha256 and counts)", fix)
    return sidecar


def _manifest(header: dict, sidecars: dict[int, dict]) -> dict:
    """The manifest of a finished output: the header, the shards in order, totals, and its own digest."""
    shards = []
    for shard, sidecar in sorted(sidecars.items()):
        prompts = shard_prompts(shard, prompts_per_shard=header["prompts_per_shard"],
                                num_prompts=header["num_prompts"])
        shards.append({"path": shard_path(shard), "rows": sidecar["rows"], "sha256": sidecar["sha256"],
                       "prompts": [prompts.start, prompts.stop], "counts": sidecar["counts"]})
    manifest = {**header, "shards": shards, "rows": sum(s["rows"] for s in shards), "counts": _totals(shards)}
    manifest[DIGEST_KEY] = canonical_digest(manifest)
    return manifest


def _totals(shards: list[dict]) -> dict[str, int]:
    """Each filter count summed over the shards (a count a shard lacks is 0 there)."""
    totals: dict[str, int] = {}
    for shard in shards:
        for key, value in shard["counts"].items():
            totals[key] = totals.get(key, 0) + value
    return dict(sorted(totals.items()))


def is_generated(path: str | os.PathLike) -> bool:
    """Whether `path` holds a `teacher-cache generate` output: finished (generation.json) or not (header.json)."""
    location = Location(path)
    return location.exists(MANIFEST_NAME) or location.exists(HEADER_NAME)


def read_generated(path: str | os.PathLike) -> tuple[datasets.Dataset, dict]:
    """The rows of a finished generated dataset, checked, and its manifest.

    Returns:
        The rows in shard order (prompt order, then response order) as a `datasets.Dataset` whose fingerprint is
        the manifest's `manifest_sha256`, and the manifest.

    Raises:
        ValueError: `path` is no generated dataset, an unfinished one (naming the missing shards), or one of a
            format version this release does not read.
        StoreDamaged: the manifest was edited or contradicts itself, or a shard is missing, does not match its
            SHA-256 or holds another number of rows; naming the file.
    """
    location = Location(path)
    manifest = load_manifest(location)
    tables = [_read_shard(location, entry) for entry in manifest["shards"]]
    table = pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()
    return datasets.Dataset(table, fingerprint=manifest[DIGEST_KEY]), manifest


def load_manifest(location: Location) -> dict:
    """The checked manifest of a finished generated dataset (see `read_generated` for what is checked)."""
    if not location.exists(MANIFEST_NAME):
        if location.exists(HEADER_NAME):
            raise ValueError(_unfinished(location))
        raise ValueError(f"{location} is not a `teacher-cache generate` output: it has no {MANIFEST_NAME}.")
    fix = f"rerun `teacher-cache generate` with --resume, which writes {MANIFEST_NAME} again from the shards"
    manifest = _read_json(location, MANIFEST_NAME, fix=fix)
    source = f"{location}/{MANIFEST_NAME}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{source} is not a {FORMAT_NAME} manifest (format={found!r}).")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{source} has format version {manifest.get('format_version')!r}; this release reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))}. Upgrade teacher-cache to read it.")
    if manifest.get(DIGEST_KEY) != canonical_digest({k: v for k, v in manifest.items() if k != DIGEST_KEY}):
        raise _damaged(location, MANIFEST_NAME, f"does not match its {DIGEST_KEY}: it was edited or damaged after "
                       "it was written, so none of its names, counts or checksums can be trusted", fix)
    if problems := manifest_problems(manifest):
        raise _damaged(location, MANIFEST_NAME, "contradicts itself: " + "; ".join(problems), fix)
    return manifest


def manifest_problems(manifest: dict) -> list[str]:
    """Every way a manifest contradicts itself: shard paths other than data/shard-NNNNN.parquet in order (so no
    path leaves the output), prompt ranges or a shard count other than the sizes give, totals other than the sums."""
    if problem := _sizes_problem(manifest):
        return [problem]
    per_shard, total = manifest["prompts_per_shard"], manifest["num_prompts"]
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(entry, dict) for entry in shards):
        return ["`shards` is not a list of objects"]
    expected = num_shards(prompts_per_shard=per_shard, num_prompts=total)
    problems = [] if len(shards) == expected else [
        f"it lists {len(shards)} shards; {total} prompts in shards of {per_shard} make {expected}"]
    for index, entry in enumerate(shards):
        prompts = shard_prompts(index, prompts_per_shard=per_shard, num_prompts=total)
        if entry.get("path") != shard_path(index):
            problems.append(f"shard {index} has path {entry.get('path')!r}, not {shard_path(index)!r} (shards are "
                            f"{DATA_DIR}/shard-NNNNN.parquet inside the output, in order)")
        if entry.get("prompts") != [prompts.start, prompts.stop]:
            problems.append(f"shard {index} holds prompts {entry.get('prompts')!r}, not "
                            f"{[prompts.start, prompts.stop]}")
        counts = entry.get("counts")
        if not _whole(entry.get("rows")) or not isinstance(counts, dict) or not all(map(_whole, counts.values())):
            problems.append(f"shard {index}: rows {entry.get('rows')!r} or counts {counts!r} are not whole numbers")
    if problems:
        return problems
    if manifest.get("rows") != sum(entry["rows"] for entry in shards):
        problems.append(f"rows is {manifest.get('rows')!r}, the shards add up to {sum(e['rows'] for e in shards)}")
    if manifest.get("counts") != _totals(shards):
        problems.append(f"counts are {manifest.get('counts')!r}, the shards add up to {_totals(shards)}")
    return problems


def _sizes_problem(header: dict) -> str | None:
    """Why a header's `prompts_per_shard` and `num_prompts` give no shards (None when they do)."""
    per_shard, total = header.get("prompts_per_shard"), header.get("num_prompts")
    if _whole(per_shard) and per_shard >= 1 and _whole(total):
        return None
    return f"has prompts_per_shard {per_shard!r} and num_prompts {total!r}, not whole numbers (>= 1, >= 0)"


def _read_shard(location: Location, entry: dict) -> pa.Table:
    """One shard's rows, after checking its bytes against the manifest's SHA-256 and its rows against its count."""
    rel, fix = entry["path"], "rerun `teacher-cache generate` with --resume to write the shard again"
    if not location.exists(rel):
        raise _damaged(location, rel, "is missing", fix)
    data = location.read_bytes(rel)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise _damaged(location, rel, f"does not match its SHA-256 in {MANIFEST_NAME}", fix)
    table = pq.read_table(pa.BufferReader(data))
    if table.num_rows != entry["rows"]:
        raise _damaged(location, rel, f"holds {table.num_rows} rows, {MANIFEST_NAME} records {entry['rows']}", fix)
    return table


def _unfinished(location: Location) -> str:
    """Why an output with header.json and no generation.json cannot be read, and what to do."""
    fix = "restore it, or generate the dataset again"
    header = _read_json(location, HEADER_NAME, fix=fix)
    if not isinstance(header, dict) or (problem := _sizes_problem(header)):
        raise _damaged(location, HEADER_NAME, problem or "is not a JSON object", fix)
    count = num_shards(prompts_per_shard=header["prompts_per_shard"], num_prompts=header["num_prompts"])
    missing = [shard for shard in range(count) if not location.exists(sidecar_path(shard))]
    if not missing:
        return (f"{location} is an unfinished `teacher-cache generate` output: all {count} shards are written, but "
                f"not {MANIFEST_NAME}. Rerun `teacher-cache generate` (any of its workers) with --resume to finish it.")
    return (f"{location} is an unfinished `teacher-cache generate` output: it has no {MANIFEST_NAME}, and shards "
            f"{_listing(missing)} of 0..{count - 1} are missing. Rerun `teacher-cache generate` with the same "
            "options and --resume to write them; with several workers, resume the workers that own them (shard s "
            f"is worker s % W's): the last one to finish writes {MANIFEST_NAME}.")


def _read_json(location: Location, rel: str, *, fix: str) -> object:
    try:
        return json.loads(location.read_bytes(rel))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(location, rel, f"is not valid JSON ({exc})", fix) from None


def _damaged(location: Location, rel: str, problem: str, fix: str) -> StoreDamaged:
    return StoreDamaged(f"{location}/{rel} {problem}. The generated dataset is damaged: {fix}, or restore it from a "
                        "copy.", problem=f"{location}/{rel} {problem}")


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _listing(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:10]))
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > 10 else "")


def _dumps(data: dict) -> bytes:
    return json.dumps(data, indent=1).encode()
