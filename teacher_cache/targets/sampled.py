"""The teacher side of sampled targets (`storage.targets.sampled`): N draws with replacement from each position's
full distribution, by the spec's scheme (`teacher_cache.targets.draws`), encoded as distinct ids (ascending) +
counts. The draws come from the FULL weights' block sums of the pass over the vocabulary
(`teacher_cache.targets.vocab_pass`), and those weights recomputed at the drawn blocks' ids."""

from __future__ import annotations

import torch

from storage.targets import sampled
from teacher_cache.targets.base import Block, Extractor, TargetSpec, zeros
from teacher_cache.targets.draws import draw_from_blocks
from teacher_cache.targets.vocab_pass import FULL, full_weights


def encode_draws(draws_PN: torch.Tensor, drawn_P: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Distinct ids (ascending within a position) and their counts, flattened position-major.

    Each row of the sorted draws starts a run, so the flat start indices are increasing and a run's count is
    the distance to the next start (or to the end).

    Args:
        draws_PN: N drawn ids per position.
        drawn_P: bool, the positions whose draws are kept; the others get no entries (nunique 0). None keeps all.
    """
    if drawn_P is not None:
        kept = encode_draws(draws_PN[drawn_P])
        nunique_P = kept["sampled_nunique"].new_zeros(draws_PN.shape[0])
        return kept | {"sampled_nunique": nunique_P.masked_scatter_(drawn_P, kept["sampled_nunique"])}
    sorted_PN, _ = draws_PN.sort(dim=1)
    starts_PN = torch.ones_like(sorted_PN, dtype=torch.bool)
    starts_PN[:, 1:] = sorted_PN[:, 1:] != sorted_PN[:, :-1]
    flat_starts_E = starts_PN.flatten().nonzero().squeeze(1)
    ends_E = torch.cat([flat_starts_E[1:], flat_starts_E.new_tensor([sorted_PN.numel()])])
    return {
        "sampled_nunique": starts_PN.sum(1),
        "sampled_ids": sorted_PN.flatten()[flat_starts_E],
        "sampled_counts": ends_E - flat_starts_E,
    }


def empty_draws(device: torch.device) -> dict[str, torch.Tensor]:
    """The encoded draws of no positions."""
    return {name: zeros(device, 0, dtype=torch.long) for name in ("sampled_nunique", "sampled_ids", "sampled_counts")}


class Sampled(Extractor):
    name = "sampled"
    weights = FULL

    def wanted(self, spec: TargetSpec) -> bool:
        return spec.num_draws is not None and not spec.draws_from_tail

    def manifest_sections(self, spec: TargetSpec, seed: int) -> dict[str, dict]:
        return {"sampled": sampled.section(spec.num_draws, seed, spec.draw_scheme)}

    def extract(self, block: Block, spec: TargetSpec, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        draws_pN = draw_from_blocks(block.logits_pV, block.block_sums_pQ, lambda logits_pX, _: full_weights(
            logits_pX, block.max_p1), spec.num_draws, spec.draw_scheme, generator)
        return encode_draws(draws_pN)

    def empty(self, spec: TargetSpec, device: torch.device) -> dict[str, torch.Tensor]:
        return empty_draws(device)


SAMPLED = Sampled()
