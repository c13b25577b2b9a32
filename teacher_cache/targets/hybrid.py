"""The teacher side of hybrid targets (`storage.targets.hybrid`): beside the top-k record, N draws per position from
the distribution conditioned on the tail (the ids outside the top-k), by the spec's scheme
(`teacher_cache.targets.draws`), encoded as sampled draws; positions without a tail get no entries. Runs after
`topk`, on the tail's block sums of the pass over the vocabulary (`teacher_cache.targets.vocab_pass`) and the tail's
weights recomputed at the drawn blocks' ids.

Legend: p positions in a block, V vocabulary, Q blocks of ids, K top-k, N draws, X ids of the drawn blocks."""

from __future__ import annotations

import torch

from storage.targets import hybrid
from teacher_cache.targets.base import Block, Extractor, TargetSpec
from teacher_cache.targets.draws import DRAW_BLOCK, block_ids, draw_from_blocks
from teacher_cache.targets.sampled import empty_draws, encode_draws
from teacher_cache.targets.vocab_pass import TAIL, below_anchor


def tail_draws(block: Block, top_k: int, has_tail_p: torch.Tensor, num_draws: int, scheme: str,
               generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """N draws per position from p(v) / m over the ids v outside the top-k (m the tail mass), encoded.

    Draws from exp(logit(v) - a), a the largest logit outside the top-k: the tail-conditional distribution itself up
    to its normaliser, so a tail far below fp32's smallest probability is drawn from as exactly as any other. The
    weights of a block of ids are the pass's sum over its logits below a plus its count of ids at a less its top-k
    ids at a (ties at the boundary), the latter two exact integers: a block without tail ids (only top-k ids, or
    ids at probability 0) weighs exactly 0 and is never drawn. A position without a tail (k >= V, or every id
    outside the top-k at probability 0) gets no entries.

    Args:
        block: the block's distribution, with the TAIL block sums of the pass (`vocab_pass`).
        top_k: k.
        has_tail_p: bool, the positions with a tail.
        num_draws: N.
        scheme: how the draws are made (`teacher_cache.targets.draws`).
        generator: random source of the draws.
    """
    V = block.logits_pV.shape[1]
    tail_max_p1, top_ids_pK = block.tail_max_p1, block.top_ids_pK1[:, :top_k]
    tied_pK = (block.top_logits_pK1[:, :top_k] == tail_max_p1) & (tail_max_p1 > float("-inf"))
    kept_at_max_pQ = block.block_at_tail_max_pQ.scatter_add(1, top_ids_pK // DRAW_BLOCK, -tied_pK.float())
    weights_pQ = block.block_sums_pQ + kept_at_max_pQ
    weights_pQ[:, 0] += ~has_tail_p  # a draw needs some mass; those draws are not kept
    # The tied ids ascending, V in place of the others: an id is one of them if a binary search finds it.
    tied_ids_pK = torch.where(tied_pK, top_ids_pK, V).sort(-1).values

    def tail_weights(logits_pX: torch.Tensor, blocks_pN: torch.Tensor) -> torch.Tensor:
        ids_pX = block_ids(blocks_pN)
        found_pX = tied_ids_pK.gather(1, torch.searchsorted(tied_ids_pK, ids_pX).clamp_max_(top_k - 1))
        return below_anchor(logits_pX, tail_max_p1) + ((logits_pX == tail_max_p1) & (found_pX != ids_pX))

    draws_pN = draw_from_blocks(block.logits_pV, weights_pQ, tail_weights, num_draws, scheme, generator)
    return encode_draws(draws_pN, drawn_P=has_tail_p)


class Hybrid(Extractor):
    name = "hybrid"
    weights = TAIL

    def wanted(self, spec: TargetSpec) -> bool:
        return spec.draws_from_tail

    def manifest_sections(self, spec: TargetSpec, seed: int) -> dict[str, dict]:
        return {"sampled": hybrid.section(spec.num_draws, seed, spec.draw_scheme)}

    def extract(self, block: Block, spec: TargetSpec, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        # An invalid position has a NaN tail mass: with no tail either, it draws nothing.
        has_tail_p = block.out["tail_logmass"] > float("-inf")
        return tail_draws(block, spec.top_k, has_tail_p, spec.num_draws, spec.draw_scheme, generator)

    def empty(self, spec: TargetSpec, device: torch.device) -> dict[str, torch.Tensor]:
        return empty_draws(device)


HYBRID = Hybrid()
