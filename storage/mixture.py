"""The math of an ensemble store: the stored targets of M teachers at the same positions, mixed with weights w.

The mixture is q = sum_j w_j p_j (w_j > 0, sum 1). From each member's sparse targets (`storage/FORMAT.md`):

- top-k + tail: over the union U of the members' top-k ids, q~(i) = sum_j w_j p_j(i) [i in topk_j], and the tail
  sum_j w_j tail_j. Mass is kept (the parts sum to 1), but "tails combined": what member j puts on an id of U that
  is outside its own top-k stays in its tail, so q~(i) <= q(i) (a lower bound, exact for the ids in every member's
  top-k) and the tail over-counts by as much. The output keeps the k largest q~ of U and adds the rest to the tail.
- true-token log-prob: log sum_j w_j exp(true_logprob_j), exact.
- entropy: a lower bound. Entropy is concave, H(q) = sum_j w_j H(p_j) + JS_w(p_1..p_M), where the generalised
  Jensen-Shannon divergence JS_w is the mutual information I(J; X) of the member J ~ w and the token X ~ p_J. Any
  function of X loses information (data processing), so JS_w >= I(J; g(X)) with g keeping the ids found in every
  member's top-k (their probabilities are known for every member) and merging all other ids into one cell (its
  mass for member j is 1 minus those). Hence H(q) >= sum_j w_j H_j + I(J; g(X)): tight when the members agree,
  never above the entropy whether H_j is exact or itself a lower bound (vllm). The bound of the vllm backend,
  H_head + tail * -log(p_min), does not carry over: q~ underestimates q, and an id outside the kept ones may be
  more probable in q than the smallest kept one.
- sampled draws: N_j stored draws of member j are iid from p_j. A uniformly random subset of n_j of them, chosen
  without looking at their values, is n_j iid draws from p_j, so pooling n_j draws of every member gives counts c
  with E[c(i)] = sum_j n_j p_j(i): c / N with N = sum_j n_j is unbiased for q exactly when n_j = w_j N. With equal
  weights and equal N_j every draw is kept (n_j = N_j, no randomness); otherwise `draw_split` finds the largest
  such integer split and the draws are subsampled.

Everything works on the P trained positions of a block of samples at once: numpy over arrays, no loop per token.

Legend: P positions, M members, K_j member j's top-k, S = sum_j K_j pooled entries per position (runs of one id
occupy the first columns of an [P, S] run array), K ids kept, N_j draws of member j, E flat sampled entries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _xlogx(x: np.ndarray) -> np.ndarray:
    """x log x with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(x), 0.0)


def _log(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(x)


class TopkUnion:
    """The members' top-k entries of P positions, pooled per position and grouped by id.

    Args:
        ids: member j's top-k ids, [P, K_j] each (distinct within a position).
        logprobs: their log-probs, [P, K_j] each (the stored values).
        tail_logmass: member j's log tail mass, [P] each.
        weights: the members' weights, positive, summing to 1.
    """

    def __init__(self, ids: Sequence[np.ndarray], logprobs: Sequence[np.ndarray], tail_logmass: Sequence[np.ndarray],
                 weights: Sequence[float]):
        self.weights_M = np.asarray(weights, np.float64)
        self.log_tail_PM = np.stack([t.astype(np.float64) for t in tail_logmass], 1)
        self.tail_PM = np.exp(self.log_tail_PM)
        ids_PS = np.concatenate([a.astype(np.int64) for a in ids], 1)
        prob_PS = np.exp(np.concatenate([a.astype(np.float64) for a in logprobs], 1))
        member_PS = np.concatenate([np.full(a.shape, j) for j, a in enumerate(ids)], 1)
        order_PS = np.argsort(ids_PS, axis=1, kind="stable")
        self.ids_PS, self.prob_PS, self.member_PS = (np.take_along_axis(a, order_PS, 1)
                                                     for a in (ids_PS, prob_PS, member_PS))
        P, S = ids_PS.shape
        start_PS = np.ones((P, S), bool)
        start_PS[:, 1:] = self.ids_PS[:, 1:] != self.ids_PS[:, :-1]
        self.run_PS = np.cumsum(start_PS, 1) - 1  # which run (distinct id) of its position an entry belongs to
        flat_PS = (np.arange(P)[:, None] * S + self.run_PS).ravel()
        weighted_PS = self.prob_PS * self.weights_M[self.member_PS]
        # Run r of a position, in column r: its id, its mass sum_j w_j p_j(id), and how many members hold it.
        self.mass_PR = np.bincount(flat_PS, weights=weighted_PS.ravel(), minlength=P * S).reshape(P, S)
        self.size_PR = np.bincount(flat_PS, minlength=P * S).reshape(P, S)
        self.ids_PR = np.zeros((P, S), np.int64)
        rows_P, cols_P = np.nonzero(start_PS)
        self.ids_PR[rows_P, self.run_PS[rows_P, cols_P]] = self.ids_PS[rows_P, cols_P]

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The k most probable ids of the union, ascending, with their mixed log-probs, and the log tail mass.

        The tail is sum_j w_j tail_j plus the mass of the union's ids that are not kept, summed from their parts
        in log space (never 1 - sum, so a tiny tail keeps its precision). Each position must have at least k ids in
        the union (it does when k <= max K_j).

        Returns:
            ids [P, k] (int64), log-probs [P, k] (float32; the writer rounds them to the store's steps), tail
            log-mass [P] (float32).
        """
        valid_PR = self.size_PR > 0
        score_PR = np.where(valid_PR, self.mass_PR, -1.0)
        # Runs are numbered in ascending id order, so sorted run columns give ascending ids.
        keep_Pk = np.sort(np.argpartition(-score_PR, k - 1, axis=1)[:, :k], axis=1)
        kept_PR = np.zeros_like(valid_PR)
        np.put_along_axis(kept_PR, keep_Pk, True, 1)
        dropped_P = np.where(valid_PR & ~kept_PR, self.mass_PR, 0.0).sum(1)
        log_tail_P = np.logaddexp(np.logaddexp.reduce(self.log_tail_PM + np.log(self.weights_M), axis=1),
                                  _log(dropped_P))
        ids_Pk = np.take_along_axis(self.ids_PR, keep_Pk, 1)
        logprobs_Pk = _log(np.take_along_axis(self.mass_PR, keep_Pk, 1))
        return ids_Pk, logprobs_Pk.astype(np.float32), log_tail_P.astype(np.float32)

    def shared_information(self) -> np.ndarray:
        """[P] I(J; g(X)) (module docstring): the Jensen-Shannon information the ids in every top-k reveal, >= 0.

        Cells: each id held by all M members, and one cell for the rest; sum over cells of
        sum_j w_j p_jc log p_jc - q_c log q_c, with q_c = sum_j w_j p_jc.
        """
        P, M = self.tail_PM.shape
        shared_PR = self.size_PR == M
        shared_PS = np.take_along_axis(shared_PR, self.run_PS, 1)
        w_PS = self.weights_M[self.member_PS]
        inside_P = (np.where(shared_PS, w_PS * _xlogx(self.prob_PS), 0.0).sum(1)
                    - np.where(shared_PR, _xlogx(self.mass_PR), 0.0).sum(1))
        # Member j's mass outside the shared ids: its tail and its entries that are not shared.
        flat_PS = (np.arange(P)[:, None] * M + self.member_PS).ravel()
        unshared_PM = np.bincount(flat_PS, weights=np.where(shared_PS, 0.0, self.prob_PS).ravel(),
                                  minlength=P * M).reshape(P, M)
        rest_PM = self.tail_PM + unshared_PM
        rest_P = (rest_PM * self.weights_M).sum(1)
        info_P = inside_P + (_xlogx(rest_PM) * self.weights_M).sum(1) - _xlogx(rest_P)
        return np.maximum(info_P, 0.0)  # >= 0 in exact arithmetic; clip the rounding of the stored log-probs


def mix_logprobs(logprobs: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """log sum_j w_j exp(logprob_j) of [P] arrays, in float64 log space (exact); float32 [P]."""
    stacked_MP = np.stack([a.astype(np.float64) for a in logprobs])
    log_w_M1 = np.log(np.asarray(weights, np.float64))[:, None]
    return np.logaddexp.reduce(stacked_MP + log_w_M1, axis=0).astype(np.float32)


def entropy_lower_bound(entropies: Sequence[np.ndarray], weights: Sequence[float],
                        shared_information: np.ndarray | None = None) -> np.ndarray:
    """sum_j w_j H_j, plus I(J; g(X)) when the members' top-k are known (`TopkUnion.shared_information`); float32."""
    bound_P = sum(w * h.astype(np.float64) for w, h in zip(weights, entropies, strict=True))
    if shared_information is not None:
        bound_P = bound_P + shared_information
    return np.asarray(bound_P, np.float32)


def draw_split(weights: Sequence[float], num_draws: Sequence[int], limit: int = (1 << 16) - 1) -> list[int] | None:
    """Draws n_j to take from each member so that n_j = w_j * sum(n) exactly, n_j <= num_draws_j, the total as large
    as possible (at most `limit`); None when no integer split exists (weights far from ratios of small integers)."""
    largest = min(limit, *(int(n / w + 1e-9) for w, n in zip(weights, num_draws, strict=True)))
    for total in range(largest, 0, -1):
        take = [w * total for w in weights]
        if all(abs(t - round(t)) < 1e-6 for t in take):
            return [round(t) for t in take]
    return None


def pool_draws(members: Sequence[tuple[np.ndarray, np.ndarray]], num_draws: Sequence[int], take: Sequence[int],
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool `take[j]` draws of every member at each of P positions.

    Args:
        members: member j's flat (ids [E_j], counts [E_j]) entries of the P positions, position-major.
        num_draws: N_j, the draws every position of member j holds (its counts sum to N_j).
        take: draws n_j <= N_j to keep of member j; a uniformly random subset (from `rng`) when n_j < N_j.
        rng: random source of the subsets.

    Returns:
        The pooled draws as the store encodes them: nunique [P], ids [E] (ascending within a position), counts [E].
    """
    pooled = []
    for (ids_E, counts_E), N, n in zip(members, num_draws, take, strict=True):
        draws_PN = np.repeat(ids_E.astype(np.int64), counts_E.astype(np.int64)).reshape(-1, N)
        if n < N:  # the n smallest of N iid uniform keys: a uniformly random subset, independent of the ids
            pick_Pn = np.argpartition(rng.random(draws_PN.shape), n - 1, axis=1)[:, :n]
            draws_PN = np.take_along_axis(draws_PN, pick_Pn, 1)
        pooled.append(draws_PN)
    return encode_draws(np.concatenate(pooled, 1))


def encode_draws(draws_PN: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws [P, N] as distinct ids (ascending within a position) and counts, flattened position-major, with the
    number of distinct ids per position."""
    sorted_PN = np.sort(draws_PN, axis=1)
    start_PN = np.ones(sorted_PN.shape, bool)
    start_PN[:, 1:] = sorted_PN[:, 1:] != sorted_PN[:, :-1]
    starts_E = np.flatnonzero(start_PN)
    ends_E = np.append(starts_E[1:], sorted_PN.size)
    return start_PN.sum(1), sorted_PN.ravel()[starts_E], ends_E - starts_E
