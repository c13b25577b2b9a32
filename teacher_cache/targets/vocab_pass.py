"""The pass over the vocabulary: every reduction and map over all V ids that the target kinds need from a block of
logits, in one function that `torch.compile` fuses into one loop nest per position (on CPU, where each eager op
would stream the block through memory again), with a single exponential per id.

The pass sums over the tail alone: the ids below an anchor a, the largest logit outside the top-k (with top-k
targets), or the largest logit m (without: then the whole vocabulary is the tail). The head, the top-k ids, is
summed from the k logits that come with them. Given a position's logits l:
  - over each block of `draws.DRAW_BLOCK` consecutive ids, `below` = sum over l < a of exp(l - a) (each <= 1, no
    overflow however far the head stands above the tail, no underflow of the tail's largest terms) and `at`, the
    count of ids with l = a (an exact integer in fp32); over the vocabulary, `spread` = sum over l < a of
    exp(l - a) (l - a) (<= 0). Ties at the boundary: the top-k may hold some ids of logit a and leave others in the
    tail, so c, the number of top-k ids whose logit equals a, is taken away from the count.
  - the tail sum S = sum over the ids outside the top-k of exp(l - a) = sum(below) + sum(at) - c. S >= 1 where
    there is a tail, so log(tail mass) = a + log S - lse is exact however small the tail (no 1 - sum cancellation,
    no underflow below fp32's smallest probability);
  - z = sum exp(l - m) = sum over the head of exp(h - m) + exp(a - m) S, and lse = m + log z, the log-normaliser:
    log p(v) = l(v) - lse;
  - the entropy log z - s / z, with s = sum exp(l - m) (l - m) = sum over the head of exp(h - m) (h - m)
    + exp(a - m) (spread + (a - m) S) <= 0, a sum of terms of one sign, so the entropy is a sum of two
    non-negative terms (no cancellation); it equals -sum p log p, with 0 log 0 = 0 for logits of -inf. A tail
    more than ~87 nats below the top weighs exp(a - m) = 0 in z and the entropy, where fp32 could not resolve it
    anyway (z >= 1);
  - and the weights the draws are made from, summed per block (`block_sums` [p, Q]): the draws
    (`teacher_cache.targets.draws.draw_from_blocks`) find a block in their cumulative sum, then recompute the
    weights of that block's ids alone (`full_weights`, `below_anchor`), so no [p, V] weights are kept. `FULL`:
    exp(l - m), the distribution up to its normaliser: exp(a - m) (below + at) plus the head's ids above a in their
    blocks (1 on every id of a position without a distribution, a stand-in: a draw fails on NaN). `TAIL`: the
    tail-conditional distribution up to its normaliser, exp(l - a) over the ids outside the top-k, in two parts so
    that a block of no such id weighs exactly 0: `block_sums` = below, and `block_at_tail_max` = at, of which the
    caller takes away the top-k ids tied at a (0 on every block of a position without a tail).
A NaN or +inf logit, or every logit -inf, gives a NaN entropy: the mark of a position without a distribution
(`teacher_cache.targets`).

`torch.compile` runs once per process and vocabulary, dynamic in the number of positions, so that every block of a
build runs the same kernel and a position gets the same bits in any block, process or worker of one machine (see
`run`). Where it is unavailable or fails (no C++ compiler, say), and off CPU, the pass runs eagerly: the same values
op by op, in place, in one scratch buffer of the caller's (`eager_pass`).

Legend: p positions in a block, V vocabulary, Q = ceil(V / DRAW_BLOCK) blocks of it, K top-k, K1 = K + 1 (K where
K = V), X ids given.
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

VocabPass = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def run(logits_pV: torch.Tensor, max_p1: torch.Tensor, top_logits_pK1: torch.Tensor | None,
        top_ids_pK1: torch.Tensor | None, top_k: int | None, weights: str | None, *, compiled: bool,
        scratch_pV: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The pass over a block's logits (see the module docstring).

    Args:
        logits_pV: fp32 logits; not modified.
        max_p1: each position's largest logit (NaN where a logit is NaN).
        top_logits_pK1: with top-k, the K + 1 largest logits in descending order (`topk.largest`; K where K = V);
            None without top-k.
        top_ids_pK1: their ids; None without top-k.
        top_k: K, or None.
        weights: FULL, TAIL (needs top-k) or None.
        compiled: run it through `torch.compile` where it works (CPU; elsewhere it runs eagerly).
        scratch_pV: an fp32 buffer of `logits_pV`'s shape for the eager pass, which the caller reuses from block to
            block (a fresh [p, V] buffer is a page fault per 4 KiB on CPU, costlier than the pass itself); None
            allocates one. The compiled pass needs none.

    Returns:
        `lse` [p, 1], `entropy` [p, 1]; with top-k, `tail_max` [p, 1] (the largest logit outside the top-k, -inf
        without a tail) and `tail_sum` [p, 1] (S, 0 without a tail); with FULL, `block_sums` [p, Q]; with TAIL,
        `block_sums` [p, Q] and `block_at_tail_max` [p, Q] (see the module docstring).
    """
    if top_k is None:  # the whole vocabulary is the tail, anchored at the max
        head_pK = logits_pV.new_empty(logits_pV.shape[0], 0)
        head_ids_pK = head_pK.long()
        anchor_p1 = max_p1
    else:
        head_pK, head_ids_pK = top_logits_pK1[:, :top_k], top_ids_pK1[:, :top_k]
        anchor_p1 = top_logits_pK1[:, top_k:] if top_logits_pK1.shape[1] > top_k else (
            torch.full_like(max_p1, float("-inf")))
    below_pQ, at_pQ, spread_p1 = tail_sums(logits_pV, anchor_p1, compiled=compiled, scratch_pV=scratch_pV)
    has_tail_p1 = anchor_p1 > float("-inf")  # False where NaN too
    ties_p1 = (head_pK == anchor_p1).sum(-1, keepdim=True, dtype=torch.float32)
    tail_sum_p1 = torch.where(has_tail_p1, below_pQ.sum(-1, keepdim=True) + at_pQ.sum(-1, keepdim=True) - ties_p1,
                              0.0)
    # exp(l - m) = exp(a - m) exp(l - a) on the tail; 0 without one, where a - m is -inf (or NaN).
    gap_p1 = (anchor_p1 - max_p1).clamp_min(torch.finfo(torch.float32).min)
    scale_p1 = torch.where(has_tail_p1, gap_p1.exp(), 0.0)
    shifted_pK = head_pK - max_p1  # NaN at a position whose max is NaN, +inf or -inf
    exp_pK = shifted_pK.exp()
    z_p1 = exp_pK.sum(-1, keepdim=True) + scale_p1 * tail_sum_p1
    # exp * shifted is 0 * -inf = NaN at a logit of -inf: the clamp makes it 0 (p log p -> 0), and passes NaN on.
    spread_m_p1 = ((exp_pK * shifted_pK.clamp_min(torch.finfo(torch.float32).min)).sum(-1, keepdim=True)
                   + scale_p1 * (spread_p1 + gap_p1 * tail_sum_p1))
    log_z_p1 = z_p1.log()
    out = {"lse": max_p1 + log_z_p1,
           "entropy": torch.where(max_p1.isfinite(), log_z_p1 - spread_m_p1 / z_p1, float("nan"))}
    if top_k is not None:
        out["tail_max"], out["tail_sum"] = anchor_p1, tail_sum_p1
    if weights == FULL:
        # The head's ids above the anchor, added to their blocks (those at it are in `at`).
        above_pK = torch.where(head_pK > anchor_p1, exp_pK, 0.0)
        full_pQ = (scale_p1 * (below_pQ + at_pQ)).scatter_add_(1, head_ids_pK // DRAW_BLOCK, above_pK)
        out["block_sums"] = torch.where(max_p1.isfinite(), full_pQ, _block_sizes(logits_pV))
    elif weights == TAIL:
        out["block_sums"], out["block_at_tail_max"] = below_pQ, at_pQ
    return out


def tail_sums(logits_pV: torch.Tensor, anchor_p1: torch.Tensor, *, compiled: bool,
              scratch_pV: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`below` [p, Q], `at` [p, Q] and `spread` [p, 1] of the module docstring, anchored at `anchor_p1`; all 0 at
    a position whose anchor is -inf or NaN (no tail). Compiled or eager, as `run` says."""
    args = (logits_pV, anchor_p1)
    if compiled and logits_pV.device.type == "cpu" and (fused := compiled_pass()):
        # A position's values depend on the kernel alone, never on the rest of its block, so a build resumed or split
        # across workers equals one made in one go, bit for bit, provided every block runs the same kernel. Dynamo
        # would compile others, which may round otherwise: for sizes 0 and 1 (a single position runs as two copies
        # of itself), for how a view relates to its base, for strides (the top-k's columns are views), for sizes that
        # happen to be equal (duck sizing) and for the grad mode. So the kernel sees plain contiguous tensors (inference
        # tensors where the caller runs in inference mode, as the backends do), the vocabulary as a constant, and no
        # grad. A process that reaches dynamo's limit of kernels per function would run the pass uncompiled, rounding
        # otherwise: the limit here is far above what any process builds (a kernel per vocabulary and kind of tensor).
        plain = [arg.detach().contiguous() for arg in args]
        single = logits_pV.shape[0] == 1
        if single:
            plain = [arg.repeat(2, 1) for arg in plain]
        torch._dynamo.mark_static(plain[0], 1)
        try:
            with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                sums = fused(*plain)
            return tuple(value[:1] for value in sums) if single else sums
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


def fused_pass(logits_pV: torch.Tensor, anchor_p1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`tail_sums` for `torch.compile`: every value an expression of the logits, so that inductor computes them all
    in one loop per position (a buffer written in place and read back costs a loop of its own). Every sum over the
    vocabulary is a sum of block sums, each an expression of the logits viewed as [p, Q, B] (and of the last V mod B
    logits), so that the reductions share one loop nest."""
    V = logits_pV.shape[1]
    whole = V // DRAW_BLOCK * DRAW_BLOCK
    has_tail_p1 = anchor_p1 > float("-inf")  # False where NaN too
    anchor_p11 = torch.where(has_tail_p1, anchor_p1, 0.0)[..., None]
    parts = [] if whole == 0 else [
        _block_terms(logits_pV[:, :whole].unflatten(1, (V // DRAW_BLOCK, DRAW_BLOCK)), anchor_p11)]
    if whole < V:
        parts.append(_block_terms(logits_pV[:, None, whole:], anchor_p11))
    below_pQ, at_pQ, spread_pQ = (torch.cat(sums, dim=1) for sums in zip(*parts, strict=True))
    return (torch.where(has_tail_p1, below_pQ, 0.0), torch.where(has_tail_p1, at_pQ, 0.0),
            torch.where(has_tail_p1, spread_pQ.sum(-1, keepdim=True), 0.0))


def _block_terms(logits_pQB: torch.Tensor, anchor_p11: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`fused_pass`'s [p, Q] sums over the last dimension of logits viewed as blocks: below, at and spread."""
    shifted_pQB = logits_pQB - anchor_p11
    below_pQB1 = logits_pQB < anchor_p11  # the head (where exp may overflow) and NaN logits count 0
    # Each sum takes an exponential of its own: inductor writes one that several sums read to a [p, Q, B] buffer,
    # and the generated loop computes it once anyway. The clamp makes exp * shifted 0 at a logit of -inf (rather
    # than 0 * -inf = NaN).
    below_pQB = below_anchor(logits_pQB, anchor_p11)  # the draws recompute a drawn block's weights with it
    spread_pQB = torch.where(below_pQB1, shifted_pQB.exp() * shifted_pQB.clamp_min(torch.finfo(torch.float32).min), 0.0)
    return below_pQB.sum(-1), (logits_pQB == anchor_p11).sum(-1, dtype=torch.float32), spread_pQB.sum(-1)


def eager_pass(logits_pV: torch.Tensor, anchor_p1: torch.Tensor,
               scratch_pV: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fused_pass` op by op, in place: on CPU each fresh [p, V] buffer would cost its page faults, more than the op
    that fills it. The exponentials go into the caller's scratch buffer, the spread's terms into the spent
    `shifted_pV`."""
    has_tail_p1 = anchor_p1 > float("-inf")
    anchor_p1 = torch.where(has_tail_p1, anchor_p1, 0.0)
    shifted_pV = logits_pV - anchor_p1
    below_pV = torch.exp(shifted_pV, out=scratch_pV).masked_fill_((logits_pV < anchor_p1).logical_not_(), 0.0)
    below_pQ = block_sums(below_pV)
    at_pQ = block_sums(logits_pV == anchor_p1, torch.float32)
    spread_pV = shifted_pV.clamp_(torch.finfo(shifted_pV.dtype).min, 0.0).mul_(below_pV)
    spread_p1 = block_sums(spread_pV).sum(-1, keepdim=True)
    return (torch.where(has_tail_p1, below_pQ, 0.0), torch.where(has_tail_p1, at_pQ, 0.0),
            torch.where(has_tail_p1, spread_p1, 0.0))


def _block_sizes(logits_pV: torch.Tensor) -> torch.Tensor:
    """[1, Q] ids per block of DRAW_BLOCK (the last one V mod DRAW_BLOCK where that is not 0), as fp32."""
    return block_sums(torch.ones_like(logits_pV[:1]))


# This process's compiled pass, made on first use; None where torch.compile is unsupported or has failed.
_COMPILED: dict[str, VocabPass | None] = {}


def compiled_pass() -> VocabPass | None:
    """`fused_pass` through `torch.compile` (dynamic in the positions), or None where it cannot be compiled here."""
    if "pass" not in _COMPILED:
        supported = torch._dynamo.is_dynamo_supported() and torch._dynamo.is_inductor_supported()
        _COMPILED["pass"] = torch.compile(fused_pass, dynamic=True) if supported else None
    return _COMPILED["pass"]
