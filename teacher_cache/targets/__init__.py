"""Target extraction: from the teacher's final hidden states to the records the store keeps.

Runs on the teacher's device, batched over positions, in chunks of positions so that at most
[chunk, vocab] logits exist at once (never [batch, time, vocab]); the output head runs over a chunk at once, and the
extraction over blocks of it (the whole chunk by default; on CPU, a block small enough to stay in cache across the
passes below). Per block, in fp32:
  - the k + 1 largest logits (with top-k targets), whose first is the max and whose last bounds the tail;
  - one pass over the vocabulary (`vocab_pass`, fused by `torch.compile` where asked): the log-normaliser, the exact
    entropy, the tail's sum, and the draws' weights summed over blocks of 32 ids; no log-softmax, probabilities or
    weights over the vocabulary are materialised;
  - the true next token's log-prob, its logit less the log-normaliser;
  - top-k ids (ascending) and their log-probs, and the tail mass as a log-sum-exp over the ids outside the top-k
    (exact, no 1 - sum cancellation);
  - N draws with replacement from the full distribution, independent or systematic (`draws`): a block of ids from
    the block sums, then an id from the weights of that block's ids alone; encoded as distinct ids (ascending) +
    counts;
  - or, for hybrid targets, N draws from the distribution conditioned on the tail (the ids outside the top-k),
    encoded the same way; positions without a tail get no entries.
A logit of -inf is a probability of 0. A NaN or +inf logit, or every logit -inf, leaves a position without a
distribution: its entropy is NaN. The entropy, a reduction over the vocabulary computed anyway, thus flags those
positions, and the backends refuse a batch with one (`NonFiniteLogits`).

Each kind's extraction is one module of this package (`topk`, `sampled`, `hybrid`; `hidden` holds the capture of
hidden states, which come from the model's forward rather than its logits), registered in EXTRACTORS under the
name of its `storage.targets` kind; `draws` holds the draw schemes `sampled` and `hybrid` share.

Legend: P positions (flattened batch x time), c positions in a chunk, p in a block, V vocabulary, H hidden size,
K top-k, N draws, E entries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from teacher_cache.targets import vocab_pass
from teacher_cache.targets.base import Block, Extractor, TargetSpec
from teacher_cache.targets.hybrid import HYBRID
from teacher_cache.targets.sampled import SAMPLED
from teacher_cache.targets.topk import TOPK, largest

__all__ = ["EXTRACTORS", "NonFiniteLogits", "TargetSpec", "describe_nonfinite", "extract_targets", "first_nonfinite",
           "wanted_extractors"]

# The kinds extracted from the logits, in the order they run over a block (see `teacher_cache.targets.base`).
EXTRACTORS: dict[str, Extractor] = {kind.name: kind for kind in (SAMPLED, TOPK, HYBRID)}


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
    block = min(spec.block_positions or spec.chunk_positions, spec.chunk_positions)
    scratch_bV = None  # the eager pass's scratch, reused from block to block (see `vocab_pass.run`)
    for start in range(0, hidden_PH.shape[0], spec.chunk_positions):
        chunk = slice(start, start + spec.chunk_positions)
        logits_cV, true_ids_c = logits_fn(hidden_PH[chunk]).float(), true_ids_P[chunk]
        if scratch_bV is None:
            # Never written where the pass is compiled, so on CPU it costs no memory there.
            scratch_bV = logits_cV.new_empty(min(block, hidden_PH.shape[0]), logits_cV.shape[1])
        for first in range(0, logits_cV.shape[0], block):
            logits_pV = logits_cV[first:first + block]
            records = _block_targets(logits_pV, true_ids_c[first:first + block], scratch_bV[:logits_pV.shape[0]],
                                     spec, generator)
            for name, value in records.items():
                parts.setdefault(name, []).append(value)
    if not parts:
        return _empty_targets(hidden_PH.device, spec)
    return {name: torch.cat(values) for name, values in parts.items()}


def wanted_extractors(spec: TargetSpec) -> list[Extractor]:
    """The kinds `spec` asks for, in the order they run."""
    return [kind for kind in EXTRACTORS.values() if kind.wanted(spec)]


def _weights(spec: TargetSpec) -> str | None:
    """The weights the wanted kinds draw from (`vocab_pass.FULL` or `TAIL`), None without draws."""
    return next((kind.weights for kind in wanted_extractors(spec) if kind.weights), None)


def _block_targets(logits_pV: torch.Tensor, true_ids_p: torch.Tensor, scratch_pV: torch.Tensor, spec: TargetSpec,
                   generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    top_logits_pK1 = top_ids_pK1 = None
    if spec.top_k is not None:
        # One more than k: the largest logit outside the top-k comes with them (none where k = V).
        top_logits_pK1, top_ids_pK1 = largest(logits_pV, min(spec.top_k + 1, logits_pV.shape[1]))
        max_p1 = top_logits_pK1[:, :1]  # NaN first, where there is one
    else:
        max_p1 = logits_pV.amax(-1, keepdim=True)
    passed = vocab_pass.run(logits_pV, max_p1, top_logits_pK1, top_ids_pK1, spec.top_k, _weights(spec),
                            compiled=spec.compiled, scratch_pV=scratch_pV)
    lse_p1 = passed["lse"]
    out = {"entropy": passed["entropy"][:, 0],
           "true_logprob": (logits_pV.gather(1, true_ids_p[:, None].long()) - lse_p1)[:, 0]}
    # Positions without a valid distribution (NaN entropy, see the module docstring) are refused by the backend after
    # extraction; until then the kinds give them valid stand-ins.
    block = Block(logits_pV, max_p1, lse_p1, top_logits_pK1, top_ids_pK1, passed.get("tail_max"),
                  passed.get("tail_sum"), passed.get("block_sums"), passed.get("block_at_tail_max"), out)
    for kind in wanted_extractors(spec):
        out |= kind.extract(block, spec, generator)
    return out


def _empty_targets(device: torch.device, spec: TargetSpec) -> dict[str, torch.Tensor]:
    out = {"entropy": torch.zeros(0, device=device), "true_logprob": torch.zeros(0, device=device)}
    for kind in wanted_extractors(spec):
        out |= kind.empty(spec, device)
    return out
