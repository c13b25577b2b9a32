"""Top-k + tail targets: the k most likely ids of each position, their log-probs, and the log of the mass
outside them (`teacher-cache build --targets topk --top-k K`; manifest section `topk`).

Format versions: 1 stores the log-probs as fp16; 2 as int16 steps of 1/LOGPROB_SCALE nat; 3 on as the position's
lowest log-prob (`topk_logprob_floor`) plus unsigned excesses above it (`split_logprobs`, the writer's encoding),
which readers join back into `topk_logprobs` (`join_logprobs`), with the ids at a higher zstd level. Statistics
(version 2 on): the mean tail mass and the histogram of the true token's rank among the top-k.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from storage.layout import LOGPROB_SCALE, ArraySpec, id_dtype
from storage.stats import masked_mean, rank_bins, rank_histogram, true_ranks
from storage.targets.base import TargetKind

log = logging.getLogger(__name__)

ARRAYS = ("topk_ids", "topk_logprobs", "tail_logmass")  # what a reader returns for this kind

# Version 3 stores top-k log-probs as the position's lowest one (`TOPK_FLOOR`) plus each one's excess above it
# (`TOPK_EXCESS`, unsigned): the excesses cluster near 0 (most of a top-k sits just above its cut-off) and compress
# about 13% smaller than the log-probs themselves. Readers join them back into the logical `topk_logprobs`.
TOPK_LOGPROBS, TOPK_FLOOR, TOPK_EXCESS = "topk_logprobs", "topk_logprob_floor", "topk_logprob_excess"


def split_logprobs(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantized top-k log-probs [..., K] -> (floor [...], excess [..., K] >= 0), exact: both are multiples of
    1/LOGPROB_SCALE, so floor + excess gives back the same float32 values."""
    floor = logprobs.min(axis=-1) if logprobs.shape[-1] else np.zeros(logprobs.shape[:-1], np.float32)
    return floor.astype(np.float32), (logprobs - floor[..., None]).astype(np.float32)


def join_logprobs(floor: np.ndarray, excess: np.ndarray) -> np.ndarray:
    """The inverse of `split_logprobs`: top-k log-probs [..., K] (float32)."""
    return (floor[..., None] + excess).astype(np.float32)


def physical_names(names: list[str], specs: dict) -> list[str]:
    """The arrays a shard stores for the logical arrays `names` (version 3 stores `topk_logprobs` in two)."""
    out = []
    for name in names:
        out += [TOPK_FLOOR, TOPK_EXCESS] if name == TOPK_LOGPROBS and TOPK_EXCESS in specs else [name]
    return out


def logical_name(name: str) -> str:
    """The array a reader returns for the stored array `name` (version 3's floor and excesses: topk_logprobs)."""
    return TOPK_LOGPROBS if name in (TOPK_FLOOR, TOPK_EXCESS) else name


def logical_names(names: list[str]) -> list[str]:
    """The inverse of `physical_names`: what a reader returns for the stored arrays `names`."""
    return list(dict.fromkeys(map(logical_name, names)))


def logical_sizes(sizes: dict[str, float]) -> dict[str, float]:
    """Sizes (bytes, bytes per token) of stored arrays summed by the array a reader returns for each."""
    out: dict[str, float] = {}
    for name, size in sizes.items():
        out[logical_name(name)] = out.get(logical_name(name), 0) + size
    return out


def section(k: int, **entries) -> dict:
    """The manifest's `topk` section of a store written by this release, with `entries` (e.g. a source) added."""
    return {"k": k, "logprob_step": 1 / LOGPROB_SCALE, "order": "ascending id", "tail": "tail_logmass", **entries}


class TopK(TargetKind):
    name = "topk"
    section = "topk"

    def array_specs(self, targets: dict, *, vocab_size: int, format_version: int) -> list[ArraySpec]:
        ids = id_dtype(vocab_size)
        tail_steps = f", in steps of 1/{LOGPROB_SCALE} nat"
        if format_version == 1:
            return [
                ArraySpec("topk_ids", ("S", "L", "K"), ids, "zstd", "the k most likely ids, ascending"),
                ArraySpec("topk_logprobs", ("S", "L", "K"), np.dtype(np.float16), "shuffle_zstd",
                          "their log-probs, aligned with topk_ids"),
                ArraySpec("tail_logmass", ("S", "L"), np.dtype(np.float32), "shuffle_zstd",
                          "log of the probability mass outside the top-k, log(1 - sum exp(topk_logprobs))"),
            ]
        tail = ArraySpec("tail_logmass", ("S", "L"), np.dtype(np.float32), "logprob_shuffle_zstd",
                         "log of the probability mass outside the top-k, log(1 - sum exp(topk_logprobs))" + tail_steps)
        if format_version == 2:
            return [
                ArraySpec("topk_ids", ("S", "L", "K"), ids, "zstd", "the k most likely ids, ascending"),
                ArraySpec("topk_logprobs", ("S", "L", "K"), np.dtype(np.float32), "logprob_shuffle_zstd",
                          "their log-probs, aligned with topk_ids" + tail_steps),
                tail,
            ]
        return [
            ArraySpec("topk_ids", ("S", "L", "K"), ids, "zstd_high", "the k most likely ids, ascending"),
            ArraySpec(TOPK_FLOOR, ("S", "L"), np.dtype(np.float32), "logprob_shuffle_zstd",
                      "the lowest of the position's top-k log-probs" + tail_steps),
            ArraySpec(TOPK_EXCESS, ("S", "L", "K"), np.dtype(np.float32), "excess_shuffle_zstd",
                      f"each top-k log-prob minus {TOPK_FLOOR}, aligned with topk_ids, in steps of "
                      f"1/{LOGPROB_SCALE} nat: topk_logprobs = {TOPK_FLOOR}[..., None] + {TOPK_EXCESS}"),
            tail,
        ]

    def stats_specs(self, targets: dict) -> list[ArraySpec]:
        return [
            ArraySpec("stats_tail_mass", ("S",), np.dtype(np.float32), "shuffle_zstd",
                      "mean probability mass outside the top-k over the trained positions"),
            ArraySpec("stats_true_rank", ("S", "R"), np.dtype(np.uint32), "zstd",
                      "trained positions per bin of the true token's top-k rank: 1, 2, 3-4, 5-8, ..., outside"),
        ]

    def sample_stats(self, record, mask, counts, targets):
        return {
            "stats_tail_mass": masked_mean(np.exp(record["tail_logmass"].astype(np.float64)), mask, counts),
            "stats_true_rank": rank_histogram(true_ranks(record), mask, targets["topk"]["k"]),
        }

    def axis_lengths(self, targets: dict) -> dict[str, int]:
        k = targets["topk"].get("k")
        return {"K": k, "R": rank_bins(k)}

    def describe(self, targets: dict) -> str:
        return f"topk: top-{targets['topk']['k']} + tail mass"

    def collate(self, record, targets):
        return {"topk_ids": torch.from_numpy(record["topk_ids"].astype(np.int64)),
                "topk_logprobs": torch.from_numpy(record["topk_logprobs"].astype(np.float32)),
                "tail_logmass": torch.from_numpy(record["tail_logmass"].astype(np.float32))}

    def concat_key(self, section: dict) -> dict:
        # Without how a format version encodes the log-probs (version 1 fp16, version 2 on steps of 1/64 nat).
        return {key: value for key, value in section.items() if key not in ("logprob_dtype", "logprob_step")}

    def concat_section(self, sections: list[dict]) -> dict:
        # The output is written in this release's format.
        out = {key: value for key, value in sections[0].items() if key != "logprob_dtype"}
        return out | {"logprob_step": 1 / LOGPROB_SCALE}

    def ensemble(self, names: list[str], targets: list[dict], *, weights: list[float], top_k: int | None) -> int | None:
        """The k of an ensemble's top-k (the union of the members' top-k, cut to `top_k`), or None (with a
        warning) when a member has none.

        Raises:
            ValueError: `top_k` exceeds the largest member k.
        """
        if missing := [name for name, t in zip(names, targets, strict=True) if not self.present(t)]:
            log.warning("top-k targets dropped: %s hold none", ", ".join(missing))
            return None
        largest = max(t["topk"]["k"] for t in targets)
        if top_k is not None and top_k > largest:
            raise ValueError(f"--top-k {top_k} exceeds the largest k of the stores ({largest}): the union of "
                             f"their top-k ids may hold no more. Choose --top-k {largest} or less.")
        return top_k or largest


TOPK = TopK()
