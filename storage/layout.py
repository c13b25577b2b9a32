"""The store's on-disk vocabulary: format version, array names, dtypes, chunking and codecs.

Everything that decides how a record is laid out in Zarr lives here, so that the writer, the reader and
`FORMAT.md` agree by construction. Shapes use the letters of the legend below.

Legend: S samples in a shard, L positions per sample (the teacher's context, `seq_len`), K top-k entries,
E sampled (id, count) entries in a shard, H hidden size.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.codecs.numcodecs import Delta

FORMAT_NAME = "teacher-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"

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
        codec: key into `CODECS`.
        description: one line for `FORMAT.md` and `info`.
    """

    name: str
    axes: tuple[str, ...]
    dtype: np.dtype
    codec: str
    description: str


def _float_codecs(itemsize: int) -> dict:
    # Byte shuffle groups exponent and mantissa bytes; zstd then finds the repetition (field notes: ~1.9x on fp16).
    return {"filters": None, "compressors": [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=itemsize)]}


def _sorted_id_codecs(dtype: np.dtype) -> dict:
    # Ids ascending within a position become small gaps after delta coding (wrapping at position starts);
    # bit shuffle then exposes the mostly-zero high bits to zstd.
    return {
        "filters": [Delta(dtype=dtype.str)],
        "compressors": [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle", typesize=dtype.itemsize)],
    }


def _plain_codecs(dtype: np.dtype) -> dict:
    return {"filters": None, "compressors": [ZstdCodec(level=5)]}


def codecs_for(spec: ArraySpec) -> dict:
    """`filters` and `compressors` arguments of `zarr.create_array` for an array."""
    if spec.codec == "float":
        return _float_codecs(spec.dtype.itemsize)
    if spec.codec == "sorted_ids":
        return _sorted_id_codecs(spec.dtype)
    if spec.codec == "ids":
        return {
            "filters": None,
            "compressors": [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=spec.dtype.itemsize)],
        }
    assert spec.codec == "plain", spec.codec
    return _plain_codecs(spec.dtype)


def inner_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Inner chunk shape: whole trailing axes, as many leading rows as fit in about TARGET_CHUNK_BYTES."""
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else itemsize
    rows = max(1, min(max(shape[0], 1), TARGET_CHUNK_BYTES // max(row_bytes, 1)))
    return (rows, *[max(d, 1) for d in shape[1:]])


def array_specs(
    *, vocab_size: int, targets: dict, hidden_dtype: str = "float16"
) -> dict[str, ArraySpec]:
    """Every array a shard of a store with these targets holds, keyed by name.

    Args:
        vocab_size: the teacher's output vocabulary (logit dimension).
        targets: the manifest's `targets` section (kinds present and their parameters).
        hidden_dtype: dtype of stored hidden states.
    """
    ids = id_dtype(vocab_size)
    specs = [
        ArraySpec("input_ids", ("S", "L+1"), ids, "ids",
                  "tokens; position t is the teacher's input, t+1 its true next token"),
        ArraySpec("attention_mask", ("S", "L+1"), np.dtype(bool), "plain", "true for real (non-padding) tokens"),
        ArraySpec("loss_mask", ("S", "L"), np.dtype(bool), "plain",
                  "true where position t's target (token t+1) is trained on; targets elsewhere are zero"),
        ArraySpec("segment_ids", ("S", "L+1"), np.dtype(np.uint16), "plain",
                  "document number within the sample (packing boundaries), 0 for unpacked samples"),
        ArraySpec("entropy", ("S", "L"), np.dtype(np.float32), "float",
                  "exact entropy (nats) of the teacher's next-token distribution"),
        ArraySpec("true_logprob", ("S", "L"), np.dtype(np.float32), "float",
                  "teacher log-prob of the true next token"),
    ]
    if "topk" in targets:
        specs += [
            ArraySpec("topk_ids", ("S", "L", "K"), ids, "ids", "the k most likely ids, most likely first"),
            ArraySpec("topk_logprobs", ("S", "L", "K"), np.dtype(np.float16), "float",
                      "their log-probs, non-increasing along K"),
            ArraySpec("tail_logmass", ("S", "L"), np.dtype(np.float32), "float",
                      "log of the probability mass outside the top-k (log(1 - sum exp(topk_logprobs)), exact)"),
        ]
    if "sampled" in targets:
        counts = count_dtype(targets["sampled"]["num_draws"])
        specs += [
            ArraySpec("sampled_nunique", ("S", "L"), counts, "plain", "number of distinct ids drawn at a position"),
            ArraySpec("sampled_offsets", ("S+1",), np.dtype(np.uint64), "plain",
                      "entry offset of each sample's first position in sampled_ids/sampled_counts"),
            ArraySpec("sampled_ids", ("E",), ids, "sorted_ids", "distinct drawn ids, ascending within a position"),
            ArraySpec("sampled_counts", ("E",), counts, "plain", "how many of the draws gave that id"),
        ]
    for layer in targets.get("hidden_states", {}).get("layers", []):
        specs.append(ArraySpec(hidden_array_name(layer), ("S", "L", "H"), np.dtype(hidden_dtype), "float",
                               f"hidden states after block {layer} (0 = embeddings)"))
    return {s.name: s for s in specs}


def hidden_array_name(layer: int) -> str:
    """Array name for the hidden states of `layer` (an index into the model's hidden-state tuple, >= 0)."""
    return f"hidden_states_{layer}"
