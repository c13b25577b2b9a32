"""Repairing a damaged store: its damaged shards leave the manifest, so that the build that made the store
recomputes exactly those shards with `--resume`.

A shard is damaged when `Store.verify` finds a problem in it (a file missing, altered or unlisted; an array whose
shape or counts disagree with the manifest). Dropping it marks the store incomplete; the build's resume removes the
shard's directory (`StoreWriter._remove_uncommitted`) and computes the missing shards again, wherever they lie, so
the repaired store equals an undamaged one. A damaged manifest cannot be repaired this way (nothing in it can be
trusted), nor a store made from other stores (no build can resume it: merge its inputs again).
"""

from __future__ import annotations

import logging
import os

from storage.fs import Location
from storage.layout import FORMAT_VERSION
from storage.lock import OutputLock
from storage.reader import Store

log = logging.getLogger(__name__)


def drop_damaged_shards(url: str | os.PathLike) -> dict[str, list[str]]:
    """Remove every damaged shard of the store at `url` from its manifest, which then says the store is incomplete.

    Returns:
        The problems found, by the name of the damaged shard (empty: nothing was changed).

    Raises:
        StoreDamaged: the manifest itself is damaged.
        ValueError: the store was made from other stores, or by a release that wrote another format version (its
            build cannot be resumed by this one).
        LockError: another process writes the store.
    """
    location = Location(url)
    with OutputLock(location):
        store = Store(url, allow_incomplete=True)
        manifest = store.manifest
        if "sources" in manifest.dataset or "members" in manifest.teacher:
            raise ValueError(f"{location} was made by `teacher-cache merge`, which cannot resume a store: merge its "
                             "inputs again into a new --output instead of repairing it.")
        if manifest.format_version != FORMAT_VERSION:
            raise ValueError(f"{location} has format version {manifest.format_version}; its build resumes only with "
                             f"the release that wrote it, and this one writes version {FORMAT_VERSION}. Repair it with "
                             "that release, or rebuild the store.")
        damaged = store.damaged_shards()
        if damaged:
            manifest.shards = [info for info in manifest.shards if info.name not in damaged]
            manifest.complete = False
            manifest.save(location)
            log.info("dropped %d damaged shards from %s: %s", len(damaged), location, ", ".join(damaged))
        return damaged
