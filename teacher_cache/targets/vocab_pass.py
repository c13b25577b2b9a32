"""The pass over the vocabulary: every reduction and map over all V ids that the target kinds need from a block of
logits, in one function that `torch.compile` fuses into one loop nest per position (on CPU, where each eager op
would stream the block through memory again).

Given a position's logits l, their max m and, with top-k targets, the largest logit outside the top-k, a:
  - z = sum exp(l - m) and lse = m + log z, the log-normaliser: log p(v) = l(v) - lse;
  - the entropy log z - sum exp(l - m) (l - m) / z, a sum of two non-negative terms (no cancellation); it equals
    -sum p log p, with 0 log 0 = 0 for logits of -inf;
  - the tail sum S = sum over the ids outside the top-k of exp(l - a) = sum_{l <= a} exp(l - a) - c, with c the
    number of top-k ids whose logit equals a (ties at the boundary: the top-k may hold some ids of logit a and
    leave others in the tail). S >= 1 where there is a tail, so log(tail mass) = a + log S - lse is exact however
    small the tail (no 1 - sum cancellation, no underflow below fp32's smallest probability);
  - and, into a buffer of the caller's, the weights the draws are made from (`teacher_cache.targets.draws`
    normalises them): `FULL`, exp(l - m), the distribution up to its normaliser (1 on every id of a position without
    a distribution, a stand-in: the draw fails on NaN); `TAIL`, exp(l - a) over the ids with l <= a, the
    tail-conditional distribution up to its normaliser, on which the caller zeroes the top-k ids tied at a (0 on
    every id of a position without a tail).
A NaN or +inf logit, or every logit -inf, gives a NaN m or l - m, hence a NaN entropy: the mark of a position
without a distribution (`teacher_cache.targets`).

`torch.compile` runs once per process and variant (which weights, tail or not), with dynamic shapes, so blocks of
other lengths and teachers of other vocabularies reuse it. Where it is unavailable or fails (no C++ compiler, say),
and off CPU, the pass runs eagerly: the same values op by op, in place (`eager_pass`).

Legend: p positions in a block, V vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# Which weights the pass returns for the draws (see the module docstring).
FULL, TAIL = "full", "tail"

VocabPass = Callable[..., dict[str, torch.Tensor]]


def run(logits_pV: torch.Tensor, max_p1: torch.Tensor, tail_max_p1: torch.Tensor | None, ties_p1: torch.Tensor | None,
        weights_pV: torch.Tensor | None, weights: str | None, *, compiled: bool) -> dict[str, torch.Tensor]:
    """The pass over a block's logits (see the module docstring).

    Args:
        logits_pV: fp32 logits; not modified.
        max_p1: each position's largest logit (NaN where a logit is NaN).
        tail_max_p1: the largest logit outside each position's top-k, -inf without a tail; None without top-k.
        ties_p1: how many of each position's top-k logits equal `tail_max_p1` (float); None without top-k.
        weights_pV: where the weights go, a buffer the caller reuses from block to block (a fresh [p, V] buffer is
            a page fault per 4 KiB on CPU, costlier than the pass itself); None without weights.
        weights: FULL, TAIL (needs `tail_max_p1`) or None.
        compiled: run it through `torch.compile` where it works (CPU; elsewhere it runs eagerly).

    Returns:
        `lse` [p, 1], `entropy` [p, 1]; with `tail_max_p1`, `tail_sum` [p, 1] (S, 0 without a tail).
    """
    args = (logits_pV, max_p1, tail_max_p1, ties_p1, weights_pV, weights)
    # A single position would compile a variant of its own (sizes 0 and 1 are specialised) and costs nothing eagerly.
    if compiled and logits_pV.device.type == "cpu" and logits_pV.shape[0] > 1 and (fused := compiled_pass()):
        try:
            return fused(*args)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            log.warning("torch.compile failed, so the pass over the vocabulary runs eagerly from here on (the same "
                        "targets, slower on CPU): %s", str(exc).splitlines()[0])
            _COMPILED["pass"] = None
    return eager_pass(*args)


def fused_pass(logits_pV: torch.Tensor, max_p1: torch.Tensor, tail_max_p1: torch.Tensor | None,
               ties_p1: torch.Tensor | None, weights_pV: torch.Tensor | None,
               weights: str | None) -> dict[str, torch.Tensor]:
    """`run` for `torch.compile`: every value an expression of the logits, so that inductor computes them all in one
    loop per position (a buffer written in place and read back costs a loop of its own)."""
    shifted_pV = logits_pV - max_p1  # <= 0, -inf where the logit is
    exp_pV = shifted_pV.exp()
    z_p1 = exp_pV.sum(-1, keepdim=True)
    log_z_p1 = z_p1.log()
    # exp * shifted is 0 * -inf = NaN at a logit of -inf: the clamp makes it 0 (p log p -> 0), and passes NaN on.
    spread_p1 = (exp_pV * shifted_pV.clamp_min(torch.finfo(shifted_pV.dtype).min)).sum(-1, keepdim=True)
    out = {"lse": max_p1 + log_z_p1, "entropy": log_z_p1 - spread_p1 / z_p1}
    if weights == FULL:
        # A max that is not finite (a NaN or +inf logit, or only -inf) is what leaves a position without a
        # distribution, so the stand-in needs no second pass over the entropy.
        weights_pV.copy_(exp_pV.masked_fill(~max_p1.isfinite(), 1.0))
    if tail_max_p1 is not None:
        has_tail_p1 = tail_max_p1 > float("-inf")  # False where NaN too
        anchor_p1 = torch.where(has_tail_p1, tail_max_p1, 0.0)
        # Kept: logit <= anchor, which is False for NaN and +inf logits (positions refused anyway).
        kept_pV = (logits_pV <= anchor_p1) & has_tail_p1
        tail_sum_p1 = torch.where(kept_pV, (logits_pV - anchor_p1).exp(), 0.0).sum(-1, keepdim=True)
        out["tail_sum"] = torch.where(has_tail_p1, tail_sum_p1 - ties_p1, 0.0)
        if weights == TAIL:
            weights_pV.copy_(torch.where(kept_pV, logits_pV - anchor_p1, float("-inf")).exp())
    return out


def eager_pass(logits_pV: torch.Tensor, max_p1: torch.Tensor, tail_max_p1: torch.Tensor | None,
               ties_p1: torch.Tensor | None, weights_pV: torch.Tensor | None,
               weights: str | None) -> dict[str, torch.Tensor]:
    """`fused_pass` op by op, in place: on CPU each fresh [p, V] buffer would cost its page faults, more than the op
    that fills it. The exponentials go into the weights' buffer, later overwritten by the tail's weights if those are
    the ones wanted; the tail's into the spent `shifted_pV` otherwise."""
    shifted_pV = logits_pV - max_p1
    exp_pV = torch.exp(shifted_pV, out=weights_pV)
    z_p1 = exp_pV.sum(-1, keepdim=True)
    log_z_p1 = z_p1.log()
    spread_p1 = shifted_pV.clamp_min_(torch.finfo(shifted_pV.dtype).min).mul_(exp_pV).sum(-1, keepdim=True)
    out = {"lse": max_p1 + log_z_p1, "entropy": log_z_p1 - spread_p1 / z_p1}
    if weights == FULL:
        exp_pV.masked_fill_(~max_p1.isfinite(), 1.0)
    if tail_max_p1 is not None:
        has_tail_p1 = tail_max_p1 > float("-inf")
        anchor_p1 = torch.where(has_tail_p1, tail_max_p1, 0.0)
        dropped_pV = (logits_pV <= anchor_p1).logical_and_(has_tail_p1).logical_not_()
        tail_pV = torch.sub(logits_pV, anchor_p1, out=weights_pV if weights == TAIL else shifted_pV).exp_()
        out["tail_sum"] = torch.where(has_tail_p1, tail_pV.masked_fill_(dropped_pV, 0.0).sum(-1, keepdim=True)
                                      - ties_p1, 0.0)
    return out


# This process's compiled pass, made on first use; None where torch.compile is unsupported or has failed.
_COMPILED: dict[str, VocabPass | None] = {}


def compiled_pass() -> VocabPass | None:
    """`fused_pass` through `torch.compile` (dynamic shapes), or None where it cannot be compiled here."""
    if "pass" not in _COMPILED:
        supported = torch._dynamo.is_dynamo_supported() and torch._dynamo.is_inductor_supported()
        _COMPILED["pass"] = torch.compile(fused_pass, dynamic=True) if supported else None
    return _COMPILED["pass"]
