"""The store's on-disk vocabulary: format version, array names, dtypes, chunking and codecs.

Everything that decides how a record is laid out in Zarr lives here or, for each target kind's arrays, in its module
of `storage.targets` (whose `array_specs` lists a shard's arrays), so that the writer, the reader and `FORMAT.md`
agree by construction. Shapes use the letters of the legend below.

Legend: S samples in a shard, L positions per sample (the teacher's context, `seq_len`), K top-k entries,
E sampled (id, count) entries in a shard, H hidden size, R bins of the true token's rank (`storage/stats.py`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.codecs.numcodecs import Delta, FixedScaleOffset

FORMAT_NAME = "teacher-cache"
FORMAT_VERSION = 4
# Versions this release reads. Version 1 lacks the per-sample statistics arrays (`storage/stats.py`). Version 3
# stores `topk_logprobs` as a per-position floor plus the excess above it (`split_logprobs`), and adds
# `targets.sampled.draws_from` ("tail": hybrid targets), which an older reader would ignore and so misread the
# draws as draws from the full distribution.
# Version 4 adds the manifest's digest of itself (`storage/integrity.py`); its shards are those of version 3.
READABLE_VERSIONS = (1, 2, 3, 4)
# Versions whose manifest carries `manifest_sha256`, which readers check.
DIGESTED_VERSIONS = (4,)
# Versions whose shards have this release's layout: merging copies their shards as they are.
CURRENT_SHARD_VERSIONS = (3, 4)
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"

# Log-probs (top-k and tail, format version 2) are stored as int16 multiples of 1/LOGPROB_SCALE nat: within
# 1/(2 * LOGPROB_SCALE) of the teacher's fp32 value, down to LOGPROB_FLOOR (lower values are clipped to it).
LOGPROB_SCALE = 64
LOGPROB_FLOOR = -511.0


def quantize_logprobs(values: np.ndarray) -> np.ndarray:
    """Float32 log-probs as the store holds them (format version 2): the nearest multiple of 1/LOGPROB_SCALE
    within [LOGPROB_FLOOR, 0], as the FixedScaleOffset codec rounds."""
    clipped = np.clip(np.asarray(values, dtype=np.float32), LOGPROB_FLOOR, 0.0)
    return (np.around(clipped * LOGPROB_SCALE) / LOGPROB_SCALE).astype(np.float32)


# zstd level of the top-k ids: level 12 is ~18% smaller than level 5 on a trained teacher's top-64 and still
# compresses at tens of MB/s, far beyond what a teacher produces (`benchmarks/codec_bytes.py`).
TOPK_IDS_ZSTD_LEVEL = 12


# Inner chunks are the unit of reading; about this many uncompressed bytes each.
TARGET_CHUNK_BYTES = 1 << 20

# The numcodecs codecs (Delta) are read by zarr-python with numcodecs, which zarr itself depends on.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")


def shard_name(index: int) -> str:
    """The store-relative path of shard `index`; deterministic so a resumed build finds its place."""
    return f"{SHARDS_DIR}/shard-{index:06d}"


def id_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id of a vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def count_dtype(num_draws: int) -> np.dtype:
    """Smallest unsigned dtype that holds a count of up to `num_draws` draws."""
    return np.dtype(np.uint8) if num_draws < 1 << 8 else np.dtype(np.uint16)


@dataclass(frozen=True)
class ArraySpec:
    """How one array of a shard is stored.

    Attributes:
        name: array name inside the shard group.
        axes: axis letters from the module legend, e.g. ("S", "L", "K").
        dtype: numpy dtype of the logical (decoded) array.
        codec: codec pipeline name, see `codecs_for`.
        description: one line for `FORMAT.md` and `info`.
    """

    name: str
    axes: tuple[str, ...]
    dtype: np.dtype
    codec: str
    description: str


def codecs_for(spec: ArraySpec) -> dict:
    """`filters` and `compressors` arguments of `zarr.create_array` for an array.

    Chosen by measuring bytes per token on a trained teacher's store (`benchmarks/codec_bytes.py`):
      - "zstd_high": top-k ids (version 3), as "zstd" at level TOPK_IDS_ZSTD_LEVEL;
      - "excess_shuffle_zstd": top-k log-prob excesses above the position's floor (version 3), as
        "logprob_shuffle_zstd" but unsigned (uint16, up to -LOGPROB_FLOOR * LOGPROB_SCALE);
      - "zstd": ids in ascending order within a position (sets of frequent ids repeat, and zstd finds the
        repeats), token ids, masks, counts, offsets;
      - "shuffle_zstd": floats; byte shuffle groups exponent and mantissa bytes before zstd;
      - "delta_shuffle_zstd": sampled ids, ascending within a position, become small gaps (wrapping at
        position starts) whose high bytes are mostly zero;
      - "logprob_shuffle_zstd": float32 log-probs rounded to int16 multiples of 1/LOGPROB_SCALE nat (numcodecs
        FixedScaleOffset), then byte shuffle and zstd: 17% smaller than fp16 on a trained teacher's top-64, and
        every value within 1/128 nat of the fp32 one (fp16 is off by up to 1/64 beyond 16 nats).
    """
    shuffle = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=spec.dtype.itemsize)
    if spec.codec == "zstd":
        return {"filters": None, "compressors": [ZstdCodec(level=5)]}
    if spec.codec == "zstd_high":
        return {"filters": None, "compressors": [ZstdCodec(level=TOPK_IDS_ZSTD_LEVEL)]}
    if spec.codec == "excess_shuffle_zstd":
        quantize = FixedScaleOffset(offset=0, scale=LOGPROB_SCALE, dtype="<f4", astype="<u2")
        return {"filters": [quantize],
                "compressors": [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=2)]}
    if spec.codec == "shuffle_zstd":
        return {"filters": None, "compressors": [shuffle]}
    if spec.codec == "logprob_shuffle_zstd":
        quantize = FixedScaleOffset(offset=0, scale=LOGPROB_SCALE, dtype="<f4", astype="<i2")
        return {"filters": [quantize],
                "compressors": [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=2)]}
    assert spec.codec == "delta_shuffle_zstd", spec.codec
    return {"filters": [Delta(dtype=spec.dtype.str)], "compressors": [shuffle]}


def chunking(shape: tuple[int, ...], itemsize: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(inner chunk shape, shard shape) for an array that is written as a single zarr shard.

    Inner chunks keep whole trailing axes and as many leading rows as fit in about TARGET_CHUNK_BYTES; the shard
    covers the array rounded up to whole inner chunks, as zarr's sharding codec requires.
    """
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else itemsize
    rows = max(1, min(max(shape[0], 1), TARGET_CHUNK_BYTES // max(row_bytes, 1)))
    chunks = (rows, *[max(d, 1) for d in shape[1:]])
    shard = tuple(-(-max(d, 1) // c) * c for d, c in zip(shape, chunks, strict=True))
    return chunks, shard
