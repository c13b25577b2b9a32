"""Draws from block sums (`teacher_cache.targets.draws.draw_from_blocks`): a block of 32 ids found in the cumulative sum
of the pass's block sums, then an id in the cumulative sum of that block's weights, recomputed from its logits.

`draw_from_blocks` is checked on hand-made weights whose block sums are summed here (integer weights, so the fp32
sums are exact and N p is known to float64): a distribution spread across block boundaries and into the last,
partial block of a vocabulary that 32 does not divide; a point exactly on a block boundary, and one rounded up to the
total. The pass's block sums (eager and compiled) are checked against a float64 brute force, and extractions of
logits with a whole block at -inf, or all their mass in the partial block, against a float64 softmax. Hybrid draws
are checked on a hand-made top-k whose ties at the tail's largest logit fill one block alone and share another with
tail ids: the tied ids are never drawn, the tail ids are, by their share of the tail. Compiled and eager extractions
give the same draws from the same generator. The blocks' values (a row view where 32 divides V, else a gather) and
the staged top-k (`topk.largest`) are checked against indexing and torch.topk.

Every count is checked as in `test_draw_schemes`: systematic counts are floor or ceil of N p, ids at p = 0 are never
drawn, and means over many positions are within five standard errors of N p.

Legend: P positions, V vocabulary, Q blocks of 32 ids, K top-k, N draws.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_draw_schemes import counts_of, dense_counts

from teacher_cache.targets import TargetSpec, extract_targets, vocab_pass
from teacher_cache.targets.base import Block
from teacher_cache.targets.draws import DRAW_BLOCK, block_values, draw_from_blocks
from teacher_cache.targets.hybrid import tail_draws
from teacher_cache.targets.topk import largest

N, SLACK = 16, 1e-4


@pytest.fixture(params=[False, True], ids=["eager", "compiled"])
def compiled(request) -> bool:
    if request.param and vocab_pass.compiled_pass() is None:
        pytest.skip("torch.compile (dynamo with inductor) is not supported here: only the eager pass runs")
    return request.param


def assert_drawn_by(counts_PV: torch.Tensor, p_PV: torch.Tensor, scheme: str, num_draws: int = N,
                    slack: float = SLACK) -> None:
    """N draws per row, none at p = 0; systematic counts floor or ceil of N p; the mean count over the rows within 5
    standard errors (binomial, or 0.5 per systematic count) of the mean N p."""
    assert (counts_PV.sum(-1) == num_draws).all()
    assert (counts_PV[p_PV == 0] == 0).all()
    expected_PV = num_draws * p_PV
    if scheme == "systematic":
        assert ((counts_PV >= (expected_PV - slack).floor()) & (counts_PV <= (expected_PV + slack).ceil())).all()
    sd_V = (num_draws * p_PV * (1 - p_PV)).mean(0).sqrt() if scheme == "multinomial" else torch.full_like(
        p_PV[0], 0.5)
    assert ((counts_PV.mean(0) - expected_PV.mean(0)).abs() <= 5 * sd_V / math.sqrt(len(p_PV)) + 1e-9).all()


def block_sums_of(weights_PV: torch.Tensor) -> torch.Tensor:
    """[P, Q] fp32 sums over blocks of 32 ids, the last padded with zeros: computed here, not by the code under test."""
    padded_PV = torch.nn.functional.pad(weights_PV, (0, -weights_PV.shape[1] % DRAW_BLOCK))
    return padded_PV.view(weights_PV.shape[0], -1, DRAW_BLOCK).sum(-1)


def hand_made_weights() -> torch.Tensor:
    """[100] integer weights: a run across the boundary of blocks 0 and 1, a zero at the start of block 2 before an
    id of mass, and mass in the last block, which holds ids 96-99 only."""
    weights_V = torch.zeros(100)
    weights_V[28:36] = torch.arange(1.0, 9.0)
    weights_V[63], weights_V[65] = 10.0, 3.0
    weights_V[97], weights_V[99] = 2.0, 5.0
    return weights_V


def draw_weights(weights_PV: torch.Tensor, num_draws: int, scheme: str, seed: int | None = 0) -> torch.Tensor:
    """`draw_from_blocks` of explicit weights: the logits are the weights themselves, and so are their weights."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return draw_from_blocks(weights_PV, block_sums_of(weights_PV), lambda values_PX, _: values_PX, num_draws, scheme,
                            generator)


# ------------------------------------------------------------------------------------- the two-level inverse


@pytest.mark.parametrize("num_draws", [1, 7, 16, 100])
def test_systematic_counts_through_the_two_levels_are_floor_or_ceil_of_n_p(num_draws):
    weights_V = hand_made_weights()
    draws_PN = draw_weights(weights_V.repeat(4000, 1), num_draws, "systematic")
    assert (draws_PN.diff(dim=1) >= 0).all() and draws_PN.max() < 100
    p_PV = (weights_V.double() / weights_V.double().sum()).expand(4000, -1)
    counts_PV = counts_of(draws_PN, 100)
    assert_drawn_by(counts_PV, p_PV, "systematic", num_draws, slack=1e-9)
    fractional_V = num_draws * p_PV[0] % 1 > 0
    assert len(set(counts_PV[:, fractional_V.nonzero()[0]].flatten().tolist())) == 2  # both floor and ceil occur


def test_multinomial_counts_through_the_two_levels_follow_p():
    weights_V = hand_made_weights()
    counts_PV = counts_of(draw_weights(weights_V.repeat(20000, 1), N, "multinomial"), 100)
    assert_drawn_by(counts_PV, (weights_V.double() / weights_V.double().sum()).expand(20000, -1), "multinomial")


def test_a_point_on_a_block_boundary_draws_the_next_block(monkeypatch):
    """Offset 0: the points 0 and 1 of two ids of weight 1 at the last id of block 0 and the first of block 1. The
    point 1 ends block 0's interval [0, 1) and draws id 32, not id 31 again or a zero-weight id after it."""
    monkeypatch.setattr(torch, "rand", lambda *shape, **kwargs: torch.zeros(*shape, dtype=torch.float64))
    weights_V = torch.zeros(70)
    weights_V[31] = weights_V[32] = 1.0
    assert draw_weights(weights_V[None], 2, "systematic", seed=None).tolist() == [[31, 32]]


def test_a_point_rounded_up_to_the_total_draws_the_last_id_with_mass(monkeypatch):
    """The largest offset below 1 puts the last point at the total once rounded: past every block, it belongs to
    the last id with mass (40, in block 1), not to the blocks or ids of weight 0 after it."""
    largest = 1.0 - 2.0**-53
    assert 3 + largest == 4.0  # the rounding this test relies on
    monkeypatch.setattr(torch, "rand", lambda *shape, **kwargs: torch.full(*shape, largest, dtype=torch.float64))
    weights_V = torch.zeros(70)
    weights_V[5], weights_V[40] = 1.0, 3.0
    assert draw_weights(weights_V[None], 4, "systematic", seed=None).tolist() == [[5, 40, 40, 40]]


# --------------------------------------------------------------------------------- through the pass's sums


def test_the_pass_sums_the_weights_of_every_block(compiled):
    """FULL (with top-k and without): exp(l - m) per block of 32 ids, the last of 101 - 96 = 5; TAIL: below the
    anchor and (exact) at it."""
    logits_PV = torch.randn(6, 101, generator=torch.Generator().manual_seed(0)).mul(3).round()  # many ties
    logits_PV[1, 32:64] = float("-inf")
    top_logits_PK1, top_ids_PK1 = logits_PV.topk(5)
    max_P1, tail_max_P1 = top_logits_PK1[:, :1], top_logits_PK1[:, 4:]
    pad = (0, -101 % DRAW_BLOCK)
    for weights, top_k in ((vocab_pass.FULL, None), (vocab_pass.FULL, 4), (vocab_pass.TAIL, 4)):
        top = (None, None) if top_k is None else (top_logits_PK1, top_ids_PK1)
        with torch.inference_mode():
            passed = vocab_pass.run(logits_PV, max_P1, *top, top_k, weights, compiled=compiled)
        assert passed["block_sums"].shape == (6, 4)
        if weights == vocab_pass.FULL:
            exp_PV = (logits_PV.double() - max_P1.double()).exp()
            torch.testing.assert_close(passed["block_sums"].double(), block_sums_of(exp_PV), rtol=1e-5, atol=0)
            assert (passed["block_sums"][1, 1] == 0).all()
            continue
        logits_PQB = torch.nn.functional.pad(logits_PV.double(), pad, value=float("inf")).view(6, 4, DRAW_BLOCK)
        a_P11 = tail_max_P1.double()[..., None]
        below_PQ = torch.where(logits_PQB < a_P11, (logits_PQB - a_P11).exp(), 0.0).sum(-1)
        torch.testing.assert_close(passed["block_sums"].double(), below_PQ, rtol=1e-5, atol=0)
        assert torch.equal(passed["block_at_tail_max"].double(), (logits_PQB == a_P11).sum(-1).double())


@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_full_draws_skip_a_block_at_minus_inf_and_reach_the_partial_block(compiled, scheme):
    """V = 101: rows with block 1 at -inf, with all their mass in ids 96-100 (the partial block), and with a single
    id of mass at 100; no id past 100 and none at p = 0 is ever drawn."""
    base_PV = torch.randn(3, 101, generator=torch.Generator().manual_seed(1)) * 2
    base_PV[0, 32:64] = float("-inf")
    base_PV[1, :96] = float("-inf")
    base_PV[2, :100] = float("-inf")
    logits_PV = base_PV.repeat(2000, 1)
    spec = TargetSpec(top_k=None, num_draws=N, chunk_positions=1000, block_positions=300, draw_scheme=scheme,
                      compiled=compiled)
    with torch.inference_mode():
        out = extract_targets(torch.arange(len(logits_PV), dtype=torch.float32)[:, None],
                              torch.zeros(len(logits_PV), dtype=torch.long),
                              lambda h_p1: logits_PV[h_p1[:, 0].long()], spec, torch.Generator().manual_seed(0))
    assert out["sampled_ids"].max() <= 100
    p_PV = logits_PV.double().softmax(-1)
    counts_PV = dense_counts(out, 101)
    for case in range(3):
        assert_drawn_by(counts_PV[case::3], p_PV[case::3], scheme)
    assert (counts_PV[2::3, 100] == N).all()


@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_tied_top_k_ids_are_never_drawn_even_alone_in_their_block(compiled, scheme):
    """Top-4 (10, 5, 5, 5) at ids 0, 32, 33, 64; the tail's largest logit, 5, at id 70 too. Block 1 holds only the
    tied top-k ids 32 and 33 (the rest -inf): it weighs exactly 0. Block 2 holds the tied top-k id 64 beside tail ids
    (70 at 5, the others below): only the tail ids are drawn, each by its share of the tail."""
    logits_V = torch.randn(100, generator=torch.Generator().manual_seed(2)) - 2
    logits_V[32:64] = float("-inf")
    logits_V[0], logits_V[[32, 33, 64, 70]] = 10.0, 5.0
    P, K = 3000, 4
    logits_PV = logits_V.repeat(P, 1)
    top_ids_PK1 = torch.tensor([0, 32, 33, 64, 70]).repeat(P, 1)
    top_logits_PK1 = logits_PV.gather(1, top_ids_PK1)
    max_P1, tail_max_P1 = top_logits_PK1[:, :1], top_logits_PK1[:, K:]
    with torch.inference_mode():
        passed = vocab_pass.run(logits_PV, max_P1, top_logits_PK1, top_ids_PK1, K, vocab_pass.TAIL, compiled=compiled)
        block = Block(logits_PV, max_P1, passed["lse"], top_logits_PK1, top_ids_PK1, tail_max_P1, passed["tail_sum"],
                      passed["block_sums"], passed["block_at_tail_max"], {})
        out = tail_draws(block, K, torch.ones(P, dtype=torch.bool), N, scheme, torch.Generator().manual_seed(0))
    assert torch.equal(passed["block_at_tail_max"][0], torch.tensor([0.0, 2.0, 2.0, 0.0]))
    tail_V = logits_V.double().softmax(-1)
    tail_V[[0, 32, 33, 64]] = 0.0
    counts_PV = dense_counts(out, 100)
    assert (counts_PV[:, [0, 32, 33, 64]] == 0).all() and (counts_PV[:, 70] > 0).any()
    assert_drawn_by(counts_PV, (tail_V / tail_V.sum()).expand(P, -1), scheme)


@pytest.mark.parametrize("targets", [{"top_k": None}, {"top_k": 8}, {"top_k": 8, "draws_from_tail": True}],
                         ids=["sampled", "topk+sampled", "hybrid"])
@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_compiled_and_eager_draw_the_same_ids(targets, scheme):
    if vocab_pass.compiled_pass() is None:
        pytest.skip("torch.compile (dynamo with inductor) is not supported here: only the eager pass runs")
    logits_PV = torch.randn(37, 3000, generator=torch.Generator().manual_seed(3)) * 4
    logits_PV[::4, 1000:2000] = float("-inf")
    spec = {"num_draws": 32, "draw_scheme": scheme, "chunk_positions": 16} | targets
    fused, eager = (extract_targets(torch.arange(37, dtype=torch.float32)[:, None], torch.zeros(37, dtype=torch.long),
                                    lambda h_p1: logits_PV[h_p1[:, 0].long()], TargetSpec(compiled=compiled, **spec),
                                    torch.Generator().manual_seed(4)) for compiled in (True, False))
    for name in ("sampled_nunique", "sampled_ids", "sampled_counts"):
        assert torch.equal(fused[name], eager[name]), name


# --------------------------------------------------------------------------------- blocks of ids and the top-k


@pytest.mark.parametrize("V", [96, 101])
def test_block_values_are_the_logits_of_the_blocks_ids(V):
    """Block b holds ids 32 b .. 32 b + 31; ids past V (the partial last block of V = 101) read id V - 1."""
    values_PV = torch.randn(3, V, generator=torch.Generator().manual_seed(6))
    blocks_PN = torch.tensor([[0, 2, 2], [1, 0, 2], [-(-V // DRAW_BLOCK) - 1] * 3])
    ids_PNB = (blocks_PN[..., None] * DRAW_BLOCK + torch.arange(DRAW_BLOCK)).clamp_max(V - 1)
    expected_PNB = torch.stack([values_PV[row, ids_PNB[row]] for row in range(3)])
    assert torch.equal(block_values(values_PV, blocks_PN), expected_PNB)


@pytest.mark.parametrize("V", [3008, 3001])
@pytest.mark.parametrize("n", [9, 65])
def test_the_staged_top_k_is_a_top_k(V, n):
    """Against torch.topk: the same values in the same order, at ids that hold them, each once; rows with ties
    across every stage (a run of equal logits, all equal logits, integer logits), -inf and a NaN."""
    logits_PV = torch.randn(8, V, generator=torch.Generator().manual_seed(7)) * 3
    logits_PV[1, 100:200] = logits_PV[1].max()
    logits_PV[2] = 1.0
    logits_PV[3] = logits_PV[3].round()
    logits_PV[4, ::2] = float("-inf")
    logits_PV[5, V - 1] = logits_PV[5].max() + 1  # the partial block, where there is one
    logits_PV[6, 5] = float("nan")
    values_Pn, ids_Pn = largest(logits_PV, n)
    expected_Pn = logits_PV.topk(n).values
    assert torch.equal(values_Pn.nan_to_num(), expected_Pn.nan_to_num())
    assert torch.equal(logits_PV.gather(1, ids_Pn).nan_to_num(), values_Pn.nan_to_num())
    assert all(len(set(row.tolist())) == n for row in ids_Pn)
