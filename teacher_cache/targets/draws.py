"""How N ids are drawn per position, by the scheme of `teacher-cache build --draw-scheme`: the one draw step of
sampled targets (from the full distribution), hybrid targets (from the tail) and the vllm backend (from the top-k
plus one tail bucket). The draws are then stored alike, as distinct ids and counts (`sampled.encode_draws`).

  - multinomial: N independent draws, each the id whose interval [c(v-1), c(v)) of the cumulative distribution holds
    an independent uniform point. An id of probability p is drawn Binomial(N, p) times: variance N p (1 - p).
  - systematic: one offset u ~ U[0, 1) per position and the N evenly spaced points (i + u) / N, i = 0..N-1, on the
    cumulative distribution; each point draws the id whose interval [c(v-1), c(v)) holds it. An interval of length
    p holds floor(N p) or ceil(N p) of the points, and E[count] = N p exactly (each point alone is uniform on its
    own 1/N of [0, 1)), so the draws stay unbiased with a variance of at most 1/4 per id, whatever N p.

Legend: P positions, J outcomes a position draws from (the vocabulary, or K top-k ids + a tail bucket), N draws.
"""

from __future__ import annotations

import torch

from storage.targets.sampled import MULTINOMIAL, SYSTEMATIC

# The scheme of builds that do not choose one (`--draw-scheme`).
DEFAULT_DRAW_SCHEME = MULTINOMIAL


def draw(weights_PJ: torch.Tensor, num_draws: int, scheme: str, generator: torch.Generator | None, *,
         in_place: bool = False) -> torch.Tensor:
    """[P, N] indices into J drawn from each row of `weights_PJ` (non-negative, normalised per row here).

    Args:
        weights_PJ: each position's probabilities (any positive total; a row needs some mass).
        num_draws: N.
        scheme: one of `storage.targets.sampled.DRAW_SCHEMES`.
        generator: random source of the draws, on the device of `weights_PJ`.
        in_place: multinomial draws may overwrite `weights_PJ` with its cumulative sum, sparing a [P, J] buffer.
    """
    if scheme == SYSTEMATIC:
        return systematic_draws(weights_PJ, num_draws, generator)
    return independent_draws(weights_PJ, num_draws, generator, in_place=in_place)


def independent_draws(weights_PJ: torch.Tensor, num_draws: int, generator: torch.Generator | None, *,
                      in_place: bool = False) -> torch.Tensor:
    """Multinomial draws: each the id whose interval of the cumulative distribution holds an independent uniform point.

    What torch.multinomial does, with its precision (a cumulative sum in the weights' dtype), but parallel over the
    rows: on CPU torch.multinomial walks them one after another on one core, at about the cost of the whole pass over
    the vocabulary. An id of probability 0 (an empty interval) is never drawn.
    """
    cdf_PJ = weights_PJ.cumsum_(-1) if in_place else weights_PJ.cumsum(-1)
    total_P1 = cdf_PJ[:, -1:].contiguous()  # searchsorted copies a strided one, with a warning
    u_PN = torch.rand((weights_PJ.shape[0], num_draws), dtype=cdf_PJ.dtype, device=weights_PJ.device,
                      generator=generator)
    return _interval_of(cdf_PJ, u_PN * total_P1, total_P1)


def systematic_draws(weights_PJ: torch.Tensor, num_draws: int, generator: torch.Generator | None) -> torch.Tensor:
    """Systematic draws (see the module docstring), ascending within a row.

    The cumulative sum is in float64: its rounding moves an interval's ends by at most about J * 1e-16 of the total
    (3e-12 at J = 32k), so an id of probability p is drawn floor(N p) or ceil(N p) times unless N p is within N times
    that of an integer, and an id of probability 0 (an empty interval) never. It takes a [P, J] float64 buffer, twice
    a block's fp32 probabilities.
    """
    cdf_PJ = weights_PJ.cumsum(-1, dtype=torch.float64)
    total_P1 = cdf_PJ[:, -1:].contiguous()  # searchsorted copies a strided one, with a warning
    u_P1 = torch.rand(total_P1.shape, dtype=torch.float64, device=weights_PJ.device, generator=generator)
    steps_N = torch.arange(num_draws, dtype=torch.float64, device=weights_PJ.device)
    return _interval_of(cdf_PJ, (steps_N + u_P1) * (total_P1 / num_draws), total_P1)


def _interval_of(cdf_PJ: torch.Tensor, points_PN: torch.Tensor, total_P1: torch.Tensor) -> torch.Tensor:
    """The id v with c(v-1) <= point < c(v) of each point in [0, total] (right=True, so ids of probability 0, where
    c(v-1) = c(v), hold no point)."""
    ids_PN = torch.searchsorted(cdf_PJ, points_PN, right=True)
    # A point rounded up to the total lies past every interval: it belongs to the last id with mass, the first
    # whose cumulative sum reaches the total.
    return ids_PN.minimum(torch.searchsorted(cdf_PJ, total_P1))
