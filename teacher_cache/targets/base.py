"""What the teacher side of a target kind provides: its extraction from one block of positions' logits.

`teacher_cache.targets.extract_targets` makes one pass over a block's logits (`teacher_cache.targets.vocab_pass`)
and runs the wanted kinds of `EXTRACTORS` in order over what it gives (`Block`): `topk` records the top-k and the
tail's mass, which `hybrid` reads after it; `sampled` and `hybrid` draw from the block's weights, of which the pass
keeps only their sums over blocks of ids (`teacher_cache.targets.draws.draw_from_blocks`; a spec asks for one of the
two at most).

Legend: p positions in a block, V vocabulary, Q blocks of ids, K top-k, K1 = K + 1 (K where K = V), N draws,
E entries.
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
        chunk_positions: positions whose logits are materialised at once: the output head's batch, which wants
            to be large to amortise reading the head's weights.
        block_positions: positions of a chunk extracted at once; None extracts the whole chunk at once. On CPU,
            a block that stays in cache across the passes of the extraction is faster than a whole chunk.
        draws_from_tail: draw from the distribution conditioned on the ids outside the top-k (hybrid targets)
            instead of from the full distribution; needs `top_k` and `num_draws`.
        draw_scheme: how the draws are made, one of `storage.targets.sampled.DRAW_SCHEMES`
            (`teacher_cache.targets.draws`).
        compiled: fuse the pass over the vocabulary with `torch.compile` on CPU (`teacher_cache.targets.vocab_pass`);
            the same targets, compiled once per process.
    """

    top_k: int | None
    num_draws: int | None
    chunk_positions: int = 1024
    block_positions: int | None = None
    draws_from_tail: bool = False
    draw_scheme: str = DEFAULT_DRAW_SCHEME
    compiled: bool = False

    def __post_init__(self) -> None:
        assert not self.draws_from_tail or (self.top_k is not None and self.num_draws is not None), self


@dataclass
class Block:
    """One block of positions' distribution, as the kinds' extractions share it.

    Attributes:
        logits_pV: the fp32 logits, which the draws read again at the ids of the blocks they draw.
        max_p1: the largest logit (NaN where a logit is NaN).
        lse_p1: the log-normaliser: log p(v) = logit(v) - lse.
        top_logits_pK1: with top-k, the K + 1 largest logits in descending order (the last the largest outside
            the top-k), or all V where K = V; else None.
        top_ids_pK1: their ids, or None.
        tail_max_p1: with top-k, the largest logit outside the top-k (-inf without a tail), else None.
        tail_sum_p1: with top-k, sum over the ids outside the top-k of exp(logit - tail_max) (0 without a tail).
        block_sums_pQ: with draws, their weights summed over blocks of ids (`teacher_cache.targets.vocab_pass`).
        block_at_tail_max_pQ: with draws from the tail, the count of ids at the tail's largest logit per block.
        out: the records extracted so far, by array name.
    """

    logits_pV: torch.Tensor
    max_p1: torch.Tensor
    lse_p1: torch.Tensor
    top_logits_pK1: torch.Tensor | None
    top_ids_pK1: torch.Tensor | None
    tail_max_p1: torch.Tensor | None
    tail_sum_p1: torch.Tensor | None
    block_sums_pQ: torch.Tensor | None
    block_at_tail_max_pQ: torch.Tensor | None
    out: dict[str, torch.Tensor]


class Extractor:
    """The teacher side of a target kind (the same name as its `storage.targets` kind)."""

    name: str
    # The weights its draws come from (`vocab_pass.FULL` or `TAIL`), None without draws.
    weights: str | None = None

    def wanted(self, spec: TargetSpec) -> bool:
        """Whether `spec` asks for this kind."""
        raise NotImplementedError

    def manifest_sections(self, spec: TargetSpec, seed: int) -> dict[str, dict]:
        """The manifest's `targets` sections this kind writes, e.g. {"topk": {...}}."""
        raise NotImplementedError

    def extract(self, block: Block, spec: TargetSpec, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """This kind's records of the block's positions."""
        raise NotImplementedError

    def empty(self, spec: TargetSpec, device: torch.device) -> dict[str, torch.Tensor]:
        """This kind's records of no positions (their shapes and dtypes)."""
        raise NotImplementedError


def zeros(device: torch.device, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)
