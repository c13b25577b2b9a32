"""What a store must satisfy before anything in it is trusted: its manifest's digest, its names, its counts, and
the checksum of every file a reader touches.

Nothing read from disk is trusted. A version 4 manifest carries the SHA-256 of its own canonical JSON
(`manifest_sha256`), so an edit that leaves valid JSON is still caught. Every manifest, of any version, must be
self-consistent (`manifest_problems`): shard names are store-relative paths of the expected pattern (no path leaves
the store), file names are plain relative paths, counts agree with each other and with the totals. Readers check
each file they read against its SHA-256 in the manifest, once per file per process (`check_files`); with
verification off they still check that every file exists with its recorded size, so a missing or truncated chunk
is an error and never zarr's fill value.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np

from storage.fs import Location
from storage.layout import SHARDS_DIR, ArraySpec
from storage.targets import axis_lengths as target_axis_lengths

# Key of the manifest's own digest (format version 4): the SHA-256 of the manifest's canonical JSON without it.
DIGEST_KEY = "manifest_sha256"
# A shard's store-relative name: `shard_name` writes six digits or more.
SHARD_NAME = re.compile(rf"{SHARDS_DIR}/shard-\d{{6,}}")
# A file of a shard, relative to its group: plain names joined by '/', never '.', '..' or absolute.
FILE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")

# Files already checked against their digest by this process: (store file, SHA-256). Loader workers inherit it. No
# lock: set.add is atomic under the GIL, and a lock held by a reading thread when a loader forks its workers would
# stay held in them.
_VERIFIED: set[tuple[str, str]] = set()


class StoreDamaged(RuntimeError):
    """A store's files or manifest are not what its manifest says: reading on would return wrong values.

    Attributes:
        problem: the problem alone, with the place it was found (e.g. "shards/shard-000003, array entropy: file
            entropy/c/0/0 is missing"), without the advice of the message.
    """

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem or message


def canonical_digest(data: dict) -> str:
    """SHA-256 of a JSON object in canonical form (sorted keys, no spaces, ASCII), as `manifest_sha256` is made."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check_digest(data: dict, *, source: str) -> None:
    """Check a version 4 manifest's `manifest_sha256` against the rest of it (`data` still holds the key).

    Raises:
        StoreDamaged: the digest is missing or does not match: the manifest was edited or damaged after it was
            written.
    """
    recorded = data.get(DIGEST_KEY)
    actual = canonical_digest({key: value for key, value in data.items() if key != DIGEST_KEY})
    if recorded != actual:
        found = "has no manifest_sha256" if recorded is None else "does not match its manifest_sha256"
        raise StoreDamaged(
            f"{source} {found}: it was edited or damaged after it was written, so none of its counts, names or "
            "checksums can be trusted. Restore it from a copy of the store, or rebuild the store; a manifest must "
            "never be edited by hand."
        )


def shard_name_problem(name: object) -> str | None:
    """Why `name` is not a valid shard name (None when it is): a store-relative path `shards/shard-NNNNNN`."""
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
        return f"shard name {name!r} is not of the form {SHARDS_DIR}/shard-NNNNNN (a path inside the store)"
    return None


def file_name_problem(rel: object) -> str | None:
    """Why `rel` is not a valid file of a shard (None when it is): relative, '/'-separated, no '.' or '..'."""
    if not isinstance(rel, str) or not rel or not all(FILE_PART.fullmatch(part) for part in rel.split("/")):
        return f"file name {rel!r} is not a plain path inside its shard"
    return None


def manifest_problems(data: dict) -> list[str]:
    """Every way a parsed manifest (a dict, before it becomes a `Manifest`) contradicts itself; empty when none.

    Checks the shard names and file names (no path may leave the store), that names are unique and in index
    order, each shard's counts (positions = samples x seq_len, 0 <= tokens <= positions), the recorded totals
    against the sums, and that a complete store's shards are exactly 0 .. n-1.
    """
    shards = data.get("shards")
    if not isinstance(shards, list):
        return ["`shards` is not a list"]
    seq_len = data.get("build", {}).get("seq_len") if isinstance(data.get("build"), dict) else None
    problems, names = [], []
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            problems.append(f"shard entry {i} is not an object")
            continue
        name = shard.get("name")
        if problem := shard_name_problem(name):
            problems.append(problem)
            continue
        names.append(name)
        problems += [f"{name}: {p}" for rel in shard.get("files") or {} if (p := file_name_problem(rel))]
        problems += [f"{name}: {p}" for p in _count_problems(shard, seq_len)]
    if len(set(names)) != len(names):
        problems.append("a shard is listed twice: " + ", ".join(sorted({n for n in names if names.count(n) > 1})))
    indices = [int(name.rsplit("-", 1)[1]) for name in names]
    if indices != sorted(indices):
        problems.append("shards are not listed in index order")
    if data.get("complete") and data.get("worker") is None and len(names) == len(shards) \
            and indices != list(range(len(indices))):
        problems.append(f"a complete store lists shards {_ranges(indices)}, not 0..{len(indices) - 1}")
    problems += _total_problems(data.get("totals"), shards)
    return problems


def _count_problems(shard: dict, seq_len: object) -> list[str]:
    counts = {key: shard.get(key) for key in ("num_samples", "num_positions", "num_tokens")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts.values()):
        return [f"counts {counts} are not all whole numbers >= 0"]
    problems = []
    if isinstance(seq_len, int) and counts["num_positions"] != counts["num_samples"] * seq_len:
        problems.append(f"num_positions {counts['num_positions']} != num_samples {counts['num_samples']} x "
                        f"seq_len {seq_len}")
    if counts["num_tokens"] > counts["num_positions"]:
        problems.append(f"num_tokens {counts['num_tokens']} > num_positions {counts['num_positions']}")
    return problems


def _total_problems(totals: object, shards: list) -> list[str]:
    if totals is None:
        return []
    keys = {"samples": "num_samples", "positions": "num_positions", "tokens": "num_tokens"}
    if not isinstance(totals, dict):
        return ["`totals` is not an object"]
    problems = []
    for total, key in keys.items():
        summed = sum(s.get(key, 0) for s in shards if isinstance(s, dict) and isinstance(s.get(key), int))
        if totals.get(total) != summed:
            problems.append(f"totals.{total} is {totals.get(total)!r}, the shards add up to {summed}")
    return problems


def _ranges(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:8]))
    return shown + (f", ... ({len(indices)} shards)" if len(indices) > 8 else "")


def damaged(location: Location, where: str, problem: str) -> StoreDamaged:
    """The error for a damaged file or array of a store, naming the store, the place and the fix."""
    return StoreDamaged(
        f"{location}: {where} {problem}. The store is damaged: `teacher-cache verify {location}` lists every "
        f"damaged file, and `teacher-cache verify {location} --repair` then the store's build command with --resume "
        "rebuild the damaged shards (or restore them from a copy of the store).",
        problem=f"{where} {problem}",
    )


def check_files(location: Location, shard: str, files: dict[str, str], sizes: int | None, *, verify: bool,
                what: str) -> None:
    """Check the files `files` ({path below the shard: SHA-256}) of one array (or the shard's group) before reading.

    Every file must exist. With `verify`, each file's SHA-256 is recomputed once per process and compared with the
    manifest's; without, their total size must be `sizes` when given (the manifest's `array_bytes`, which zarr
    measures as the bytes of every file below the array), so a truncated file is still found.

    Raises:
        StoreDamaged: a file is missing, truncated, grown, or does not match its checksum; naming it.
    """
    for rel in files:
        if not location.exists(f"{shard}/{rel}"):
            raise damaged(location, f"{shard}, {what}:", f"file {rel} is missing")
    if not verify:  # the checksums below name the damaged file; without them, the sizes must do
        total = sum(location.size(f"{shard}/{rel}") for rel in files)
        if sizes is not None and total != sizes:
            raise damaged(location, f"{shard}, {what}:", f"holds {total:,} bytes, its manifest records {sizes:,} "
                          "(a file was truncated or replaced)")
        return
    for rel, digest in files.items():
        key = (f"{location}/{shard}/{rel}", digest)
        if key in _VERIFIED:
            continue
        if location.sha256(f"{shard}/{rel}") != digest:
            raise damaged(location, f"{shard}, {what}:", f"file {rel} does not match its checksum")
        _VERIFIED.add(key)


def axis_lengths(manifest) -> dict[str, int]:
    """The lengths the store's options give the axis letters of `storage.layout` (S, S+1 and E vary by shard)."""
    seq_len = manifest.build.get("seq_len")
    dims = {"L": seq_len, "L+1": seq_len + 1} if isinstance(seq_len, int) else {}
    return dims | target_axis_lengths(manifest.targets)


def shape_problem(spec: ArraySpec, array, dims: dict[str, int]) -> str | None:
    """Why a stored array's shape or dtype is not what the store's options make it (None when it is)."""
    expected = tuple(dims.get(axis) for axis in spec.axes)
    if len(array.shape) != len(expected) or any(
            e is not None and e != n for e, n in zip(expected, array.shape, strict=True)):
        want = ", ".join(f"{axis}={n}" if n is not None else axis for axis, n in zip(spec.axes, expected, strict=True))
        return f"has shape {tuple(array.shape)}, the manifest makes it ({want})"
    if np.dtype(array.dtype) != spec.dtype:
        return f"has dtype {np.dtype(array.dtype)}, the store's options make it {spec.dtype}"
    return None
