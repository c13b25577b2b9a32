"""Target extraction: from the teacher's final hidden states to the records the store keeps.

Runs on the teacher's device, batched over positions, in chunks of positions so that at most
[chunk, vocab] logits exist at once (never [batch, time, vocab]). Per chunk, in fp32:
  - log_softmax of the logits;
  - exact entropy and the true next token's log-prob;
  - top-k ids (ascending) and their log-probs, and the tail mass as logsumexp over the ids outside the top-k (exact, no
    1 - sum cancellation);
  - N draws with replacement from the full distribution, encoded as distinct ids (ascending) + counts;
  - or, for hybrid targets, N draws from the distribution conditioned on the tail (the ids outside the top-k),
    encoded the same way; positions without a tail get no entries.
A logit of -inf is a probability of 0. A NaN or +inf logit, or every logit -inf, leaves a position without a
distribution: its log-probs are all NaN, and so is its entropy. The entropy, a reduction over the vocabulary
computed anyway, thus flags those positions, and the backends refuse a batch with one (`NonFiniteLogits`).

Legend: P positions (flattened batch x time), V vocabulary, H hidden size, K top-k, N draws, E entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TargetSpec:
    """Which targets to extract.

    Attributes:
        top_k: k of the top-k record, or None to skip it.
        num_draws: N of the sampled record, or None to skip it.
        chunk_positions: positions whose logits are materialised at once.
        draws_from_tail: draw from the distribution conditioned on the ids outside the top-k (hybrid targets)
            instead of from the full distribution; needs `top_k` and `num_draws`.
    """

    top_k: int | None
    num_draws: int | None
    chunk_positions: int = 1024
    draws_from_tail: bool = False

    def __post_init__(self) -> None:
        assert not self.draws_from_tail or (self.top_k is not None and self.num_draws is not None), self


class NonFiniteLogits(RuntimeError):
    """The teacher gave no distribution at a trained position (NaN or +inf logits, or every logit -inf).

    A backend raises it with the position's place in its batch; the build raises `in_store` of it.

    Attributes:
        row: the sample within the batch.
        position: the position within the sample.
        found: what the teacher gave there, e.g. "NaN logits".
    """

    def __init__(self, row: int, position: int, found: str, *, first_sample: int | None = None):
        self.row, self.position, self.found = row, position, found
        where = f"row {row} of the batch" if first_sample is None else f"sample {first_sample + row} of the store"
        stopped = "" if first_sample is None else (
            " Nothing of this batch was written; the shards committed before it stay, and --resume continues after "
            "them with the same teacher (another --dtype or other weights make another teacher: build into a new "
            "--output)."
        )
        super().__init__(
            f"The teacher gave {found} at {where}, position {position}: there is no distribution to store there. "
            "The teacher's weights or its dtype are at fault: float16 overflows easily, so try --dtype bfloat16 or "
            f"float32, and check the weights for NaN or inf.{stopped}"
        )

    def in_store(self, first_sample: int) -> NonFiniteLogits:
        """The same error from a build, whose batch starts at sample `first_sample` of the store."""
        return NonFiniteLogits(self.row, self.position, self.found, first_sample=first_sample)


def first_nonfinite(values_P: torch.Tensor) -> int | None:
    """The index of the first NaN or infinite value, None when all are finite (one host sync)."""
    bad_P = ~values_P.isfinite()
    if not bad_P.any():
        return None
    return int(bad_P.nonzero()[0])


def describe_nonfinite(values: torch.Tensor, what: str) -> str:
    """What is not finite in `values`, for a message: "NaN `what`", "+inf `what`", "only -inf `what`", "-inf `what`"."""
    if values.isnan().any():
        return f"NaN {what}"
    if values.isposinf().any():
        return f"+inf {what}"
    return f"{'only ' if values.isneginf().all() else ''}-inf {what}"


def extract_targets(
    hidden_PH: torch.Tensor,
    true_ids_P: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    spec: TargetSpec,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Targets for every position given.

    Args:
        hidden_PH: final hidden states of the positions to extract (already filtered to trained ones).
        true_ids_P: the true next token of each position.
        logits_fn: maps hidden states [p, H] to logits [p, V] (the teacher's output head).
        spec: which targets.
        generator: random source for the draws (on the same device as `hidden_PH`).

    Returns:
        `entropy` [P], `true_logprob` [P]; with top-k, `topk_ids` [P, K], `topk_logprobs` [P, K],
        `tail_logmass` [P]; with draws, `sampled_nunique` [P], `sampled_ids` [E], `sampled_counts` [E].
    """
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, hidden_PH.shape[0], spec.chunk_positions):
        stop = start + spec.chunk_positions
        logits_pV = logits_fn(hidden_PH[start:stop]).float()
        chunk = _chunk_targets(logits_pV, true_ids_P[start:stop], spec, generator)
        for name, value in chunk.items():
            parts.setdefault(name, []).append(value)
    if not parts:
        return _empty_targets(hidden_PH.device, spec)
    return {name: torch.cat(values) for name, values in parts.items()}


def _chunk_targets(
    logits_pV: torch.Tensor, true_ids_p: torch.Tensor, spec: TargetSpec, generator: torch.Generator | None
) -> dict[str, torch.Tensor]:
    logp_pV = torch.log_softmax(logits_pV, dim=-1)
    del logits_pV
    probs_pV = logp_pV.exp()
    out = {
        # p log p is 0 at p = 0 (logit -inf); the clamp keeps that 0 * -inf from becoming NaN, and passes NaN on.
        "entropy": -(probs_pV * logp_pV.clamp_min(torch.finfo(logp_pV.dtype).min)).sum(-1),
        "true_logprob": logp_pV.gather(1, true_ids_p[:, None].long()).squeeze(1),
    }
    # Positions without a valid distribution (NaN entropy, see the module docstring) are refused by the backend after
    # extraction; until then the draws get a valid stand-in there, without a host sync: multinomial fails on NaN.
    invalid_p1 = ~out["entropy"].isfinite()[:, None]
    if spec.num_draws is not None and not spec.draws_from_tail:
        draws_pN = torch.multinomial(probs_pV.masked_fill_(invalid_p1, 1.0), spec.num_draws, replacement=True,
                                     generator=generator)
        out.update(encode_draws(draws_pN))
    if spec.top_k is not None:
        top_logp_pK, top_ids_pK = logp_pV.topk(spec.top_k, dim=-1, sorted=False)
        # Ascending ids: sets of frequent ids repeat across positions and compress far better than in rank order.
        out["topk_ids"], order_pK = top_ids_pK.sort(dim=-1)
        out["topk_logprobs"] = top_logp_pK.gather(1, order_pK)
        # Mass outside the top-k, summed in log space from the ids themselves rather than as 1 - sum(top-k):
        # exact even for tails far below fp32's smallest probability.
        del probs_pV
        out["tail_logmass"] = logp_pV.scatter_(1, top_ids_pK, float("-inf")).logsumexp(-1)
        if spec.draws_from_tail:  # logp_pV now holds the tail's log-probs, -inf on the top-k
            # An invalid position has a NaN tail mass: with no tail left either, it draws nothing.
            out |= tail_draws(logp_pV.masked_fill_(invalid_p1, float("-inf")), out["tail_logmass"], spec.num_draws,
                              generator)
    return out


def tail_draws(tail_logp_pV: torch.Tensor, tail_logmass_p: torch.Tensor, num_draws: int,
               generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """N draws per position from p(v) / m over the ids v outside the top-k (m the tail mass), encoded.

    Draws from exp(log p(v) - log m), the tail-conditional distribution itself: a tail far below fp32's smallest
    probability is drawn from as exactly as any other. A position without a tail (k >= V, or every id outside the
    top-k at probability 0) gets no entries. Overwrites `tail_logp_pV`.

    Args:
        tail_logp_pV: the teacher's log-probs with -inf on each position's top-k ids.
        tail_logmass_p: log of the tail mass, the logsumexp of `tail_logp_pV` (-inf without a tail).
        num_draws: N.
        generator: random source of the draws.
    """
    has_tail_p = tail_logmass_p > float("-inf")
    # All zeros where there is no tail; multinomial needs some mass there, and those draws are not kept.
    conditional_pV = tail_logp_pV.sub_(torch.where(has_tail_p, tail_logmass_p, 0.0)[:, None]).exp_()
    conditional_pV[:, 0] += ~has_tail_p
    draws_pN = torch.multinomial(conditional_pV, num_draws, replacement=True, generator=generator)
    return encode_draws(draws_pN, drawn_P=has_tail_p)


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


def _empty_targets(device: torch.device, spec: TargetSpec) -> dict[str, torch.Tensor]:
    def z(*shape, dtype=torch.float32):
        return torch.zeros(shape, dtype=dtype, device=device)

    out = {"entropy": z(0), "true_logprob": z(0)}
    if spec.top_k is not None:
        out |= {"topk_ids": z(0, spec.top_k, dtype=torch.long), "topk_logprobs": z(0, spec.top_k), "tail_logmass": z(0)}
    if spec.num_draws is not None:
        out |= {"sampled_nunique": z(0, dtype=torch.long), "sampled_ids": z(0, dtype=torch.long),
                "sampled_counts": z(0, dtype=torch.long)}
    return out
