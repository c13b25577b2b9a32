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
  - and the weights the draws are made from, summed over each block of `draws.DRAW_BLOCK` consecutive ids
    (`block_sums` [p, Q]): the draws (`teacher_cache.targets.draws.draw_from_blocks`) find a block in their
    cumulative sum, then recompute the weights of that block's ids alone with the same expression (`full_weights`,
    `below_anchor`), so no [p, V] weights are kept. `FULL`: exp(l - m), the distribution up to its normaliser (1 on
    every id of a position without a distribution, a stand-in: a draw fails on NaN). `TAIL`: the tail-conditional
    distribution up to its normaliser, exp(l - a) over the ids outside the top-k, in two parts so that a block of no
    such id weighs exactly 0: `block_sums`, the sum of exp(l - a) over l < a, and `block_at_tail_max`, the count of
    ids with l = a (an exact integer in fp32), of which the caller takes away the top-k ids tied at a (0 on every
    block of a position without a tail).
A NaN or +inf logit, or every logit -inf, gives a NaN m or l - m, hence a NaN entropy: the mark of a position
without a distribution (`teacher_cache.targets`).

`torch.compile` runs once per process, variant (which weights, tail or not, whether DRAW_BLOCK divides V) and
vocabulary, dynamic in the number of positions, so that every block of a build runs the same kernel and a position
gets the same bits in any block, process or worker of one machine (see `run`). Where it is unavailable or fails (no
C++ compiler, say), and off CPU, the pass runs eagerly: the same values op by op, in place, in one scratch buffer of
the caller's (`eager_pass`).

Legend: p positions in a block, V vocabulary, Q = ceil(V / DRAW_BLOCK) blocks of it, X ids given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from teacher_cache.targets.draws import DRAW_BLOCK, block_sums

log = logging.getLogger(__name__)

# Kernels of the pass one process may compile (dynamo's default is 8).
RECOMPILE_LIMIT = 64

# Which weights the pass returns for the draws (see the module docstring).
FULL, TAIL = "full", "tail"

VocabPass = Callable[..., dict[str, torch.Tensor]]


def run(logits_pV: torch.Tensor, max_p1: torch.Tensor, tail_max_p1: torch.Tensor | None, ties_p1: torch.Tensor | None,
        weights: str | None, *, compiled: bool, scratch_pV: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The pass over a block's logits (see the module docstring).

    Args:
        logits_pV: fp32 logits; not modified.
        max_p1: each position's largest logit (NaN where a logit is NaN).
        tail_max_p1: the largest logit outside each position's top-k, -inf without a tail; None without top-k.
        ties_p1: how many of each position's top-k logits equal `tail_max_p1` (float); None without top-k.
        weights: FULL, TAIL (needs `tail_max_p1`) or None.
        compiled: run it through `torch.compile` where it works (CPU; elsewhere it runs eagerly).
        scratch_pV: an fp32 buffer of `logits_pV`'s shape for the eager pass, which the caller reuses from block to
            block (a fresh [p, V] buffer is a page fault per 4 KiB on CPU, costlier than the pass itself); None
            allocates one. The compiled pass needs none.

    Returns:
        `lse` [p, 1], `entropy` [p, 1]; with `tail_max_p1`, `tail_sum` [p, 1] (S, 0 without a tail); with FULL,
        `block_sums` [p, Q]; with TAIL, `block_sums` [p, Q] and `block_at_tail_max` [p, Q] (see the module
        docstring).
    """
    args = (logits_pV, max_p1, tail_max_p1, ties_p1, weights)
    if compiled and logits_pV.device.type == "cpu" and (fused := compiled_pass()):
        # A position's values depend on the kernel alone, never on the rest of its block, so a build resumed or split
        # across workers equals one made in one go, bit for bit, provided every block runs the same kernel. Dynamo
        # would compile others, which may round otherwise: for sizes 0 and 1 (a single position runs as two copies
        # of itself), for how a view relates to its base, for strides (the top-k's columns are views), for sizes that
        # happen to be equal (duck sizing) and for the grad mode. So the kernel sees plain contiguous tensors (inference
        # tensors where the caller runs in inference mode, as the backends do), the vocabulary as a constant, and no
        # grad. A process that reaches dynamo's limit of kernels per function would run the pass uncompiled, rounding
        # otherwise: the limit here is far above what any process builds (a kernel per variant, vocabulary and kind
        # of tensor).
        plain = [arg.detach().contiguous() if isinstance(arg, torch.Tensor) else arg for arg in args]
        single = logits_pV.shape[0] == 1
        if single:
            plain = [arg.repeat(2, 1) if isinstance(arg, torch.Tensor) else arg for arg in plain]
        torch._dynamo.mark_static(plain[0], 1)
        try:
            with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                passed = fused(*plain)
            return {name: value[:1] for name, value in passed.items()} if single else passed
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            log.warning("torch.compile failed, so the pass over the vocabulary runs eagerly from here on (the same "
                        "targets, slower on CPU): %s", str(exc).splitlines()[0])
            _COMPILED["pass"] = None
    return eager_pass(*args, scratch_pV)


def full_weights(logits_pX: torch.Tensor, max_p1: torch.Tensor) -> torch.Tensor:
    """FULL weights of the given logits: exp(l - m), and 1 on every id of a position whose max is not finite (a
    position without a distribution: a NaN or +inf logit, or only -inf)."""
    return (logits_pX - max_p1).exp().masked_fill(~max_p1.isfinite(), 1.0)


def below_anchor(logits_pX: torch.Tensor, anchor_p1: torch.Tensor) -> torch.Tensor:
    """exp(l - a) on the given logits l below a, 0 elsewhere: the TAIL weights strictly below their anchor."""
    return torch.where(logits_pX < anchor_p1, (logits_pX - anchor_p1).exp(), 0.0)


def fused_pass(logits_pV: torch.Tensor, max_p1: torch.Tensor, tail_max_p1: torch.Tensor | None,
               ties_p1: torch.Tensor | None, weights: str | None) -> dict[str, torch.Tensor]:
    """`run` for `torch.compile`: every value an expression of the logits, so that inductor computes them all in one
    loop per position (a buffer written in place and read back costs a loop of its own). Every sum over the
    vocabulary is a sum of block sums, each an expression of the logits viewed as [p, Q, B] (and of the last V mod B
    logits), so that the reductions share one loop nest, with or without draws (the same sums give the same values:
    hybrid targets hold the very top-k record of top-k targets)."""
    V = logits_pV.shape[1]
    whole = V // DRAW_BLOCK * DRAW_BLOCK
    max_p11, tail_max_p11 = max_p1[..., None], None if tail_max_p1 is None else tail_max_p1[..., None]
    parts = [] if whole == 0 else [
        _block_terms(logits_pV[:, :whole].unflatten(1, (V // DRAW_BLOCK, DRAW_BLOCK)), max_p11, tail_max_p11, weights)]
    if whole < V:
        parts.append(_block_terms(logits_pV[:, None, whole:], max_p11, tail_max_p11, weights))
    sums = {name: torch.cat([part[name] for part in parts], dim=1) for name in parts[0]}
    z_p1 = sums["z"].sum(-1, keepdim=True)
    log_z_p1 = z_p1.log()
    out = {"lse": max_p1 + log_z_p1, "entropy": log_z_p1 - sums["spread"].sum(-1, keepdim=True) / z_p1}
    if weights == FULL:
        out["block_sums"] = sums["full"]
    if tail_max_p1 is not None:
        out["tail_sum"] = torch.where(tail_max_p1 > float("-inf"), sums["below"].sum(-1, keepdim=True)
                                      + sums["at"].sum(-1, keepdim=True) - ties_p1, 0.0)
        if weights == TAIL:
            out["block_sums"], out["block_at_tail_max"] = sums["below"], sums["at"]
    return out


def _block_terms(logits_pQB: torch.Tensor, max_p11: torch.Tensor, tail_max_p11: torch.Tensor | None,
                 weights: str | None) -> dict[str, torch.Tensor]:
    """`fused_pass`'s [p, Q] sums over the last dimension of logits viewed as blocks (see the module docstring):
    `z` and `spread` of the entropy, `full` (FULL weights), `below` and `at` (the tail's, without tie correction)."""
    shifted_pQB = logits_pQB - max_p11  # <= 0, -inf where the logit is
    # exp * shifted is 0 * -inf = NaN at a logit of -inf: the clamp makes it 0 (p log p -> 0), and passes NaN on.
    # Each sum takes an exp of its own: inductor writes an exp that several sums read to a [p, Q, B] buffer, and the
    # generated loop computes it once anyway.
    spread_pQB = shifted_pQB.exp() * shifted_pQB.clamp_min(torch.finfo(shifted_pQB.dtype).min)
    sums = {"spread": spread_pQB.sum(-1)}
    if weights == FULL:
        # The FULL weights are exp(l - m) itself at a position with a distribution, so their sums give z there (one
        # sum fewer); elsewhere the entropy is NaN whatever z is (a NaN l - m at some id enters the spread).
        sums["z"] = sums["full"] = full_weights(logits_pQB, max_p11).sum(-1)
    else:
        sums["z"] = shifted_pQB.exp().sum(-1)
    if tail_max_p11 is not None:
        has_tail_p11 = tail_max_p11 > float("-inf")  # False where NaN too
        anchor_p11 = torch.where(has_tail_p11, tail_max_p11, 0.0)
        # Below or at the anchor, which is False for NaN and +inf logits (positions refused anyway).
        sums["below"] = torch.where(has_tail_p11, below_anchor(logits_pQB, anchor_p11), 0.0).sum(-1)
        sums["at"] = ((logits_pQB == anchor_p11) & has_tail_p11).sum(-1, dtype=torch.float32)
    return sums


def eager_pass(logits_pV: torch.Tensor, max_p1: torch.Tensor, tail_max_p1: torch.Tensor | None,
               ties_p1: torch.Tensor | None, weights: str | None,
               scratch_pV: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """`fused_pass` op by op, in place: on CPU each fresh [p, V] buffer would cost its page faults, more than the op
    that fills it. The exponentials go into the caller's scratch buffer, then the FULL weights over them; the tail's
    into the spent `shifted_pV`."""
    shifted_pV = logits_pV - max_p1
    exp_pV = torch.exp(shifted_pV, out=scratch_pV)
    z_p1 = block_sums(exp_pV).sum(-1, keepdim=True)
    log_z_p1 = z_p1.log()
    spread_pV = shifted_pV.clamp_min_(torch.finfo(shifted_pV.dtype).min).mul_(exp_pV)
    spread_p1 = block_sums(spread_pV).sum(-1, keepdim=True)
    out = {"lse": max_p1 + log_z_p1, "entropy": log_z_p1 - spread_p1 / z_p1}
    if weights == FULL:
        out["block_sums"] = block_sums(exp_pV.masked_fill_(~max_p1.isfinite(), 1.0))
    if tail_max_p1 is not None:
        has_tail_p1 = tail_max_p1 > float("-inf")
        anchor_p1 = torch.where(has_tail_p1, tail_max_p1, 0.0)
        below_pV = torch.sub(logits_pV, anchor_p1, out=shifted_pV).exp_()
        below_pV.masked_fill_((logits_pV < anchor_p1).logical_and_(has_tail_p1).logical_not_(), 0.0)
        below_pQ = block_sums(below_pV)
        at_pQ = block_sums((logits_pV == anchor_p1).logical_and_(has_tail_p1), torch.float32)
        out["tail_sum"] = torch.where(has_tail_p1, below_pQ.sum(-1, keepdim=True) + at_pQ.sum(-1, keepdim=True)
                                      - ties_p1, 0.0)
        if weights == TAIL:
            out["block_sums"], out["block_at_tail_max"] = below_pQ, at_pQ
    return out


# This process's compiled pass, made on first use; None where torch.compile is unsupported or has failed.
_COMPILED: dict[str, VocabPass | None] = {}


def compiled_pass() -> VocabPass | None:
    """`fused_pass` through `torch.compile` (dynamic in the positions), or None where it cannot be compiled here."""
    if "pass" not in _COMPILED:
        supported = torch._dynamo.is_dynamo_supported() and torch._dynamo.is_inductor_supported()
        _COMPILED["pass"] = torch.compile(fused_pass, dynamic=True) if supported else None
    return _COMPILED["pass"]
