"""Bytes per token of each record under alternative codecs, measured on a real store.

Re-encodes the arrays of a store (built by `teacher-cache build`, ideally from a trained teacher on real text)
with several Zarr codec pipelines and prints bytes per trained token, with plain layouts used elsewhere as
baselines computed in the same run: ids bit-packed at ceil(log2 V) bits, and RS-KD's 3 bytes per sampled entry.

    python benchmarks/codec_bytes.py STORE [--json out.json] [--max-shards 4]
"""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path

import click
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.codecs.numcodecs import Delta, FixedScaleOffset
from zarr.storage import MemoryStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from storage.layout import LOGPROB_FLOOR, LOGPROB_SCALE, chunking, quantize_logprobs  # noqa: E402
from storage.reader import Store  # noqa: E402
from storage.targets.topk import split_logprobs  # noqa: E402


def stored_bytes(data: np.ndarray, filters, compressors) -> int:
    """Stored size of `data` as one sharded Zarr array with these codecs (inner chunks as the store uses)."""
    group = zarr.open_group(MemoryStore(), mode="w", zarr_format=3)
    chunks, shard = chunking(data.shape, data.itemsize)
    array = group.create_array("a", shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shard, filters=filters,
                               compressors=compressors, fill_value=0)
    array[...] = data
    return int(array.nbytes_stored())


def blosc(shuffle: str, itemsize: int) -> list:
    return [BloscCodec(cname="zstd", clevel=5, shuffle=shuffle, typesize=itemsize)]


def variants_for_ids(ids: np.ndarray) -> dict[str, tuple]:
    delta = [Delta(dtype=ids.dtype.str)]
    return {
        "zstd": (None, [ZstdCodec(level=5)]),
        "zstd level 12 (format 3 top-k ids)": (None, [ZstdCodec(level=12)]),
        "zstd level 15": (None, [ZstdCodec(level=15)]),
        "delta + zstd": (delta, [ZstdCodec(level=5)]),
        "blosc-zstd byteshuffle": (None, blosc("shuffle", ids.itemsize)),
        "blosc-zstd bitshuffle": (None, blosc("bitshuffle", ids.itemsize)),
        "delta + blosc-zstd byteshuffle": (delta, blosc("shuffle", ids.itemsize)),
        "delta + blosc-zstd bitshuffle": (delta, blosc("bitshuffle", ids.itemsize)),
    }


def float_variants(values: np.ndarray) -> dict[str, tuple]:
    return {
        "zstd": (None, [ZstdCodec(level=5)]),
        "blosc-zstd byteshuffle": (None, blosc("shuffle", values.itemsize)),
        "blosc-zstd bitshuffle": (None, blosc("bitshuffle", values.itemsize)),
    }


def logprob_variants(values: np.ndarray) -> dict[str, tuple]:
    """Log-prob encodings: fp16 (format 1) and int16 steps of 1/64 nat (format 2), each with byte shuffle."""
    step = [FixedScaleOffset(offset=0, scale=LOGPROB_SCALE, dtype="<f4", astype="<i2")]
    return {
        "fp16 blosc-zstd byteshuffle": (values.astype(np.float16), None, blosc("shuffle", 2)),
        f"int16 1/{LOGPROB_SCALE} nat blosc-zstd byteshuffle": (quantize_logprobs(values), step, blosc("shuffle", 2)),
        f"int16 1/{LOGPROB_SCALE} nat zstd": (quantize_logprobs(values), step, [ZstdCodec(level=5)]),
    }


def measure(store: Store, max_shards: int) -> dict:
    """Bytes per trained token of each record of the store's first `max_shards` shards, under every variant."""
    parts = [s.read() for s in store.shards[:max_shards]]  # sample arrays; format 2's statistics are not read
    data = {name: np.concatenate([part[name] for part in parts]) for name in parts[0] if name != "sampled_offsets"}
    vocab = store.manifest.teacher["vocab_size"]
    return {"tokens": int(data["loss_mask"].sum()), "vocab_size": vocab,
            "machine": f"{platform.machine()} {platform.processor()}", "teacher": store.manifest.teacher["model"],
            "rows": measure_arrays(data, vocab)}


def measure_arrays(data: dict[str, np.ndarray], vocab: int) -> dict[str, dict[str, float]]:
    """Bytes per trained token, by record and codec variant, of the arrays in `data` (shaped as a shard holds
    them, with their `loss_mask`); records missing from `data` are skipped."""
    mask = data["loss_mask"]
    tokens = int(mask.sum())
    bits = math.ceil(math.log2(vocab))
    rows: dict[str, dict[str, float]] = {}

    def add(record: str, variant: str, nbytes: float) -> None:
        rows.setdefault(record, {})[variant] = nbytes / tokens

    if "topk_ids" in data:
        stored_ids, stored_logp = data["topk_ids"], data["topk_logprobs"]
        order = np.argsort(stored_ids, axis=-1, kind="stable")  # the store keeps id order; make sure of it
        by_id = np.take_along_axis(stored_ids, order, -1)
        logp_by_id = np.take_along_axis(stored_logp, order, -1)
        rank = np.argsort(-logp_by_id.astype(np.float32), axis=-1, kind="stable")  # most likely first
        ids, logp = np.take_along_axis(by_id, rank, -1), np.take_along_axis(logp_by_id, rank, -1)
        for name, (f, c) in variants_for_ids(ids).items():
            if f is None:
                add("topk_ids (rank order)", name, stored_bytes(ids, f, c))
            add("topk_ids (id order)", name, stored_bytes(by_id, f, c))
        for name, (values, f, c) in logprob_variants(logp).items():
            add("topk_logprobs (rank order)", name, stored_bytes(values, f, c))
        for name, (values, f, c) in logprob_variants(logp_by_id).items():
            add("topk_logprobs (id order)", name, stored_bytes(values, f, c))
        # Format 3: the position's floor (int16 steps) + each value's excess above it (uint16 steps).
        floor, excess = split_logprobs(quantize_logprobs(logp_by_id))
        step_u16 = [FixedScaleOffset(offset=0, scale=LOGPROB_SCALE, dtype="<f4", astype="<u2")]
        step_i16 = [FixedScaleOffset(offset=0, scale=LOGPROB_SCALE, dtype="<f4", astype="<i2")]
        add("topk_logprobs (id order)", f"floor + excess 1/{LOGPROB_SCALE} nat blosc-zstd byteshuffle (format 3)",
            stored_bytes(excess, step_u16, blosc("shuffle", 2)) + stored_bytes(floor, step_i16, blosc("shuffle", 2)))
        k = ids.shape[-1]
        add("topk_ids (rank order)", f"baseline: {bits}-bit packed", mask.sum() * k * bits / 8)
        add("topk_logprobs (rank order)", "baseline: raw fp16", mask.sum() * k * 2)
    if "sampled_ids" in data:
        ids, counts = data["sampled_ids"], data["sampled_counts"]
        entries = len(ids)
        for name, (f, c) in variants_for_ids(ids).items():
            add("sampled_ids", name, stored_bytes(ids, f, c))
        for name, (f, c) in float_variants(counts).items():  # byte-wise codecs apply to counts as well
            add("sampled_counts", name, stored_bytes(counts, f, c))
        add("sampled_nunique", "zstd", stored_bytes(data["sampled_nunique"], None, [ZstdCodec(level=5)]))
        add("sampled (ids+counts)", "baseline: RS-KD 3 bytes/entry", 3 * entries)
        rows["sampled entries per token"] = {"mean": entries / tokens}
    if "tail_logmass" in data:
        for name, (values, f, c) in logprob_variants(np.maximum(data["tail_logmass"], LOGPROB_FLOOR)).items():
            add("tail_logmass", name, stored_bytes(values, f, c))
    for name in (name for name in ("input_ids", "entropy", "true_logprob") if name in data):
        variants = variants_for_ids(data[name]) if name == "input_ids" else float_variants(data[name])
        for variant, (f, c) in variants.items():
            if f is None:
                add(name, variant, stored_bytes(data[name], f, c))
    return rows


@click.command()
@click.argument("store")
@click.option("--json", "json_path", help="Also write the figures to this JSON file.")
@click.option("--max-shards", type=int, default=4, show_default=True, help="Measure on the first shards only.")
def main(store: str, json_path: str | None, max_shards: int) -> None:
    """Print bytes per trained token of each record under alternative codecs."""
    result = measure(Store(store), max_shards)
    click.echo(f"{result['tokens']} trained tokens, vocab {result['vocab_size']}, teacher {result['teacher']}")
    for record, variants in result["rows"].items():
        click.echo(record)
        for variant, value in sorted(variants.items(), key=lambda kv: kv[1]):
            click.echo(f"  {variant:<40}{value:10.2f}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
