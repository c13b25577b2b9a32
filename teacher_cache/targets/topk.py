"""The teacher side of top-k + tail targets (`storage.targets.topk`): the k most likely ids of each position in
ascending order, their log-probs, and the mass outside them as a log-sum-exp over the other ids themselves (exact
even for tails far below fp32's smallest probability, no 1 - sum cancellation)."""

from __future__ import annotations

import torch

from storage.targets import topk
from teacher_cache.targets.base import Chunk, Extractor, TargetSpec, zeros


class TopK(Extractor):
    name = "topk"

    def wanted(self, spec: TargetSpec) -> bool:
        return spec.top_k is not None

    def manifest_sections(self, spec: TargetSpec, seed: int) -> dict[str, dict]:
        return {"topk": topk.section(spec.top_k)}

    def extract(self, chunk: Chunk, spec: TargetSpec, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        top_logp_pK, top_ids_pK = chunk.logp_pV.topk(spec.top_k, dim=-1, sorted=False)
        # Ascending ids: sets of frequent ids repeat across positions and compress far better than in rank order.
        ids_pK, order_pK = top_ids_pK.sort(dim=-1)
        chunk.probs_pV = None
        # From here on `logp_pV` holds the tail's log-probs, -inf on the top-k (what `hybrid` draws from).
        tail_logmass_p = chunk.logp_pV.scatter_(1, top_ids_pK, float("-inf")).logsumexp(-1)
        return {"topk_ids": ids_pK, "topk_logprobs": top_logp_pK.gather(1, order_pK), "tail_logmass": tail_logmass_p}

    def empty(self, spec: TargetSpec, device: torch.device) -> dict[str, torch.Tensor]:
        return {"topk_ids": zeros(device, 0, spec.top_k, dtype=torch.long),
                "topk_logprobs": zeros(device, 0, spec.top_k), "tail_logmass": zeros(device, 0)}


TOPK = TopK()
