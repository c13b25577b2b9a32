"""Concatenating finished stores of one teacher into a new store: `teacher-cache merge A B ... --output C`.

The stores must hold the same targets of the same teacher over samples of the same shape: equal teacher identity
(config, weights and tokenizer hashes, vocabulary, backend, dtype; the model's path may differ), equal `targets`
(kinds and parameters; the seed of the draws may differ) and equal `build.seq_len` and `build.pack`. Their
datasets may differ. The output holds the samples of A, then B, ...; every shard of an input becomes one shard
of the output, renumbered, its files copied as they are (a shard is a self-contained Zarr group, so its checksums
stay valid) and checked against the input's checksums on the way. A shard of an input of an older format
version is decoded and written again instead (with the statistics arrays version 1 lacks), so the output is
uniformly of the current version.

The output's manifest names the inputs in `dataset.sources` (flattened, so concatenating concatenations keeps
one list); build options that differ between inputs become null there and stay in each source's entry. Shards
commit to `merging.json` and `manifest.json` is written last (`StoreWriter.open_merged`): an interrupted merge
never looks like a store, and `resume` finishes it. The output is locked while it is written (`storage/lock.py`).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence

from tqdm.auto import tqdm

from storage.fs import Location
from storage.layout import CURRENT_SHARD_VERSIONS
from storage.lock import OutputLock
from storage.manifest import Manifest, header_differences
from storage.reader import Store
from storage.targets import concat_key, concat_targets, mixed_notes
from storage.targets.base import common
from storage.writer import StoreWriter

log = logging.getLogger(__name__)

# Teacher keys that may differ between stores of one teacher: where its files lie, the serving library's version.
LOCAL_TEACHER_KEYS = ("model", "backend_version")


def open_inputs(urls: Sequence[str | os.PathLike]) -> list[Store]:
    """The finished stores to merge.

    Raises:
        ValueError: an input is missing, not a store, or unfinished (the store's own message says why).
    """
    stores = []
    for url in urls:
        try:
            stores.append(Store(url))
        except RuntimeError as exc:
            raise ValueError(f"Cannot merge {os.fspath(url)}: {exc}") from None
    return stores


def concat_stores(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *, resume: bool = False) -> Manifest:
    """Write the samples of `inputs`, in order, to a new store at `output`; returns its manifest.

    Args:
        inputs: finished stores of one teacher with the same targets, seq_len and packing (module docstring).
        output: a new (absent or empty) store location.
        resume: finish an interrupted concatenation of the same inputs into `output`.

    Raises:
        ValueError: an input is unfinished or not a store; the inputs differ (every difference is named); the
            output exists (see `StoreWriter.check_merged_output`).
        RuntimeError: an input's file does not match its checksum.
        LockError: another writer holds the output's lock (`storage/lock.py`).
    """
    if len(inputs) < 2:
        raise ValueError(f"concatenating needs at least 2 stores, got {len(inputs)}.")
    with OutputLock(Location(output)):
        StoreWriter.check_merged_output(Location(output), resume=resume)
        stores = open_inputs(inputs)
        check_concatenable(stores)
        writer = StoreWriter.open_merged(output, concat_manifest(stores), resume=resume)
        done = writer.committed_shards
        plan = [(store, shard) for store in stores for shard in store.shards]
        positions = sum(store.manifest.num_positions for store in stores)
        with tqdm(total=positions, unit="tok", unit_scale=True, desc="teacher-cache merge",
                  dynamic_ncols=True) as bar:
            for index, (store, shard) in enumerate(plan):
                if index not in done:
                    if store.manifest.format_version in CURRENT_SHARD_VERSIONS:
                        writer.copy_shard(index, store.location, shard.info)
                    else:  # an older version: decoded and written again in the current layout, with its statistics
                        writer.write_shard(index, shard.read())
                bar.update(shard.info.num_positions)
        manifest = writer.finish()
    log.info("concatenated %d stores into %s: %d samples, %d trained tokens in %d shards", len(stores), output,
             manifest.num_samples, manifest.num_tokens, len(manifest.shards))
    return manifest


def check_concatenable(stores: Sequence[Store]) -> None:
    """Refuse stores whose samples cannot follow each other in one store.

    Raises:
        ValueError: naming each store that differs from the first, and every difference.
    """
    first = stores[0]
    problems = []
    for store in stores[1:]:
        diffs = header_differences(_concat_key(first.manifest), _concat_key(store.manifest),
                                   old_name=str(first.location), new_name=str(store.location))
        problems += diffs
    if problems:
        notes = mixed_notes([store.manifest.targets for store in stores])
        raise ValueError(
            "Cannot concatenate stores of different teachers, targets or sample shapes:\n  " + "\n  ".join(problems)
            + "".join("\n" + note for note in notes)
            + "\nConcatenate only stores built by the same teacher with the same --targets, --top-k, --samples, "
            "--draw-scheme, --hidden-layers, --seq-len, --pack and --document-attention. To combine different teachers "
            "over the same inputs, use --ensemble."
        )


def _concat_key(manifest: Manifest) -> dict:
    """What must be equal for two stores to be concatenated."""
    return {
        "teacher": _teacher_key(manifest.teacher),
        "targets": _targets_key(manifest.targets),
        "build": {"seq_len": manifest.build["seq_len"], "pack": manifest.build["pack"],
                  "document_attention": manifest.build.get("document_attention")},
    }


def _teacher_key(teacher: dict) -> dict:
    """A teacher's identity without where it lies; an ensemble's members (`storage/ensemble.py`) likewise, without
    the stores they were read from or their draws' seeds."""
    key = {k: v for k, v in teacher.items() if k not in LOCAL_TEACHER_KEYS}
    if "members" in key:
        key["members"] = [{**_teacher_key({k: v for k, v in m.items() if k != "store"}),
                           "targets": _targets_key(m["targets"])} for m in key["members"]]
    return key


def _targets_key(targets: dict) -> dict:
    """Targets without what may differ between stores that follow each other: each kind says what
    (`storage.targets.concat_key`; e.g. the seed of the draws, how a format version encodes the log-probs)."""
    return concat_key(copy.deepcopy(targets))


def concat_manifest(stores: Sequence[Store]) -> Manifest:
    """The (empty, unfinished) manifest of the concatenation of `stores`, with its sources."""
    first = stores[0].manifest
    sources, offset = [], 0
    for store in stores:
        for source in _sources(store):
            sources.append({**source, "first_sample": offset + source["first_sample"]})
        offset += len(store)
    manifests = [store.manifest for store in stores]
    targets = concat_targets(copy.deepcopy([m.targets for m in manifests]))  # in this release's format
    return Manifest(
        teacher=copy.deepcopy(first.teacher),
        dataset={
            "source": " + ".join(str(source["dataset"].get("source")) for source in sources),
            "split": common([s["dataset"].get("split") for s in sources]),
            "text_field": common([s["dataset"].get("text_field") for s in sources]),
            "fingerprint": None,
            "sources": sources,
        },
        build={key: common([m.build.get(key) for m in manifests]) for key in first.build},
        targets=targets,
        created_by=first.created_by,
    )


def _sources(store: Store) -> list[dict]:
    """The sources of one input: itself, or the sources it was concatenated from."""
    dataset = store.manifest.dataset
    if "sources" in dataset:
        return copy.deepcopy(dataset["sources"])
    return [{"store": str(store.location), "first_sample": 0, "samples": len(store), "dataset": dict(dataset),
             "build": dict(store.manifest.build)}]
