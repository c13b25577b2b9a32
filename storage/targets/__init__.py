"""The registry of target kinds, and what a store's arrays, statistics, batches and merges are, composed from the
kinds its manifest's `targets` section holds.

Each kind is one module here (`topk`, `sampled`, `hybrid`, `hidden`, `rollout`; `base` holds the protocol and the
records every store has). A kind present in a store is one whose `present` says so: a hybrid store holds `topk` and
`hybrid`, never `sampled`.
"""

from __future__ import annotations

import numpy as np
import torch

from storage.layout import FORMAT_VERSION, ArraySpec
from storage.stats import masked_mean
from storage.targets.base import TargetKind, base_specs, base_stats_specs
from storage.targets.hidden import HIDDEN
from storage.targets.hybrid import HYBRID
from storage.targets.rollout import ROLLOUT
from storage.targets.sampled import SAMPLED
from storage.targets.topk import TOPK

# Every kind, in the order a shard lists their arrays.
KINDS: dict[str, TargetKind] = {kind.name: kind for kind in (TOPK, SAMPLED, HYBRID, HIDDEN, ROLLOUT)}


def present_kinds(targets: dict) -> list[TargetKind]:
    """The kinds a store with the manifest section `targets` holds, in KINDS order."""
    return [kind for kind in KINDS.values() if kind.present(targets)]


def array_specs(*, vocab_size: int, targets: dict, format_version: int = FORMAT_VERSION) -> dict[str, ArraySpec]:
    """Every array a shard of a store with these targets holds, keyed by name.

    Args:
        vocab_size: the teacher's output vocabulary (logit dimension).
        targets: the manifest's `targets` section (kinds present and their parameters).
        format_version: the store's format version; version 1 has no statistics arrays.
    """
    specs = base_specs(vocab_size)
    for kind in present_kinds(targets):
        specs += kind.array_specs(targets, vocab_size=vocab_size, format_version=format_version)
    if format_version >= 2:
        specs += stats_specs(targets)
    return {s.name: s for s in specs}


def stats_specs(targets: dict) -> list[ArraySpec]:
    """The per-sample statistics arrays (format version 2 on): every store's and its kinds'."""
    return base_stats_specs() + [spec for kind in present_kinds(targets) for spec in kind.stats_specs(targets)]


def stat_names(targets: dict) -> list[str]:
    """The names of the statistics arrays a store with these targets holds (format version 2 on)."""
    return [spec.name for spec in stats_specs(targets)]


def sample_stats(record: dict[str, np.ndarray], targets: dict) -> dict[str, np.ndarray]:
    """The statistics arrays (`storage/stats.py`) of the samples of a record, keyed by array name."""
    mask = record["loss_mask"].astype(bool)
    counts = mask.sum(axis=1)
    out = {
        "stats_num_tokens": counts.astype(np.uint32),
        "stats_entropy": masked_mean(record["entropy"], mask, counts),
        "stats_nll": masked_mean(-record["true_logprob"].astype(np.float64), mask, counts),
    }
    for kind in present_kinds(targets):
        out |= kind.sample_stats(record, mask, counts, targets)
    return out


def axis_lengths(targets: dict) -> dict[str, int]:
    """The lengths the kinds' options give the axis letters of their arrays (K, R, H)."""
    return {axis: n for kind in present_kinds(targets) for axis, n in kind.axis_lengths(targets).items()}


def describe_targets(targets: dict) -> str:
    """The target kinds of a `targets` section in a few words, e.g. "hybrid: top-64 + tail mass, 50 draws from the
    tail outside the top-64 (systematic)" or "topk: top-64 + tail mass; sampled: 50 draws (full distribution,
    multinomial)"."""
    kinds = present_kinds(targets)
    covered = {name for kind in kinds for name in kind.requires}
    parts = [kind.describe(targets) for kind in kinds if kind.name not in covered]
    return "; ".join(part for part in parts if part) or "entropy and true-token log-prob only"


def collate_targets(record: dict[str, np.ndarray], targets: dict) -> dict[str, torch.Tensor]:
    """The batch's tensors of every kind a store holds, from the rows a loader read."""
    batch: dict[str, torch.Tensor] = {}
    for kind in present_kinds(targets):
        batch |= kind.collate(record, targets)
    return batch


def concat_key(targets: dict) -> dict:
    """What of a `targets` section must be equal for two stores to be concatenated."""
    key = dict(targets)
    for kind in present_kinds(targets):
        key[kind.section] = kind.concat_key(targets[kind.section])
    return key


def concat_targets(sections: list[dict]) -> dict:
    """The `targets` section of the concatenation of stores with the (concatenable) sections `sections`."""
    targets = dict(sections[0])
    for kind in present_kinds(targets):
        targets[kind.section] = kind.concat_section([t[kind.section] for t in sections])
    return targets


def mixed_notes(sections: list[dict]) -> list[str]:
    """Why some of these stores' kinds cannot meet those of the others, for kinds some hold and others do not."""
    notes = []
    for kind in KINDS.values():
        if len({kind.present(t) for t in sections}) > 1 and kind.mixed_note():
            notes.append(kind.mixed_note())
    return notes
