"""Reading a store: open it (version checked), random access by global sample index, iteration by shard.

A global sample index maps to (shard, row) through the cumulative shard sizes of the manifest. Dense arrays
are sliced per row; sampled targets are flat, so a row's entries are found through `sampled_offsets`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from functools import cached_property

import numpy as np
import zarr

from storage.fs import Location
from storage.integrity import StoreDamaged, axis_lengths, check_files, damaged, shape_problem
from storage.layout import MANIFEST_NAME, ArraySpec
from storage.manifest import Manifest, ShardInfo
from storage.stats import STATS_PREFIX
from storage.targets import array_specs, sample_stats, stat_names
from storage.targets.sampled import FLAT_ARRAYS
from storage.targets.topk import (
    TOPK_EXCESS,
    TOPK_FLOOR,
    TOPK_LOGPROBS,
    join_logprobs,
    logical_names,
    logical_sizes,
    physical_names,
)
from storage.workers import unmerged_message


class ShardReader:
    """One committed shard; arrays are opened lazily and read through zarr.

    `read` and `sample` return the sample arrays (`array_names`, logical: a version 3 shard's top-k log-probs,
    stored as a floor and excesses, come back joined as `topk_logprobs`); `stats` the per-sample statistics.
    Before an array is first read, its files are checked against the manifest (`storage.integrity.check_files`:
    present with their recorded size, and with `verify` their SHA-256) and its shape and dtype against what the
    store's options make them; any failure is a `StoreDamaged` naming the store, the shard and the array.

    Args:
        location: the store.
        info: the shard's manifest entry.
        specs: the arrays of the store's shards (`storage.targets.array_specs`).
        dims: the store-wide lengths of the axis letters of `specs` (`axis_lengths`); `S` is this shard's.
        targets: the manifest's targets section.
        names: the stored arrays this reader reads (default: every array of `specs`).
        verify: check each file's SHA-256 before its first read in this process.
    """

    def __init__(self, location: Location, info: ShardInfo, specs: dict[str, ArraySpec], dims: dict[str, int], *,
                 targets: dict | None = None, stored_stats: bool = True, names: list[str] | None = None,
                 verify: bool = True):
        self.location = location
        self.info = info
        self.specs = specs
        self.dims = {**dims, "S": info.num_samples, "S+1": info.num_samples + 1}
        names = list(specs) if names is None else names
        self.array_names = logical_names([name for name in names if not name.startswith(STATS_PREFIX)])
        self.split_logprobs = TOPK_EXCESS in names
        self.targets = targets or {}
        self.stored_stats = stored_stats
        self.verify = verify
        self._arrays: dict[str, zarr.Array] = {}

    def __len__(self) -> int:
        return self.info.num_samples

    @cached_property
    def _group(self) -> zarr.Group:
        group_files = {rel: digest for rel, digest in self.info.files.items() if rel == "zarr.json"}
        if not group_files:
            raise damaged(self.location, f"{self.info.name}:", "lists no zarr.json in its manifest entry")
        check_files(self.location, self.info.name, group_files, None, verify=self.verify, what="the group")
        try:
            return self.location.open_group(self.info.name, mode="r")
        except Exception as exc:  # zarr's errors for a damaged group: JSON, KeyError, FileNotFoundError, ...
            raise damaged(self.location, f"{self.info.name}:", f"cannot be opened ({type(exc).__name__}: {exc})") \
                from exc

    def array(self, name: str) -> zarr.Array:
        """The zarr array `name` of this shard, its files and shape checked (see the class)."""
        if name not in self._arrays:
            spec = self.specs.get(name)
            if spec is None:
                raise KeyError(f"{name!r} is not an array of this store's shards ({', '.join(self.specs)})")
            files = {rel: d for rel, d in self.info.files.items() if rel.split("/", 1)[0] == name}
            what = f"array {name}"
            if f"{name}/zarr.json" not in files:
                raise damaged(self.location, f"{self.info.name}, {what}:", "has no files in its manifest entry")
            check_files(self.location, self.info.name, files, self.info.array_bytes.get(name), verify=self.verify,
                        what=what)
            try:
                array = self._group[name]
            except Exception as exc:
                raise damaged(self.location, f"{self.info.name}, {what}:",
                              f"cannot be opened ({type(exc).__name__}: {exc})") from exc
            if problem := shape_problem(spec, array, self.dims):
                raise damaged(self.location, f"{self.info.name}, {what}:", problem)
            self._arrays[name] = array
        return self._arrays[name]

    def _get(self, name: str, rows: slice | tuple = slice(None)) -> np.ndarray:
        """Decode rows of array `name`; a failure of zarr's names the array."""
        array = self.array(name)
        try:
            return array[rows]
        except Exception as exc:  # zarr's errors for damaged chunks: checksums, short reads, codec failures
            raise damaged(self.location, f"{self.info.name}, array {name}:",
                          f"cannot be decoded ({type(exc).__name__}: {exc})") from exc

    @cached_property
    def _offsets(self) -> np.ndarray:
        offsets = self._get("sampled_offsets").astype(np.int64)
        entries = self.array("sampled_ids").shape[0]
        if offsets[0] != 0 or offsets[-1] != entries or np.any(np.diff(offsets) < 0):
            raise damaged(self.location, f"{self.info.name}, array sampled_offsets:",
                          f"does not locate the {entries} sampled entries (offsets {offsets[0]} .. {offsets[-1]})")
        return offsets

    def read(self, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """Every array for a contiguous range of rows. Flat sampled arrays cover exactly those rows' entries."""
        start, stop, step = rows.indices(len(self))
        assert step == 1, "rows must be contiguous"
        out = {}
        for name in self.array_names:
            if name in FLAT_ARRAYS:
                out[name] = self._get(name, slice(int(self._offsets[start]), int(self._offsets[stop])))
            elif name == "sampled_offsets":
                out[name] = (self._offsets[start:stop + 1] - self._offsets[start]).astype(np.uint64)
            elif name == TOPK_LOGPROBS and self.split_logprobs:
                out[name] = join_logprobs(self._get(TOPK_FLOOR, slice(start, stop)),
                                          self._get(TOPK_EXCESS, slice(start, stop)))
            else:
                out[name] = self._get(name, slice(start, stop))
        return out

    def stats(self) -> dict[str, np.ndarray]:
        """The per-sample statistics arrays (`storage/stats.py`) of every row.

        Read from the shard (format version 2), or computed from its targets (version 1: decodes them).
        """
        if self.stored_stats:
            return {name: self._get(name) for name in stat_names(self.targets)}
        needed = ["input_ids", "loss_mask", "entropy", "true_logprob", "topk_ids", "topk_logprobs", "tail_logmass"]
        return sample_stats({name: self._get(name) for name in needed if name in self.array_names}, self.targets)

    def sample(self, row: int) -> dict[str, np.ndarray]:
        """One sample; its leading sample axis is dropped, flat sampled arrays hold its entries."""
        record = self.read(slice(row, row + 1))
        return {k: v if k in FLAT_ARRAYS or k == "sampled_offsets" else v[0] for k, v in record.items()}


class Store:
    """A teacher-cache store opened for reading.

    Opening checks the manifest (its digest, names and counts: `storage.integrity`); reading checks each file's
    size, and with `verify` its SHA-256, before the file is first read in this process.

    Args:
        url: local path or fsspec URL of the store.
        allow_incomplete: read the committed shards of a build still running or interrupted.
        verify: check each file's SHA-256 against the manifest before its first read (off: presence and size only).

    Raises:
        StoreDamaged: the manifest is damaged or contradicts itself, or (when read) a file or array disagrees with it.
    """

    def __init__(self, url: str | os.PathLike, *, allow_incomplete: bool = False, verify: bool = True):
        self.location = Location(url)
        self.verify_reads = verify
        if not self.location.exists(MANIFEST_NAME) and (unmerged := unmerged_message(self.location)):
            raise RuntimeError(unmerged)
        self.manifest = Manifest.load(self.location)
        if not self.manifest.complete and not allow_incomplete:
            raise RuntimeError(
                f"{self.location} is incomplete ({len(self.manifest.shards)} shards committed): its build was "
                "interrupted or is still running. Finish it with `teacher-cache build ... --resume`."
            )
        targets = self.manifest.targets
        self.specs = array_specs(
            vocab_size=self.manifest.teacher["vocab_size"],
            targets=targets,
            format_version=self.manifest.format_version,
        )
        self.has_stored_stats = self.manifest.format_version >= 2
        self.dims = axis_lengths(self.manifest)
        self._check_shard_entries()
        self.shards = [self._reader(info) for info in self.manifest.shards]
        self._starts = np.cumsum([0] + [s.num_samples for s in self.manifest.shards])

    def _reader(self, info: ShardInfo, names: list[str] | None = None) -> ShardReader:
        return ShardReader(self.location, info, self.specs, self.dims, targets=self.manifest.targets,
                           stored_stats=self.has_stored_stats, names=names, verify=self.verify_reads)

    def _check_shard_entries(self) -> None:
        """Every shard entry names exactly the store's arrays: the manifest's options agree with its shards."""
        expected = set(self.specs)
        for info in self.manifest.shards:
            listed = set(info.array_bytes)
            stored = {rel.split("/", 1)[0] for rel in info.files if "/" in rel}
            if listed != expected or stored != expected:
                differ = sorted((listed | stored) ^ expected)
                raise StoreDamaged(
                    f"{self.location}/{MANIFEST_NAME}: {info.name} lists the arrays {sorted(listed | stored)}, but the "
                    f"store's options (teacher vocab, targets, format version {self.manifest.format_version}) make "
                    f"them {sorted(expected)} (differing: {', '.join(differ)}). The manifest contradicts itself: "
                    "restore it from a copy of the store, or rebuild the store."
                )

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        shard, row = self.locate(index)
        return self.shards[shard].sample(row)

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row) of a global sample index."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for a store of {len(self)} samples")
        index %= len(self)
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, index - int(self._starts[shard])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for shard in self.shards:
            for row in range(len(shard)):
                yield shard.sample(row)

    def iter_shards(self) -> Iterator[ShardReader]:
        return iter(self.shards)

    def read_rows(self, start: int, stop: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays `names` (default: every sample array) of the global samples [start, stop), across shards.

        Dense arrays have a leading axis of stop - start rows; the flat sampled arrays hold exactly those rows'
        entries, in order (`sampled_offsets` is not returned: `sampled_nunique` locates the entries).
        """
        names = [name for name in (names or self.shards[0].array_names) if name != "sampled_offsets"]
        parts, first = [], 0
        for shard in self.shards:
            lo, hi = max(start - first, 0), min(stop - first, len(shard))
            if lo < hi:
                parts.append(self._reader(shard.info, physical_names(names, self.specs)).read(slice(lo, hi)))
            first += len(shard)
        return {name: np.concatenate([part[name] for part in parts]) for name in names}

    def stats(self) -> dict[str, np.ndarray]:
        """Per-sample statistics of every sample, in global order (see `storage/stats.py`).

        Reads only the statistics arrays; a version 1 store has none, and they are computed from its targets.
        """
        parts = [shard.stats() for shard in self.shards]
        if not parts:
            empty = sample_stats(_empty_record(self.manifest), self.manifest.targets)
            return empty
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def bytes_per_token(self) -> dict[str, float]:
        """Stored bytes per trained token (loss-mask position) for each logical array (a version 3 store's top-k
        log-prob floor and excesses count as `topk_logprobs`), and in total."""
        tokens = max(self.manifest.num_tokens, 1)
        totals = logical_sizes({name: sum(s.array_bytes.get(name, 0) for s in self.manifest.shards)
                                for name in self.specs})
        out = {name: b / tokens for name, b in totals.items()}
        out["total"] = sum(totals.values()) / tokens
        return out

    def verify(self) -> list[str]:
        """Check the whole store against its manifest; returns the problems found (empty when the store is intact).

        The manifest itself was checked when the store was opened (its digest, names and totals). Here every
        listed file is hashed and compared with its SHA-256, files the manifest does not list are named, and each
        intact shard's arrays are opened: shapes and dtypes against the store's options, the trained tokens
        against `num_tokens` (and `stats_num_tokens`), the sampled offsets against the entries.
        """
        return [problem for problems in self.damaged_shards().values() for problem in problems]

    def damaged_shards(self) -> dict[str, list[str]]:
        """The problems `verify` finds, by the name of the shard they are in (only shards with problems)."""
        found = {info.name: self._file_problems(info) for info in self.manifest.shards}
        found = {info.name: found[info.name] or self._shard_problems(info) for info in self.manifest.shards}
        return {name: problems for name, problems in found.items() if problems}

    def _file_problems(self, info: ShardInfo) -> list[str]:
        """Files of one shard that are missing, do not match their checksum, or are not in the manifest."""
        if not self.location.exists(info.name):
            return [f"{info.name}: missing"]
        found = set(self.location.files(info.name))
        problems = []
        for rel, digest in info.files.items():
            if rel not in found:
                problems.append(f"{info.name}/{rel}: missing")
            elif self.location.sha256(f"{info.name}/{rel}") != digest:
                problems.append(f"{info.name}/{rel}: checksum mismatch")
        return problems + [f"{info.name}/{rel}: not in the manifest" for rel in sorted(found - set(info.files))]

    def _shard_problems(self, info: ShardInfo) -> list[str]:
        """Shapes and counts of one shard whose files match their checksums, as `StoreDamaged` messages."""
        reader = ShardReader(self.location, info, self.specs, self.dims, targets=self.manifest.targets,
                             stored_stats=self.has_stored_stats, verify=False)
        try:
            for name in self.specs:
                reader.array(name)
            per_sample = reader._get("loss_mask").sum(axis=1)
            if int(per_sample.sum()) != info.num_tokens:
                return [f"{info.name}: loss_mask sets {int(per_sample.sum())} positions, the manifest records "
                        f"num_tokens {info.num_tokens}"]
            if "stats_num_tokens" in self.specs and not np.array_equal(reader._get("stats_num_tokens"), per_sample):
                return [f"{info.name}: stats_num_tokens disagrees with loss_mask"]
            if "sampled_offsets" in self.specs:
                reader._offsets  # noqa: B018 (checks the offsets against the entries)
        except StoreDamaged as exc:
            return [exc.problem]
        return []


def _empty_record(manifest: Manifest) -> dict[str, np.ndarray]:
    seq_len, k = manifest.build.get("seq_len", 1), manifest.targets.get("topk", {}).get("k", 1)
    return {"input_ids": np.zeros((0, seq_len + 1), np.int64), "loss_mask": np.zeros((0, seq_len), bool),
            "entropy": np.zeros((0, seq_len), np.float32), "true_logprob": np.zeros((0, seq_len), np.float32),
            "topk_ids": np.zeros((0, seq_len, k), np.int64), "topk_logprobs": np.zeros((0, seq_len, k), np.float16),
            "tail_logmass": np.zeros((0, seq_len), np.float32)}


def open_store(url: str | os.PathLike, *, allow_incomplete: bool = False, verify: bool = True) -> Store:
    """Open a store for reading; see `Store`."""
    return Store(url, allow_incomplete=allow_incomplete, verify=verify)
