"""How N ids are drawn per position, by the scheme of `teacher-cache build --draw-scheme`: the one draw step of
sampled targets (from the full distribution), hybrid targets (from the tail) and the vllm backend (from the top-k
plus one tail bucket). The draws are then stored alike, as distinct ids and counts (`sampled.encode_draws`).

  - multinomial: N independent draws, each the id whose interval [c(v-1), c(v)) of the cumulative distribution holds
    an independent uniform point. An id of probability p is drawn Binomial(N, p) times: variance N p (1 - p).
  - systematic: one offset u ~ U[0, 1) per position and the N evenly spaced points (i + u) / N, i = 0..N-1, on the
    cumulative distribution; each point draws the id whose interval [c(v-1), c(v)) holds it. An interval of length
    p holds floor(N p) or ceil(N p) of the points, and E[count] = N p exactly (each point alone is uniform on its
    own 1/N of [0, 1)), so the draws stay unbiased with a variance of at most 1/4 per id, whatever N p.

Over a vocabulary, the cumulative distribution is never summed over all V ids (`draw_from_blocks`): the pass over
the vocabulary (`teacher_cache.targets.vocab_pass`) sums the weights over blocks of DRAW_BLOCK consecutive ids, a
point finds its block in the cumulative sum of those Q = ceil(V / DRAW_BLOCK) block sums, then its id in the
cumulative sum of the block's own weights, recomputed from its logits. Over a few outcomes (`draw`), the weights are
given and summed whole.

Legend: P positions, J outcomes a position draws from (the vocabulary, or K top-k ids + a tail bucket), N draws,
V vocabulary, Q blocks of the vocabulary, B = DRAW_BLOCK ids of a block, X = N * B ids of the drawn blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from storage.targets.sampled import SYSTEMATIC

# The scheme of builds that do not choose one (`--draw-scheme`): systematic, which closed more of the CE -> online
# gap than multinomial at both seeds, for sampled and hybrid targets alike (benchmarks/RESULTS.md, section 6).
DEFAULT_DRAW_SCHEME = SYSTEMATIC

# Consecutive ids whose weights the pass over the vocabulary sums into one block (the last block holds V mod B ids
# where B does not divide V): a draw then sums Q ~ V / B block sums and the B weights of its block, not V weights.
DRAW_BLOCK = 32

# The weights of the ids of the drawn blocks, from their logits ([P, X]) and the blocks ([P, N], see `block_ids`):
# the same expression, value for value, that the pass over the vocabulary summed into `block_sums`.
WeightFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def block_sums(values_PV: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[P, Q] sums of `values_PV` over each block of DRAW_BLOCK consecutive ids (the last one partial where the block
    does not divide V), in `dtype` (bool values count)."""
    V = values_PV.shape[1]
    whole = V // DRAW_BLOCK * DRAW_BLOCK
    sums_PQ = values_PV[:, :whole].unflatten(1, (V // DRAW_BLOCK, DRAW_BLOCK)).sum(-1, dtype=dtype)
    if V % DRAW_BLOCK:
        sums_PQ = torch.cat([sums_PQ, values_PV[:, whole:].sum(-1, keepdim=True, dtype=dtype)], dim=1)
    return sums_PQ


def block_ids(blocks_PN: torch.Tensor, size: int = DRAW_BLOCK) -> torch.Tensor:
    """[P, N * size] ids of the given blocks of `size` consecutive ids, block by block (past V in a partial last
    block)."""
    return (blocks_PN[..., None] * size + torch.arange(size, device=blocks_PN.device)).flatten(1)


def block_values(values_PV: torch.Tensor, blocks_PN: torch.Tensor, size: int = DRAW_BLOCK) -> torch.Tensor:
    """[P, N, size] values of the ids of the given blocks of `size` consecutive ids: block b holds the ids
    b * size + j, j < size. Where the last block is partial, its ids past V get the value of id V - 1."""
    P, V = values_PV.shape
    if V % size == 0 and values_PV.is_contiguous():
        # Whole rows of a [P * V / size, size] view: a copy of `size` values per block, several times faster on CPU
        # than gathering its ids one by one.
        rows_PN = blocks_PN + torch.arange(0, P * (V // size), V // size, device=values_PV.device)[:, None]
        return values_PV.view(-1, size).index_select(0, rows_PN.flatten()).view(P, -1, size)
    return values_PV.gather(1, block_ids(blocks_PN, size).clamp_max_(V - 1)).view(P, -1, size)


def draw(weights_PJ: torch.Tensor, num_draws: int, scheme: str, generator: torch.Generator | None) -> torch.Tensor:
    """[P, N] indices into J drawn from each row of `weights_PJ` (non-negative, normalised per row here).

    Multinomial draws are what torch.multinomial does, with its precision (a cumulative sum in the weights' dtype),
    but parallel over the rows: on CPU torch.multinomial walks them one after another on one core. Systematic ones
    sum in float64, whose rounding moves an interval's ends by at most about J * 1e-16 of the total, so an id of
    probability p is drawn floor(N p) or ceil(N p) times unless N p is within N times that of an integer. Either way
    an id of probability 0 (an empty interval) is never drawn, and systematic draws are ascending within a row.

    Args:
        weights_PJ: each position's probabilities (any positive total; a row needs some mass).
        num_draws: N.
        scheme: one of `storage.targets.sampled.DRAW_SCHEMES`.
        generator: random source of the draws, on the device of `weights_PJ`.
    """
    cdf_PJ = weights_PJ.cumsum(-1, dtype=torch.float64 if scheme == SYSTEMATIC else None)
    total_P1 = cdf_PJ[:, -1:].contiguous()  # searchsorted copies a strided one, with a warning
    return _interval_of(cdf_PJ, _points(total_P1, num_draws, scheme, generator), total_P1)


def draw_from_blocks(logits_PV: torch.Tensor, block_sums_PQ: torch.Tensor, weight_fn: WeightFn, num_draws: int,
                     scheme: str, generator: torch.Generator | None) -> torch.Tensor:
    """[P, N] ids drawn from weights over the vocabulary known only by their block sums and their expression.

    The points of the scheme fall on the float64 cumulative sum of the block sums: each draws the block whose
    interval holds it, then, within that block, the id whose interval of the block's float64 cumulative sum holds
    the point's place in the block's interval (the residual, rescaled from the block sum in the cumulative sum to the
    total of the recomputed weights: the two differ only by rounding). The ids' intervals thus partition the blocks'
    intervals, which partition [0, total): systematic counts are floor(N p) or ceil(N p), E[count] = N p, and an id
    or block of weight 0 is never drawn, all up to float64 rounding of the fp32 weights and sums.

    Args:
        logits_PV: fp32 logits the weights are computed from.
        block_sums_PQ: fp32 weights summed over each block of DRAW_BLOCK ids (`block_sums`); a row needs some mass.
        weight_fn: the weights of the drawn blocks' ids from their logits and the blocks (`WeightFn`), those of the
            pass that summed `block_sums_PQ`; ids past V, in the last block, get weight 0 whatever it gives.
        num_draws: N.
        scheme: one of `storage.targets.sampled.DRAW_SCHEMES`.
        generator: random source of the draws, on the device of `logits_PV`.
    """
    P, V = logits_PV.shape
    cdf_PQ = block_sums_PQ.cumsum(-1, dtype=torch.float64)
    total_P1 = cdf_PQ[:, -1:].contiguous()
    points_PN = _points(total_P1, num_draws, scheme, generator)
    blocks_PN = _interval_of(cdf_PQ, points_PN, total_P1)
    # The block's interval [start, end) of the cumulative sum, and the point's place in it (in [0, 1], or past 1 for
    # a point rounded up to the total, which the clamp below gives the block's last id with mass).
    end_PN = cdf_PQ.gather(1, blocks_PN)
    start_PN = torch.where(blocks_PN > 0, cdf_PQ.gather(1, (blocks_PN - 1).clamp_min_(0)), 0.0)
    place_PN = (points_PN - start_PN) / (end_PN - start_PN)
    weights_PX = weight_fn(block_values(logits_PV, blocks_PN).flatten(1), blocks_PN)
    if V % DRAW_BLOCK:
        weights_PX.masked_fill_(block_ids(blocks_PN) >= V, 0.0)
    in_block_PNB = weights_PX.view(P, num_draws, DRAW_BLOCK).cumsum(-1, dtype=torch.float64)
    block_total_PN1 = in_block_PNB[..., -1:].contiguous()
    at_PN1 = _interval_of(in_block_PNB, place_PN[..., None] * block_total_PN1, block_total_PN1)
    return blocks_PN * DRAW_BLOCK + at_PN1[..., 0]


def _points(total_P1: torch.Tensor, num_draws: int, scheme: str, generator: torch.Generator | None) -> torch.Tensor:
    """[P, N] points in [0, total] (the total only once rounded), by the scheme, in the dtype of `total_P1`."""
    if scheme == SYSTEMATIC:
        u_P1 = torch.rand(total_P1.shape, dtype=total_P1.dtype, device=total_P1.device, generator=generator)
        steps_N = torch.arange(num_draws, dtype=total_P1.dtype, device=total_P1.device)
        return (steps_N + u_P1) * (total_P1 / num_draws)
    u_PN = torch.rand((total_P1.shape[0], num_draws), dtype=total_P1.dtype, device=total_P1.device,
                      generator=generator)
    return u_PN * total_P1


def _interval_of(cdf_PJ: torch.Tensor, points_PN: torch.Tensor, total_P1: torch.Tensor) -> torch.Tensor:
    """The index j with c(j-1) <= point < c(j) of each point in [0, total] (right=True, so outcomes of weight 0,
    where c(j-1) = c(j), hold no point); leading dimensions beyond P work alike."""
    ids_PN = torch.searchsorted(cdf_PJ, points_PN, right=True)
    # A point rounded up to the total lies past every interval: it belongs to the last outcome with mass, the first
    # whose cumulative sum reaches the total.
    return ids_PN.minimum(torch.searchsorted(cdf_PJ, total_P1))
