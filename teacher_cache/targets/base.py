"""What the teacher side of a target kind provides: its extraction from one chunk of positions' log-probs.

`teacher_cache.targets.extract_targets` runs the wanted kinds of `EXTRACTORS` in order over each chunk; they share
the chunk's log-probs and probabilities (`Chunk`), which some overwrite in place to spare a [chunk, vocab] buffer, so
the order is part of the contract: `sampled` draws from the probabilities before `topk` frees them, and `topk`
leaves the tail's log-probs for `hybrid`.

Legend: p positions in a chunk, V vocabulary, K top-k, N draws, E entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from teacher_cache.targets.draws import DEFAULT_DRAW_SCHEME


@dataclass(frozen=True)
class TargetSpec:
    """Which targets to extract.

    Attributes:
        top_k: k of the top-k record, or None to skip it.
        num_draws: N of the sampled record, or None to skip it.
        chunk_positions: positions whose logits are materialised at once.
        draws_from_tail: draw from the distribution conditioned on the ids outside the top-k (hybrid targets)
            instead of from the full distribution; needs `top_k` and `num_draws`.
        draw_scheme: how the draws are made, one of `storage.targets.sampled.DRAW_SCHEMES`
            (`teacher_cache.targets.draws`).
    """

    top_k: int | None
    num_draws: int | None
    chunk_positions: int = 1024
    draws_from_tail: bool = False
    draw_scheme: str = DEFAULT_DRAW_SCHEME

    def __post_init__(self) -> None:
        assert not self.draws_from_tail or (self.top_k is not None and self.num_draws is not None), self


@dataclass
class Chunk:
    """One chunk of positions' distribution, as the kinds' extractions share it.

    Attributes:
        logp_pV: fp32 log-softmax of the logits; `topk` overwrites the top-k ids with -inf, leaving the tail's.
        probs_pV: exp of `logp_pV`, or None once `topk` freed it; `sampled` overwrites invalid positions' rows.
        invalid_p1: [p, 1] bool, the positions without a distribution (NaN entropy), refused after extraction.
        out: the records extracted so far, by array name.
    """

    logp_pV: torch.Tensor
    probs_pV: torch.Tensor | None
    invalid_p1: torch.Tensor
    out: dict[str, torch.Tensor]


class Extractor:
    """The teacher side of a target kind (the same name as its `storage.targets` kind)."""

    name: str

    def wanted(self, spec: TargetSpec) -> bool:
        """Whether `spec` asks for this kind."""
        raise NotImplementedError

    def manifest_sections(self, spec: TargetSpec, seed: int) -> dict[str, dict]:
        """The manifest's `targets` sections this kind writes, e.g. {"topk": {...}}."""
        raise NotImplementedError

    def extract(self, chunk: Chunk, spec: TargetSpec, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """This kind's records of the chunk's positions."""
        raise NotImplementedError

    def empty(self, spec: TargetSpec, device: torch.device) -> dict[str, torch.Tensor]:
        """This kind's records of no positions (their shapes and dtypes)."""
        raise NotImplementedError


def zeros(device: torch.device, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)
