"""Reading a store: open it (version checked), random access by global sample index, iteration by shard.

A global sample index maps to (shard, row) through the cumulative shard sizes of the manifest. Dense arrays
are sliced per row; sampled targets are flat, so a row's entries are found through `sampled_offsets`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from functools import cached_property

import numpy as np

from storage.fs import Location
from storage.layout import (
    FLAT_ARRAYS,
    MANIFEST_NAME,
    TOPK_EXCESS,
    TOPK_FLOOR,
    TOPK_LOGPROBS,
    array_specs,
    join_logprobs,
    logical_names,
    logical_sizes,
    physical_names,
)
from storage.manifest import Manifest, ShardInfo
from storage.stats import STATS_PREFIX, sample_stats, stat_names
from storage.workers import unmerged_message


class ShardReader:
    """One committed shard; arrays are opened lazily and read through zarr.

    `read` and `sample` return the sample arrays (`array_names`, logical: a version 3 shard's top-k log-probs,
    stored as a floor and excesses, come back joined as `topk_logprobs`); `stats` the per-sample statistics.
    """

    def __init__(self, location: Location, info: ShardInfo, array_names: list[str], targets: dict | None = None,
                 stored_stats: bool = True):
        self.location = location
        self.info = info
        self.array_names = logical_names([name for name in array_names if not name.startswith(STATS_PREFIX)])
        self.split_logprobs = TOPK_EXCESS in array_names
        self.targets = targets or {}
        self.stored_stats = stored_stats

    def __len__(self) -> int:
        return self.info.num_samples

    @cached_property
    def _group(self):
        return self.location.open_group(self.info.name, mode="r")

    def array(self, name: str):
        """The zarr array `name` of this shard."""
        return self._group[name]

    @cached_property
    def _offsets(self) -> np.ndarray:
        return self._group["sampled_offsets"][:].astype(np.int64)

    def read(self, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """Every array for a contiguous range of rows. Flat sampled arrays cover exactly those rows' entries."""
        start, stop, step = rows.indices(len(self))
        assert step == 1, "rows must be contiguous"
        out = {}
        for name in self.array_names:
            if name in FLAT_ARRAYS:
                out[name] = self._group[name][int(self._offsets[start]):int(self._offsets[stop])]
            elif name == "sampled_offsets":
                out[name] = (self._offsets[start:stop + 1] - self._offsets[start]).astype(np.uint64)
            elif name == TOPK_LOGPROBS and self.split_logprobs:
                out[name] = join_logprobs(self._group[TOPK_FLOOR][start:stop], self._group[TOPK_EXCESS][start:stop])
            else:
                out[name] = self._group[name][start:stop]
        return out

    def stats(self) -> dict[str, np.ndarray]:
        """The per-sample statistics arrays (`storage/stats.py`) of every row.

        Read from the shard (format version 2), or computed from its targets (version 1: decodes them).
        """
        if self.stored_stats:
            return {name: self._group[name][:] for name in stat_names(self.targets)}
        needed = ["input_ids", "loss_mask", "entropy", "true_logprob", "topk_ids", "topk_logprobs", "tail_logmass"]
        return sample_stats({name: self._group[name][:] for name in needed if name in self.array_names}, self.targets)

    def sample(self, row: int) -> dict[str, np.ndarray]:
        """One sample; its leading sample axis is dropped, flat sampled arrays hold its entries."""
        record = self.read(slice(row, row + 1))
        return {k: v if k in FLAT_ARRAYS or k == "sampled_offsets" else v[0] for k, v in record.items()}


class Store:
    """A teacher-cache store opened for reading.

    Args:
        url: local path or fsspec URL of the store.
        allow_incomplete: read the committed shards of a build still running or interrupted.
    """

    def __init__(self, url: str | os.PathLike, *, allow_incomplete: bool = False):
        self.location = Location(url)
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
            hidden_dtype=targets.get("hidden_states", {}).get("dtype", "float16"),
            format_version=self.manifest.format_version,
        )
        self.has_stored_stats = self.manifest.format_version >= 2
        self.shards = [ShardReader(self.location, info, list(self.specs), targets, self.has_stored_stats)
                       for info in self.manifest.shards]
        self._starts = np.cumsum([0] + [s.num_samples for s in self.manifest.shards])

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
                parts.append(ShardReader(self.location, shard.info, physical_names(names, self.specs)).read(
                    slice(lo, hi)))
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
        """Recompute every file's SHA-256; returns the problems found (empty when the store is intact)."""
        problems = []
        for info in self.manifest.shards:
            if not self.location.exists(info.name):
                problems.append(f"{info.name}: missing")
                continue
            found = set(self.location.files(info.name))
            for rel, digest in info.files.items():
                if rel not in found:
                    problems.append(f"{info.name}/{rel}: missing")
                elif self.location.sha256(f"{info.name}/{rel}") != digest:
                    problems.append(f"{info.name}/{rel}: checksum mismatch")
            problems += [f"{info.name}/{rel}: not in the manifest" for rel in sorted(found - set(info.files))]
        return problems


def _empty_record(manifest: Manifest) -> dict[str, np.ndarray]:
    seq_len, k = manifest.build.get("seq_len", 1), manifest.targets.get("topk", {}).get("k", 1)
    return {"input_ids": np.zeros((0, seq_len + 1), np.int64), "loss_mask": np.zeros((0, seq_len), bool),
            "entropy": np.zeros((0, seq_len), np.float32), "true_logprob": np.zeros((0, seq_len), np.float32),
            "topk_ids": np.zeros((0, seq_len, k), np.int64), "topk_logprobs": np.zeros((0, seq_len, k), np.float16),
            "tail_logmass": np.zeros((0, seq_len), np.float32)}


def open_store(url: str | os.PathLike, *, allow_incomplete: bool = False) -> Store:
    """Open a store for reading; see `Store`."""
    return Store(url, allow_incomplete=allow_incomplete)
