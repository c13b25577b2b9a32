"""The teacher side of hybrid targets (`storage.targets.hybrid`): beside the top-k record, N draws per position from
the distribution conditioned on the tail (the ids outside the top-k), by the spec's scheme
(`teacher_cache.targets.draws`), encoded as sampled draws; positions without a tail get no entries. Runs after
`topk`, on the tail's weights of the pass over the vocabulary (`teacher_cache.targets.vocab_pass`)."""

from __future__ import annotations

import torch

from storage.targets import hybrid
from teacher_cache.targets.base import Block, Extractor, TargetSpec
from teacher_cache.targets.draws import draw
from teacher_cache.targets.sampled import empty_draws, encode_draws
from teacher_cache.targets.vocab_pass import TAIL


def tail_draws(tail_weights_pV: torch.Tensor, top_ids_pK: torch.Tensor, has_tail_p: torch.Tensor, num_draws: int,
               scheme: str, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """N draws per position from p(v) / m over the ids v outside the top-k (m the tail mass), encoded.

    Draws from exp(logit(v) - a), a the largest logit outside the top-k: the tail-conditional distribution itself up
    to its normaliser, so a tail far below fp32's smallest probability is drawn from as exactly as any other. A
    position without a tail (k >= V, or every id outside the top-k at probability 0) gets no entries. Overwrites
    `tail_weights_pV`.

    Args:
        tail_weights_pV: exp(logit - a) on the ids with logit <= a, 0 elsewhere and on every id of a position
            without a tail (`vocab_pass.TAIL`).
        top_ids_pK: the top-k ids, some of which may have logit a (ties): they get weight 0 here.
        has_tail_p: bool, the positions with a tail.
        num_draws: N.
        scheme: how the draws are made (`teacher_cache.targets.draws`).
        generator: random source of the draws.
    """
    conditional_pV = tail_weights_pV.scatter_(1, top_ids_pK, 0.0)
    conditional_pV[:, 0] += ~has_tail_p  # a draw needs some mass; those draws are not kept
    draws_pN = draw(conditional_pV, num_draws, scheme, generator, in_place=True)
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
        return tail_draws(block.weights_pV, block.top_ids_pK1[:, :spec.top_k], has_tail_p, spec.num_draws,
                          spec.draw_scheme, generator)

    def empty(self, spec: TargetSpec, device: torch.device) -> dict[str, torch.Tensor]:
        return empty_draws(device)


HYBRID = Hybrid()
