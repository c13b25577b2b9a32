"""The teacher side of hybrid targets (`storage.targets.hybrid`): beside the top-k record, N draws per position from
the distribution conditioned on the tail (the ids outside the top-k), by the spec's scheme
(`teacher_cache.targets.draws`), encoded as sampled draws; positions without a tail get no entries. Runs after
`topk`, on the tail's log-probs it leaves."""

from __future__ import annotations

import torch

from storage.targets import hybrid
from teacher_cache.targets.base import Chunk, Extractor, TargetSpec
from teacher_cache.targets.draws import draw
from teacher_cache.targets.sampled import empty_draws, encode_draws


def tail_draws(tail_logp_pV: torch.Tensor, tail_logmass_p: torch.Tensor, num_draws: int, scheme: str,
               generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """N draws per position from p(v) / m over the ids v outside the top-k (m the tail mass), encoded.

    Draws from exp(log p(v) - log m), the tail-conditional distribution itself: a tail far below fp32's smallest
    probability is drawn from as exactly as any other. A position without a tail (k >= V, or every id outside the
    top-k at probability 0) gets no entries. Overwrites `tail_logp_pV`.

    Args:
        tail_logp_pV: the teacher's log-probs with -inf on each position's top-k ids.
        tail_logmass_p: log of the tail mass, the logsumexp of `tail_logp_pV` (-inf without a tail).
        num_draws: N.
        scheme: how the draws are made (`teacher_cache.targets.draws`).
        generator: random source of the draws.
    """
    has_tail_p = tail_logmass_p > float("-inf")
    # All zeros where there is no tail; a draw needs some mass there, and those draws are not kept.
    conditional_pV = tail_logp_pV.sub_(torch.where(has_tail_p, tail_logmass_p, 0.0)[:, None]).exp_()
    conditional_pV[:, 0] += ~has_tail_p
    draws_pN = draw(conditional_pV, num_draws, scheme, generator)
    return encode_draws(draws_pN, drawn_P=has_tail_p)


class Hybrid(Extractor):
    name = "hybrid"

    def wanted(self, spec: TargetSpec) -> bool:
        return spec.draws_from_tail

    def manifest_sections(self, spec: TargetSpec, seed: int) -> dict[str, dict]:
        return {"sampled": hybrid.section(spec.num_draws, seed, spec.draw_scheme)}

    def extract(self, chunk: Chunk, spec: TargetSpec, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        # An invalid position has a NaN tail mass: with no tail left either, it draws nothing.
        tail_logp_pV = chunk.logp_pV.masked_fill_(chunk.invalid_p1, float("-inf"))
        return tail_draws(tail_logp_pV, chunk.out["tail_logmass"], spec.num_draws, spec.draw_scheme, generator)

    def empty(self, spec: TargetSpec, device: torch.device) -> dict[str, torch.Tensor]:
        return empty_draws(device)


HYBRID = Hybrid()
