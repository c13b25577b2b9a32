"""Sampled targets: N draws with replacement from the teacher's full distribution, kept as the distinct ids of
each position (ascending) and how often each was drawn (`teacher-cache build --targets sampled --samples N`;
manifest section `sampled`).

The draws of a position are flat entries (axis E) located by `sampled_offsets` and `sampled_nunique`. Stores of
the vllm backend draw from the top-k plus one tail bucket, stored as the id `targets.sampled.tail_bucket_id` and
collated as TAIL_BUCKET. Hybrid targets (`storage.targets.hybrid`) keep their tail draws in the same arrays.
The draws are independent (`multinomial`) or systematic (`targets.sampled.draw_scheme`, `DRAW_SCHEMES`); both are
stored and read alike.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from storage.layout import ArraySpec, count_dtype, id_dtype
from storage.mixture import draw_split
from storage.targets.base import TargetKind, common

log = logging.getLogger(__name__)

# Arrays indexed by sampled entry (E) rather than by sample; `sampled_offsets` locates a sample's entries.
FLAT_ARRAYS = ("sampled_ids", "sampled_counts")
# Id of the tail bucket in collated sampled targets (draws the vllm backend makes from top-k + one tail bucket).
TAIL_BUCKET = -1
# How the N ids of a position are drawn (`teacher-cache build --draw-scheme`): independently, or at N evenly spaced
# points of the cumulative distribution with one random offset. A section without `draw_scheme` holds multinomial
# draws (every store built before systematic draws existed), so only other schemes are written.
MULTINOMIAL, SYSTEMATIC = "multinomial", "systematic"
DRAW_SCHEMES = (SYSTEMATIC, MULTINOMIAL)


def section(num_draws: int, seed: int, draw_scheme: str = MULTINOMIAL, **entries) -> dict:
    """The manifest's `sampled` section of draws from the full distribution, with `entries` added."""
    scheme = {} if draw_scheme == MULTINOMIAL else {"draw_scheme": draw_scheme}
    return {"num_draws": num_draws, "temperature": 1.0, "seed": seed, "source": "full distribution",
            "replacement": True, **scheme, **entries}


def draw_scheme(sampled_section: dict) -> str:
    """How the draws of a manifest's `sampled` section were made: one of DRAW_SCHEMES."""
    return sampled_section.get("draw_scheme", MULTINOMIAL)


def draws_from_tail(targets: dict) -> bool:
    """Whether a store's sampled draws come from the tail outside its top-k (hybrid targets, version 3)."""
    return targets.get("sampled", {}).get("draws_from") == "tail"


def tail_bucket(targets: dict) -> int | None:
    """The store id of the sampled draws' tail bucket (see the manifest's targets.sampled), or None."""
    return targets.get("sampled", {}).get("tail_bucket_id")


def draw_arrays(targets: dict, vocab_size: int, note: str = "") -> list[ArraySpec]:
    """The arrays of a store's draws (sampled or hybrid targets); `note` ends the ids' description."""
    counts = count_dtype(targets["sampled"]["num_draws"])
    bucket = tail_bucket(targets)
    sampled_ids = id_dtype(vocab_size) if bucket is None else id_dtype(bucket + 1)
    return [
        ArraySpec("sampled_nunique", ("S", "L"), counts, "zstd", "number of distinct ids drawn at a position"),
        ArraySpec("sampled_offsets", ("S+1",), np.dtype(np.uint64), "zstd",
                  "entry offset of each sample's first position in sampled_ids/sampled_counts"),
        ArraySpec("sampled_ids", ("E",), sampled_ids, "delta_shuffle_zstd",
                  "distinct drawn ids, ascending within a position"
                  + ("" if bucket is None else f"; {bucket} = the tail bucket (any id outside the top-k)") + note),
        ArraySpec("sampled_counts", ("E",), counts, "shuffle_zstd", "how many of the draws gave that id"),
    ]


def pad_sampled(ids_E: np.ndarray, counts_E: np.ndarray, nunique_BL: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat sampled entries -> [B, L, M] ids (int64) and counts (float32); padding is id 0 with count 0."""
    n_P = nunique_BL.reshape(-1).astype(np.int64)
    start_P = np.cumsum(n_P) - n_P
    m = int(n_P.max()) if len(n_P) else 0
    col_M = np.arange(m)
    valid_PM = col_M < n_P[:, None]
    index_PM = np.where(valid_PM, start_P[:, None] + col_M, 0)
    ids_PM = np.where(valid_PM, ids_E[index_PM], 0).astype(np.int64)
    counts_PM = np.where(valid_PM, counts_E[index_PM], 0).astype(np.float32)
    shape = (*nunique_BL.shape, m)
    return ids_PM.reshape(shape), counts_PM.reshape(shape)


def collate_draws(record: dict[str, np.ndarray], targets: dict) -> dict[str, torch.Tensor]:
    """[B, L, M] `sampled_ids` and `sampled_counts` of a batch, the store's tail bucket as TAIL_BUCKET."""
    ids_BLM, counts_BLM = pad_sampled(record["sampled_ids"], record["sampled_counts"], record["sampled_nunique"])
    if (bucket := tail_bucket(targets)) is not None:
        ids_BLM[ids_BLM == bucket] = TAIL_BUCKET
    return {"sampled_ids": torch.from_numpy(ids_BLM), "sampled_counts": torch.from_numpy(counts_BLM)}


class Sampled(TargetKind):
    name = "sampled"
    section = "sampled"

    def present(self, targets: dict) -> bool:
        return self.section in targets and not draws_from_tail(targets)

    def array_specs(self, targets: dict, *, vocab_size: int, format_version: int) -> list[ArraySpec]:
        return draw_arrays(targets, vocab_size)

    def describe(self, targets: dict) -> str:
        sampled = targets["sampled"]
        return (f"sampled: {sampled['num_draws']} draws ({sampled.get('source', 'full distribution')}, "
                f"{draw_scheme(sampled)})")

    def collate(self, record, targets):
        return collate_draws(record, targets)

    def concat_key(self, section: dict) -> dict:
        # Without the seed: independent draws of the same teacher may follow each other. With the scheme, also where
        # the section leaves it out, so that a store of another scheme is named as such.
        return {key: value for key, value in section.items() if key != "seed"} | {"draw_scheme": draw_scheme(section)}

    def concat_section(self, sections: list[dict]) -> dict:
        return sections[0] | {"seed": common([s.get("seed") for s in sections])}

    def ensemble(self, names: list[str], targets: list[dict], *, weights: list[float],
                 top_k: int | None) -> list[int] | None:
        """Draws to pool from each member, or None (with a warning why) when the draws cannot be kept."""
        if missing := [name for name, t in zip(names, targets, strict=True) if self.section not in t]:
            log.warning("sampled targets dropped: %s hold none", ", ".join(missing))
            return None
        if bucket := [name for name, t in zip(names, targets, strict=True) if tail_bucket(t) is not None]:
            log.warning("sampled targets dropped: the draws of %s include a tail bucket (the mass outside that store's "
                        "own top-k), which means something else in each store and cannot be pooled", ", ".join(bucket))
            return None
        if any(draws_from_tail(t) for t in targets):
            return None  # the hybrid kind says why
        num_draws = [t["sampled"]["num_draws"] for t in targets]
        split = draw_split(weights, num_draws)
        if split is None:
            log.warning("sampled targets dropped: the weights %s cannot split draws into whole numbers within the "
                        "stores' %s draws per position; use weights in ratios of small integers (e.g. 0.75,0.25)",
                        [round(w, 6) for w in weights], num_draws)
        return split


SAMPLED = Sampled()
