"""The teacher side of top-k + tail targets (`storage.targets.topk`): the k most likely ids of each position in
ascending order, their log-probs, and the mass outside them as a log-sum-exp over the other ids themselves (exact
even for tails far below fp32's smallest probability, no 1 - sum cancellation; `teacher_cache.targets.vocab_pass`
sums it)."""

from __future__ import annotations

import torch

from storage.targets import topk
from teacher_cache.targets.base import Block, Extractor, TargetSpec, zeros
from teacher_cache.targets.draws import block_ids, block_values

# Consecutive ids per block of `largest`'s first stage (the fastest of 16-128 on CPU at 32k-50k ids), and per
# sub-block of its second.
BLOCK, SUB_BLOCK = 32, 8


def largest(logits_pV: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest logits of each position in descending order, and their ids (among equal logits, any).

    In stages, as torch.topk over all V ids costs about a nanosecond per id on CPU: the n blocks of BLOCK consecutive
    ids with the largest maxima, then within their n * BLOCK ids the n sub-blocks of SUB_BLOCK ids with the largest
    maxima, then the n largest logits among those n * SUB_BLOCK ids and the last V mod BLOCK ids. An id of the n
    largest outside the chosen blocks (or sub-blocks) would be outdone by their n maxima, so it can only tie with
    them; NaN, the largest for torch.topk, comes first at every stage.
    """
    P, V = logits_pV.shape
    if V // BLOCK <= n:
        return logits_pV.topk(n, dim=-1)
    blocks_pn = logits_pV.unfold(1, BLOCK, BLOCK).amax(-1).topk(n, dim=-1, sorted=False).indices
    values_pC = block_values(logits_pV, blocks_pn, BLOCK).flatten(1)  # [p, n * BLOCK], contiguous
    subs_pn = values_pC.view(P, -1, SUB_BLOCK).amax(-1).topk(n, dim=-1, sorted=False).indices
    values_pS = block_values(values_pC, subs_pn, SUB_BLOCK).flatten(1)
    per_block = BLOCK // SUB_BLOCK  # the sub-blocks' indices among all V / SUB_BLOCK, then their ids
    ids_pS = block_ids(blocks_pn.gather(1, subs_pn // per_block) * per_block + subs_pn % per_block, SUB_BLOCK)
    if V % BLOCK:
        ids_pS = torch.cat([ids_pS, torch.arange(V - V % BLOCK, V, device=logits_pV.device).expand(P, -1)], dim=1)
        values_pS = torch.cat([values_pS, logits_pV[:, V - V % BLOCK:]], dim=1)
    values_pn, at_pn = values_pS.topk(n, dim=-1)
    return values_pn, ids_pS.gather(1, at_pn)


class TopK(Extractor):
    name = "topk"

    def wanted(self, spec: TargetSpec) -> bool:
        return spec.top_k is not None

    def manifest_sections(self, spec: TargetSpec, seed: int) -> dict[str, dict]:
        return {"topk": topk.section(spec.top_k)}

    def extract(self, block: Block, spec: TargetSpec, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        # Ascending ids: sets of frequent ids repeat across positions and compress far better than in rank order.
        ids_pK, order_pK = block.top_ids_pK1[:, :spec.top_k].sort(dim=-1)
        top_logprobs_pK = block.top_logits_pK1[:, :spec.top_k] - block.lse_p1
        # -inf without a tail: a max of -inf and a sum of 0.
        tail_logmass_p1 = block.tail_max_p1 + block.tail_sum_p1.log() - block.lse_p1
        return {"topk_ids": ids_pK, "topk_logprobs": top_logprobs_pK.gather(1, order_pK),
                "tail_logmass": tail_logmass_p1[:, 0]}

    def empty(self, spec: TargetSpec, device: torch.device) -> dict[str, torch.Tensor]:
        return {"topk_ids": zeros(device, 0, spec.top_k, dtype=torch.long),
                "topk_logprobs": zeros(device, 0, spec.top_k), "tail_logmass": zeros(device, 0)}


TOPK = TopK()
