"""The store's manifest: a versioned JSON index of what the store holds and how it was made.

It is the single source of truth: a shard exists for readers exactly when the manifest lists it. It carries
the teacher's identity, the dataset and build options, the target kinds with their parameters, and per shard
the sample and token counts, stored bytes per array and a SHA-256 of every file. A build shared by several
workers keeps one manifest of the same format per worker under `workers/` until they are merged
(`storage/workers.py`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from storage.fs import Location
from storage.integrity import DIGEST_KEY, StoreDamaged, canonical_digest, check_digest, manifest_problems
from storage.layout import (
    DIGESTED_VERSIONS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    READABLE_VERSIONS,
)

# Sections of the header that decide the store's content; a resumed build must match them exactly.
CONTENT_SECTIONS = ("teacher", "dataset", "build", "targets")

# Where the workers of a shared build keep their own manifests until the merge writes `manifest.json`.
WORKERS_DIR = "workers"
# The manifest of a store being made from other stores (`teacher-cache merge ... --output`) until it is finished:
# its shards commit here, and `manifest.json` is written last, so an interrupted merge never looks like a store.
MERGING_NAME = "merging.json"


@dataclass
class ShardInfo:
    """One committed shard.

    Attributes:
        name: store-relative path of the shard's Zarr group.
        num_samples: samples (rows) in the shard.
        num_positions: target positions (samples x seq_len).
        num_tokens: positions whose loss mask is set.
        array_bytes: stored (compressed) bytes per array.
        files: SHA-256 of every file of the shard, by path relative to the shard.
    """

    name: str
    num_samples: int
    num_positions: int
    num_tokens: int
    array_bytes: dict[str, int]
    files: dict[str, str]


@dataclass
class Manifest:
    """The parsed `manifest.json`.

    Attributes:
        teacher: teacher identity (path, backend, architecture, config/tokenizer hashes, vocab sizes).
        dataset: where the text came from (source, split, text field, fingerprint).
        build: options that shape the samples (seq_len, packing, batch size, shard size, seed, ...).
        targets: target kinds present and their parameters.
        shards: committed shards in sample order.
        complete: true once the build finished; an incomplete store can be resumed.
        worker: only in a worker's own manifest: {"index", "count", "stream_samples"} (samples in the whole
            stream, known once the worker has read it to the end).
    """

    teacher: dict
    dataset: dict
    build: dict
    targets: dict
    shards: list[ShardInfo] = field(default_factory=list)
    complete: bool = False
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    created_by: str = ""
    updated_at: str = ""
    worker: dict | None = None

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def num_positions(self) -> int:
        return sum(s.num_positions for s in self.shards)

    def header(self) -> dict:
        """The content-deciding sections, for comparing two builds."""
        return {name: getattr(self, name) for name in CONTENT_SECTIONS}

    def to_json(self) -> str:
        """The manifest as JSON; from format version 4 on, it ends with the digest of everything before it."""
        data = asdict(self)
        if self.worker is None:
            del data["worker"]
        data["totals"] = {"samples": self.num_samples, "positions": self.num_positions, "tokens": self.num_tokens}
        if self.format_version in DIGESTED_VERSIONS:
            data[DIGEST_KEY] = canonical_digest(data)
        return json.dumps(data, indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, *, source: str) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreDamaged(f"{source} is damaged: it is not valid JSON ({exc}).") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise RuntimeError(f"{source} is not a {FORMAT_NAME} manifest (format={found!r}).")
        version = data.get("format_version")
        if not isinstance(version, int) or version not in READABLE_VERSIONS:
            raise RuntimeError(
                f"{source} has format version {version}; this release reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))} (up to {FORMAT_VERSION}). Upgrade teacher-cache to read it."
            )
        if version in DIGESTED_VERSIONS or DIGEST_KEY in data:  # a digest with an older version: the version was edited
            check_digest(data, source=source)
        if problems := manifest_problems(data):
            raise StoreDamaged(f"{source} contradicts itself, so it cannot be trusted:\n  " + "\n  ".join(problems)
                               + "\nRestore it from a copy of the store, or rebuild the store.")
        data.pop("totals", None)
        data.pop(DIGEST_KEY, None)
        try:
            data["shards"] = [ShardInfo(**s) for s in data["shards"]]
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise StoreDamaged(f"{source} is damaged: a required entry is missing or malformed ({exc}).") from None

    def save(self, location: Location, name: str = MANIFEST_NAME) -> None:
        """Write atomically to `name` (the store's manifest, or a worker's) below `location`."""
        self.updated_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        location.write_bytes_atomic(name, self.to_json().encode())

    @classmethod
    def load(cls, location: Location, name: str = MANIFEST_NAME) -> Manifest:
        if name == MANIFEST_NAME and not location.exists(name) and location.exists(MERGING_NAME):
            raise RuntimeError(
                f"{location} has no {MANIFEST_NAME}: it is an unfinished `teacher-cache merge --output` (see its "
                f"{MERGING_NAME}). Rerun that merge with --resume to finish it, or delete {location}."
            )
        if name == MANIFEST_NAME and not location.exists(name) and location.exists(WORKERS_DIR):
            raise RuntimeError(
                f"{location} has no {MANIFEST_NAME} yet: it is built by several workers that have not all "
                f"finished or have not been merged. `teacher-cache info {location}` shows their progress."
            )
        if not location.exists(name):
            raise RuntimeError(
                f"{location} has no {name}: it is not a teacher-cache store "
                "(build one with `teacher-cache build`)."
            )
        source = f"{location}/{name}"
        try:
            text = location.read_bytes(name).decode()
        except UnicodeDecodeError:
            raise StoreDamaged(f"{source} is damaged: it is not UTF-8 text.") from None
        return cls.from_json(text, source=source)


def isolates_documents(build: dict) -> bool:
    """Whether the teacher saw each packed document alone (build.document_attention "isolated": positions restart
    at each document of a sample and its tokens attend only within it), so a student reads the samples the same
    way; absent, as in stores before the key, documents attend across each other."""
    return build.get("document_attention") == "isolated"


def header_differences(old: dict, new: dict, prefix: str = "", *, old_name: str = "store",
                       new_name: str = "this build") -> list[str]:
    """Human-readable list of the keys whose values differ between two header dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += header_differences(a, b, f"{prefix}{key}.", old_name=old_name, new_name=new_name)
        elif a != b:
            out.append(f"{prefix}{key}: {old_name} has {a!r}, {new_name} has {b!r}")
    return out
