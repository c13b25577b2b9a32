"""Per-sample statistics of the teacher's targets, stored with each shard from format version 2.

Inspection and selection (`teacher-cache inspect`, `teacher-cache select`) read these small arrays only, never
the targets. They are computed from the record a shard stores (so every backend, a merge and an ensemble agree
by construction) over the sample's trained positions (loss mask set):

- `stats_num_tokens`  trained positions;
- `stats_entropy`     mean teacher entropy (nats);
- `stats_nll`         mean negative log-prob of the true next token (nats);
- `stats_tail_mass`   mean probability mass outside the top-k (top-k stores only);
- `stats_true_rank`   histogram of the true token's rank among the top-k, in power-of-two bins (top-k stores
                      only): bin 0 holds rank 1, bin b >= 1 ranks 2^(b-1)+1 .. 2^b (capped at k), and the last bin
                      the positions whose true token is outside the top-k. Ranks count the top-k entries with a
                      strictly greater stored log-prob, plus one.

Means over a sample without trained positions are NaN. Stores of version 1 have no statistics; readers compute
them from the targets with `storage.targets.sample_stats` (slower, same values), which composes these statistics
with those of the store's target kinds.
"""

from __future__ import annotations

import math

import numpy as np

STATS_PREFIX = "stats_"


def rank_bins(k: int) -> int:
    """Number of bins of `stats_true_rank` for top-k targets: ceil(log2 k) + 1 rank bins and one "outside"."""
    return math.ceil(math.log2(k)) + 2 if k > 1 else 2


def rank_bin_labels(k: int) -> list[str]:
    """Human-readable rank range of each bin of `stats_true_rank`, e.g. ["1", "2", "3-4", ..., ">k"]."""
    labels = []
    for b in range(rank_bins(k) - 1):
        low, high = (1, 1) if b == 0 else (2 ** (b - 1) + 1, min(2 ** b, k))
        labels.append(str(low) if low == high else f"{low}-{high}")
    return labels + [f">{k}"]


def masked_mean(values: np.ndarray, mask: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[S] float32 mean of [S, L] `values` over each sample's `mask`ed positions (`counts` of them), NaN without any."""
    total = np.where(mask, values.astype(np.float64), 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, total / np.maximum(counts, 1), np.nan).astype(np.float32)


def true_ranks(record: dict[str, np.ndarray]) -> np.ndarray:
    """[S, L] rank of the true next token among the stored top-k (1 = most likely), or 0 where it is outside."""
    ids = record["topk_ids"].astype(np.int64)
    logprobs = record["topk_logprobs"].astype(np.float32)
    true = record["input_ids"][:, 1:].astype(np.int64)[..., None]
    hit = ids == true
    inside = hit.any(axis=-1)
    true_lp = np.where(hit, logprobs, -np.inf).max(axis=-1, keepdims=True)
    ranks = (logprobs > true_lp).sum(axis=-1) + 1
    return np.where(inside, ranks, 0)


def rank_histogram(ranks: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """[S, rank_bins(k)] counts of `true_ranks` per bin over the masked positions."""
    bins = rank_bins(k)
    index = np.where(ranks > 0, np.ceil(np.log2(np.maximum(ranks, 1))).astype(np.int64), bins - 1)
    flat = np.arange(ranks.shape[0])[:, None] * bins + index
    hist = np.bincount(flat[mask], minlength=ranks.shape[0] * bins)
    return hist.reshape(ranks.shape[0], bins).astype(np.uint32)
