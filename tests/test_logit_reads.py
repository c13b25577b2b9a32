"""`student_train.logit_reads` where a read covers many ids: the membership test behind the gradient at excluded ids,
and the fused hybrid loss with as many tail draws as the tail has ids, both against brute force.

Hybrid targets read the K head ids and M drawn tail ids of each position at once (K + M entries, padding included);
the gradient at those ids is written exactly, each read's term 0 at the ids it excludes. Here a read's membership is
checked against a comparison of every pair of ids, and the loss and its gradient against the dense float64
references of `test_hybrid_losses`, on a vocabulary whose tail is drawn almost whole, with padding entries (id 0)
that coincide with head ids and with drawn ids.

Legend: R rows, U ids looked up, J entries of a read, B batch, L positions per row, V vocabulary, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_hybrid_losses import B, K, L, V, head_records, hybrid_reference, loss_and_grad, tail_counts
from test_losses import config, sampled_records

from student_train import logit_reads
from student_train.logit_reads import _among


def among_pairwise(ids_RU: torch.Tensor, ids_RJ: torch.Tensor, valid_RJ: torch.Tensor | None) -> torch.Tensor:
    """Whether each looked-up id equals a valid entry of its row, one pair at a time."""
    out = torch.zeros(ids_RU.shape, dtype=torch.bool)
    for r in range(ids_RU.shape[0]):
        for u in range(ids_RU.shape[1]):
            out[r, u] = any(int(ids_RJ[r, j]) == int(ids_RU[r, u]) and (valid_RJ is None or bool(valid_RJ[r, j]))
                            for j in range(ids_RJ.shape[1]))
    return out


def test_membership_by_hand():
    ids_RJ = torch.tensor([[4, 0, 7, 0], [3, 3, 9, 1]])
    valid_RJ = torch.tensor([[True, True, False, False], [False, True, True, False]])
    ids_RU = torch.tensor([[0, 7, 4, 5, 0], [3, 1, 9, 0, 2]])
    expected = torch.tensor([[True, False, True, False, True], [True, False, True, False, False]])
    assert torch.equal(_among(ids_RU, ids_RJ, valid_RJ), expected)
    assert torch.equal(_among(ids_RU, ids_RJ, None), torch.tensor([[True, True, True, False, True],
                                                                   [True, True, True, False, False]]))
    # A read of no ids excludes nothing.
    assert not _among(ids_RU, ids_RJ[:, :0], valid_RJ[:, :0]).any()


@pytest.mark.parametrize("entries", [1, 7, 120])
def test_membership_matches_every_pair(entries):
    gen = torch.Generator().manual_seed(entries)
    ids_RJ = torch.randint(0, 40, (6, entries), generator=gen)  # repeated ids, as head + padding entries give
    valid_RJ = torch.rand(6, entries, generator=gen) < 0.7
    ids_RU = torch.cat([ids_RJ, torch.randint(0, 40, (6, 30), generator=gen)], -1)
    for valid in (valid_RJ, None):
        assert torch.equal(_among(ids_RU, ids_RJ, valid), among_pairwise(ids_RU, ids_RJ, valid))


def many_draws_case(seed: int, draws: int):
    """Logits [B, L, V] (leaf), dense tail counts and the batch, with a flat tail drawn `draws` times: nearly every
    tail id drawn at some positions, few at others (so padding, id 0, fills their rows); id 0 is a head id at
    position (0, 0) and a drawn tail id at position (1, 0)."""
    gen = torch.Generator().manual_seed(seed)
    teacher = 0.3 * torch.randn(B, L, V, generator=gen, dtype=torch.float64)
    teacher[0, 0, 0] = 10.0  # in the head
    teacher[1, 0, 0] = -1.0  # in the tail
    teacher = F.log_softmax(teacher, -1)
    records = head_records(teacher)
    counts = tail_counts(teacher, records["topk_ids"], draws, gen)
    counts[:, 1:3] = tail_counts(teacher[:, 1:3], records["topk_ids"][:, 1:3], 3, gen)
    counts[1, 0, 0] = counts[1, 0, 0].clamp_min(1)  # drawn, whatever the draw gave
    ids, sampled_counts = sampled_records(counts)
    batch = {"loss_mask": torch.ones(B, L, dtype=torch.bool), "input_ids": torch.randint(V, (B, L + 1), generator=gen),
             **records, "sampled_ids": ids, "sampled_counts": sampled_counts}
    logits = (3.0 * torch.randn(B, L, V, generator=gen)).requires_grad_(True)
    return logits, counts, batch


def test_hybrid_with_most_of_the_tail_drawn_matches_dense():
    """forward_kl 0.9 + ce 0.1 on hybrid targets of up to V - K tail ids per position (J = K + M near V), by the
    fused loss at several chunk sizes, against the dense references: the value and the gradient."""
    logits, counts, batch = many_draws_case(0, draws=400)
    drawn = (counts > 0).sum(-1)
    assert drawn.max() >= V - K - 3 and drawn.min() <= 3  # rows nearly full and rows mostly padding
    assert batch["topk_ids"][0, 0].eq(0).any() and batch["sampled_ids"][1, 0].eq(0).any()
    assert (batch["sampled_counts"] == 0).any()
    assert math.isfinite(float(batch["tail_logmass"].min()))  # every position has a tail, drawn
    ce = F.cross_entropy(logits.double().flatten(0, 1), batch["input_ids"][:, 1:].flatten())
    expected = 0.9 * hybrid_reference("forward_kl", logits, counts, batch) + 0.1 * ce
    (expected_grad,) = torch.autograd.grad(expected, logits)
    for size in (1, 5, 10_000):
        loss, metrics, grad = loss_and_grad(logits, batch, config({"forward_kl": 0.9, "ce": 0.1}, "hybrid",
                                                                  chunk_positions=size))
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(metrics["ce"].double(), ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-4, atol=1e-7)


def test_log_sum_exps_in_row_blocks_match_float64(monkeypatch):
    """The log-sum-exps over the vocabulary take their exponentials a block of rows at a time when a chunk's would be
    a large temporary: with blocks of 3 rows of a 10-row chunk (the last one short), the full and the outside log-sum-
    exp equal a float64 brute force, and the logits are left as they were."""
    monkeypatch.setattr(logit_reads, "TEMP_BYTES", 3 * 50 * 4)
    logits_CV = torch.randn(10, 50, generator=torch.Generator().manual_seed(0)) * 5
    logits_CV[4, 7] = 60.0  # a row whose maximum dominates
    kept_CV = logits_CV.clone()
    ids_CJ = torch.randint(0, 50, (10, 6), generator=torch.Generator().manual_seed(1))
    reads = logit_reads.LogitReads(logits_CV, track=False)
    exact_C = logits_CV.double().logsumexp(-1)
    torch.testing.assert_close(reads.lse()[:, 0].double(), exact_C, rtol=1e-6, atol=1e-6)
    outside_CV = logits_CV.double().scatter(-1, ids_CJ, -math.inf)
    torch.testing.assert_close(reads.outside_lse(ids_CJ)[:, 0].double(), outside_CV.logsumexp(-1), rtol=1e-6,
                               atol=1e-6)
    assert torch.equal(logits_CV, kept_CV)


def excluded_mask(ids_CJ: torch.Tensor, valid_CJ: torch.Tensor, vocab: int) -> torch.Tensor:
    """[C, V] bool: the ids a valid entry names, built entry by entry."""
    excluded_CV = torch.zeros(ids_CJ.shape[0], vocab, dtype=torch.bool)
    for c in range(ids_CJ.shape[0]):
        for j in range(ids_CJ.shape[1]):
            if valid_CJ[c, j]:
                excluded_CV[c, ids_CJ[c, j]] = True
    return excluded_CV


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reads_of_repeated_and_padding_ids_match_brute_force(dtype, temperature):
    """A read whose entries repeat ids, whose padding entries name excluded ids and ids left outside, and rows where
    it excludes every id or none, at T = 1 and others: the lse (through the outside pass, each excluded id counted
    once), outside_lse, gather, the gradient of a weighted sum of them (an outside term 0 exactly at the excluded ids)
    against float64 brute force and autograd; the logits are left as they were."""
    T = temperature
    gen = torch.Generator().manual_seed(3)
    rows, vocab, entries = 7, 12, 15
    logits_CV = (torch.randn(rows, vocab, generator=gen) * 4).to(dtype)
    logits_CV[2, 5] = 90.0  # the excluded head far above the rest: the outside stays exact relative to its own max
    ids_CJ = torch.randint(0, vocab, (rows, entries), generator=gen)
    valid_CJ = torch.rand(rows, entries, generator=gen) < 0.6
    ids_CJ[0] = torch.arange(entries) % vocab  # every id excluded: nothing outside
    valid_CJ[0] = True
    valid_CJ[1] = False  # no id excluded
    ids_CJ[2, :3] = 5  # the huge logit, named three times
    valid_CJ[2, :3] = torch.tensor([False, True, True])
    kept_CV = logits_CV.clone()

    probe = logit_reads.Probe(rows, logits_CV)
    probe.outside_lse(ids_CJ, T, valid_CJ)
    reads = logit_reads.LogitReads(logits_CV, track=True, outside=probe.outside)
    lse_C1 = reads.lse(T)
    gathered_CJ = reads.gather(ids_CJ, T)
    outside_C1 = reads.outside_lse(ids_CJ, T, valid_CJ)
    assert torch.equal(logits_CV, kept_CV)

    z_CV = logits_CV.double()
    excluded_CV = excluded_mask(ids_CJ, valid_CJ, vocab)
    lse_C, outside_C = (z_CV / T).logsumexp(-1), (z_CV / T).masked_fill(excluded_CV, -math.inf).logsumexp(-1)
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse_C1[:, 0].double(), lse_C, **tolerance)
    torch.testing.assert_close(outside_C1[1:, 0].double(), outside_C[1:], **tolerance)
    assert outside_C1[0, 0] < -1e30 and torch.isfinite(outside_C1[0, 0])  # nothing outside: huge negative, finite
    torch.testing.assert_close(gathered_CJ.double(), z_CV.gather(-1, ids_CJ) / T, **tolerance)

    weights_CJ = torch.rand(rows, entries, generator=gen, dtype=torch.float64)
    coef_C = torch.rand(rows, generator=gen, dtype=torch.float64)
    coef_C[0] = 0.0  # the empty outside's value carries no weight (as a target of 0 gives it)

    def objective(lse, gathered, outside):
        return (lse[:, 0] * 0.7).sum() + (gathered * weights_CJ).sum() + (outside[:, 0] * coef_C).sum()

    leaf_grads = torch.autograd.grad(objective(lse_C1.double(), gathered_CJ.double(), outside_C1.double()),
                                     [read.leaf for read in reads.reads])
    grad_CV = logits_CV.clone()
    logit_reads.logits_grad_(grad_CV, reads.reads, leaf_grads)

    z_CV = z_CV.requires_grad_(True)
    y_CV = z_CV / T
    expected = objective(y_CV.logsumexp(-1, keepdim=True), y_CV.gather(-1, ids_CJ),
                         y_CV.masked_fill(excluded_CV, torch.finfo(torch.float64).min).logsumexp(-1, keepdim=True))
    (expected_CV,) = torch.autograd.grad(expected, z_CV)
    torch.testing.assert_close(grad_CV.double(), expected_CV, **tolerance)
