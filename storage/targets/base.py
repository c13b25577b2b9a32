"""What every target kind provides, and the records every store holds whatever its kinds.

A *target kind* is one way of keeping the teacher's next-token distribution: top-k + tail mass (`topk`), draws
from the full distribution (`sampled`), the exact top-k plus draws from the tail (`hybrid`), hidden states
(`hidden`). Each kind is one module of this package, a `TargetKind` listed in `storage.targets.KINDS`; the
teacher's extraction (`teacher_cache.targets`) and the student's reading of it (`student_train.targets`) register
under the same names. Beside the kinds' records, every store holds the sample arrays and the teacher's exact
entropy and true-token log-prob (`BASE_SPECS`).

Legend as in `storage.layout`: S samples, L positions, K top-k entries, E sampled entries, H hidden size, R rank
bins.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from storage.layout import ArraySpec, id_dtype

log = logging.getLogger(__name__)


class TargetKind:
    """One kind of targets: how the manifest records it, which arrays hold it in each format version, its
    per-sample statistics, how a batch reads it, and whether stores of it can be concatenated or ensembled.

    Attributes:
        name: the kind's name: `teacher-cache build --targets NAME` (hidden states: `--hidden-layers`), `info`.
        section: the key of the manifest's `targets` section that records it.
        requires: the kinds a store of this kind always holds beside it, which its description covers.
    """

    name: str
    section: str
    requires: tuple[str, ...] = ()

    def present(self, targets: dict) -> bool:
        """Whether a store with the manifest section `targets` holds this kind."""
        return self.section in targets

    def array_specs(self, targets: dict, *, vocab_size: int, format_version: int) -> list[ArraySpec]:
        """The arrays that hold this kind in a shard of a store of `format_version`."""
        raise NotImplementedError

    def stats_specs(self, targets: dict) -> list[ArraySpec]:
        """This kind's per-sample statistics arrays (format version 2 on); `sample_stats` computes them."""
        return []

    def sample_stats(self, record: dict[str, np.ndarray], mask: np.ndarray, counts: np.ndarray,
                     targets: dict) -> dict[str, np.ndarray]:
        """The arrays of `stats_specs` for the samples of `record` ([S, L] loss `mask`, `counts` trained per sample)."""
        return {}

    def axis_lengths(self, targets: dict) -> dict[str, int]:
        """The lengths this kind's options give axis letters of its arrays (K, H, R)."""
        return {}

    def describe(self, targets: dict) -> str:
        """A few words for `info`, e.g. "topk: top-64 + tail mass" ("" for nothing to say there)."""
        raise NotImplementedError

    def collate(self, record: dict[str, np.ndarray], targets: dict) -> dict[str, torch.Tensor]:
        """The batch's tensors of this kind (int64 ids, float32 values) from the rows a loader read."""
        raise NotImplementedError

    def concat_key(self, section: dict) -> dict:
        """What of this kind's manifest section must be equal for two stores to be concatenated."""
        return section

    def concat_section(self, sections: list[dict]) -> dict:
        """This kind's manifest section of the concatenation of stores with the sections `sections`."""
        return dict(sections[0])

    def mixed_note(self) -> str:
        """Why stores with this kind and stores without it cannot be concatenated (a sentence, or "")."""
        return ""

    def ensemble(self, names: list[str], targets: list[dict], *, weights: list[float], top_k: int | None):
        """What an ensemble of the stores `names` (manifest sections `targets`, normalised `weights`) keeps of this
        kind, for `storage.ensemble` to mix; None (with a warning naming the stores that hold it) when it keeps
        nothing. A kind is dropped unless it says how to mix it.

        Raises:
            ValueError: an option the kind's ensemble cannot honour (e.g. a top-k larger than any member's).
        """
        if holders := [name for name, t in zip(names, targets, strict=True) if self.present(t)]:
            log.warning("%s targets dropped: those of %s cannot be ensembled", self.name, ", ".join(holders))
        return None


def common(values: list):
    """The value all of several merged stores share, or None where they differ (each source keeps its own)."""
    return values[0] if all(v == values[0] for v in values) else None


def base_specs(vocab_size: int) -> list[ArraySpec]:
    """The arrays every shard holds, whatever the store's target kinds."""
    return [
        ArraySpec("input_ids", ("S", "L+1"), id_dtype(vocab_size), "zstd",
                  "tokens; position t is the teacher's input, t+1 its true next token"),
        ArraySpec("attention_mask", ("S", "L+1"), np.dtype(bool), "zstd", "true for real (non-padding) tokens"),
        ArraySpec("loss_mask", ("S", "L"), np.dtype(bool), "zstd",
                  "true where position t's target (token t+1) is trained on; targets elsewhere are zero"),
        ArraySpec("segment_ids", ("S", "L+1"), np.dtype(np.uint16), "zstd",
                  "document number within the sample (packing boundaries), 0 for unpacked samples"),
        ArraySpec("entropy", ("S", "L"), np.dtype(np.float32), "shuffle_zstd",
                  "teacher entropy (nats); exact unless the manifest's targets.entropy says otherwise"),
        ArraySpec("true_logprob", ("S", "L"), np.dtype(np.float32), "shuffle_zstd",
                  "teacher log-prob of the true next token"),
    ]


def base_stats_specs() -> list[ArraySpec]:
    """The per-sample statistics arrays every store holds from format version 2 (`storage/stats.py`)."""
    return [
        ArraySpec("stats_num_tokens", ("S",), np.dtype(np.uint32), "zstd", "trained positions (loss mask set)"),
        ArraySpec("stats_entropy", ("S",), np.dtype(np.float32), "shuffle_zstd",
                  "mean teacher entropy over the trained positions (nats; NaN without any)"),
        ArraySpec("stats_nll", ("S",), np.dtype(np.float32), "shuffle_zstd",
                  "mean negative log-prob of the true next token over the trained positions (nats)"),
    ]
