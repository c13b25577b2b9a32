"""Export a store to Arrow / Parquet: one row per sample, one row group per shard.

Columns hold lists over positions (and, for top-k, sampled and hidden records, lists within them); they are
built from the flat arrays with offsets, never by looping over tokens. The file's schema metadata carries the
store's manifest header under `MANIFEST_KEY`, so that a reader of the Parquet file alone knows what the columns
mean (above all `targets.sampled.draws_from`: hybrid stores' draws come from the tail, not the whole distribution).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from storage.manifest import Manifest
from storage.reader import ShardReader, Store

# Schema metadata key of the manifest header (JSON) in an exported Parquet file.
MANIFEST_KEY = "teacher_cache.manifest"


def shard_table(shard: ShardReader, first_sample: int) -> pa.Table:
    """An Arrow table of one shard's samples."""
    data = shard.read()
    num, width = data["input_ids"].shape
    positions = width - 1
    columns = {"sample_index": pa.array(np.arange(first_sample, first_sample + num, dtype=np.int64))}
    for name, values in data.items():
        if name in ("sampled_ids", "sampled_counts", "sampled_offsets"):
            continue
        columns[name] = _nested_list(values)
    for name, values in shard.stats().items():
        columns[name] = _nested_list(values)
    if "sampled_ids" in data:
        # Inner lists: one per position, from the per-position counts; outer lists: `positions` per sample.
        inner = np.concatenate([[0], np.cumsum(data["sampled_nunique"].reshape(-1), dtype=np.int64)])
        outer = np.arange(0, num * positions + 1, positions, dtype=np.int64)
        for name in ("sampled_ids", "sampled_counts"):
            per_position = pa.ListArray.from_arrays(pa.array(inner.astype(np.int32)), pa.array(data[name]))
            columns[name] = pa.ListArray.from_arrays(pa.array(outer.astype(np.int32)), per_position)
    return pa.table(columns)


def _nested_list(values: np.ndarray) -> pa.Array:
    """[S, a, b, ...] -> list<fixed_size_list<...>> per sample."""
    flat: pa.Array = pa.array(values.reshape(-1))
    for size in reversed(values.shape[1:]):
        flat = pa.FixedSizeListArray.from_arrays(flat, size)
    return flat


def manifest_metadata(manifest: Manifest) -> dict[str, str]:
    """The schema metadata of an export: the manifest's format, format version, teacher, dataset, build and
    targets, as one JSON object under `MANIFEST_KEY`."""
    header = {"format": manifest.format, "format_version": manifest.format_version, **manifest.header()}
    return {MANIFEST_KEY: json.dumps(header, sort_keys=True)}


def export_parquet(store: Store, output: str | os.PathLike, *, compression: str = "zstd") -> int:
    """Write every sample of `store` to the Parquet file `output`, with its manifest header in the schema
    metadata (`manifest_metadata`); returns the number of rows written."""
    writer = None
    written = 0
    try:
        for shard in tqdm(store.shards, desc="export", unit="shard"):
            table = shard_table(shard, written)
            if writer is None:
                schema = table.schema.with_metadata(manifest_metadata(store.manifest))
                writer = pq.ParquetWriter(os.fspath(output), schema, compression=compression)
            writer.write_table(table)
            written += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    return written
