"""The cross-tokenizer targets (`mapped`, `sorted`, `chunks`) against brute-force computations written here.

A tiny float64 student (hidden states and an nn.Linear head) and records built by hand the way the cross-tokenizer
batch transform gives them. The references loop over positions and text chunks explicitly, build the teacher's and
the student's buckets as probabilities from dense float64 distributions, and compute each divergence from its
textbook formula (`test_losses.divergence`); gradients are autograd's of the reference.

Legend: B batch, L student positions per row, H hidden size, U teacher vocabulary, V student vocabulary, K top-k,
A text chunks per row.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from test_losses import BETA, SKEW, config, divergence
from torch import nn

from student_train.cross_losses import CHUNK_IDS, CHUNK_LOGPROB, KD_MASK
from student_train.divergences import CROSS_TARGETS, TARGETS_FROM
from student_train.loss_config import LOSS_IMPLS, LossConfig
from student_train.losses import DIVERGENCES, distillation_loss

B, L, H, U, V, K = 2, 9, 8, 40, 30, 6
assert (BETA, SKEW) == (0.3, 0.2)  # the parameters `config` gives the losses and `divergence` the references


def student(seed: int, vocab: int = V):
    """Hidden states [B, L, H] and a head H -> vocab, float64."""
    torch.manual_seed(seed)
    head = nn.Linear(H, vocab).double()
    hidden = torch.randn(B, L, H, dtype=torch.float64, requires_grad=True)
    return hidden, head


def masks(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """loss_mask and kd_mask (a subset of it), [B, L], each with positions in and out."""
    loss = torch.rand(B, L, generator=gen) < 0.8
    loss[0, 0], loss[1, -1] = False, True
    kd = loss & (torch.rand(B, L, generator=gen) < 0.7)
    kd[1, -1], kd[0, 1], loss[0, 1] = False, True, True
    return loss, kd


def grads(loss, hidden, head):
    return torch.autograd.grad(loss, [hidden, *head.parameters()])


def assert_grads_close(actual, expected, **tolerance):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, **tolerance)


def top_k(teacher_XU: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dense teacher's stored top-k (ids ascending), their log-probs and the log tail mass, float64."""
    ids = teacher_XU.topk(K, -1).indices.sort(-1).values
    return ids, teacher_XU.gather(-1, ids), teacher_XU.scatter(-1, ids, -math.inf).logsumexp(-1)


def with_filler(kd: torch.Tensor, ids, logprobs, tail) -> dict[str, torch.Tensor]:
    """The records outside kd_mask replaced by the transform's filler: ids -1, log-probs -inf, tail 0."""
    return {"topk_ids": ids.masked_fill(~kd[..., None], -1),
            "topk_logprobs": logprobs.masked_fill(~kd[..., None], -math.inf),
            "tail_logmass": tail.masked_fill(~kd, 0.0), KD_MASK: kd}


def mapped_case(seed: int):
    """A dense teacher over U ids, a partial injective map of teacher ids to student ids, and the mapped batch."""
    gen = torch.Generator().manual_seed(seed)
    teacher = F.log_softmax(2.0 * torch.randn(B, L, U, generator=gen, dtype=torch.float64), -1)
    to_student = torch.full((U,), -1)
    mapped_teacher_ids = torch.randperm(U, generator=gen)[:22]
    to_student[mapped_teacher_ids] = torch.randperm(V, generator=gen)[:22]
    loss_mask, kd = masks(gen)
    ids, logprobs, tail = top_k(teacher)
    batch = {"loss_mask": loss_mask, "input_ids": torch.randint(V, (B, L + 1), generator=gen)}
    batch |= with_filler(kd, to_student[ids], logprobs, tail)
    mapped_ids = batch["topk_ids"][kd]
    assert (mapped_ids >= 0).any() and (mapped_ids < 0).any()  # both kinds of entries
    return teacher, ids, to_student, batch


def mapped_reference(logits, teacher, teacher_ids, to_student, batch, weights, temperature):
    """The loss with mapped targets, by explicit loops: at each kd position the teacher's buckets over the student's
    ids its top-k strings map to, plus one bucket holding the rest of its mass."""
    kd = batch[KD_MASK]
    sums = {name: logits.new_zeros(()) for name in weights if name != "ce"}
    for b in range(B):
        for j in range(L):
            if not kd[b, j]:
                if batch["loss_mask"][b, j]:  # no teacher distribution: the true token's CE in each term, / T^2
                    ce = -F.log_softmax(logits[b, j], -1)[batch["input_ids"][b, j + 1]]
                    sums = {name: value + ce / temperature**2 for name, value in sums.items()}
                continue
            pairs = [(int(t), int(to_student[t])) for t in teacher_ids[b, j] if to_student[t] >= 0]
            p = torch.stack([teacher[b, j, t].exp() for t, _ in pairs])
            p = torch.cat([p, 1 - p.sum(-1, keepdim=True)]) ** (1 / temperature)
            p = p / p.sum()
            q_V = F.softmax(logits[b, j] / temperature, -1)
            q = torch.stack([q_V[s] for _, s in pairs])
            q = torch.cat([q, 1 - q.sum(-1, keepdim=True)])
            for name in sums:
                sums[name] = sums[name] + divergence(name, p, q)
    return combine(logits, batch, sums, weights, temperature**2)


def ce_outside_kd(logits, batch, temperature: float = 1.0):
    """What each divergence term sums at the trained positions outside kd_mask: their true tokens' CE, / T^2."""
    outside = batch["loss_mask"] & ~batch[KD_MASK]
    return F.cross_entropy(logits[outside], batch["input_ids"][:, 1:][outside], reduction="sum") / temperature**2


def combine(logits, batch, sums, weights, factor):
    """(loss, per-divergence means): each sum over P trained positions, times factor; plus weighted CE."""
    mask = batch["loss_mask"]
    positions = int(mask.sum())
    means = {name: value / positions for name, value in sums.items()}
    ce = F.cross_entropy(logits[mask], batch["input_ids"][:, 1:][mask])
    loss = factor * sum(weights[name] * value for name, value in means.items()) + weights.get("ce", 0.0) * ce
    return loss, means


@pytest.mark.parametrize("impl", LOSS_IMPLS)
@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_mapped_with_every_entry_mapped_is_topk_tail(name, impl):
    """The loss equals the same-tokenizer loss when the tokenizers are the same."""
    gen = torch.Generator().manual_seed(1)
    hidden, head = student(1)
    teacher = F.log_softmax(2.0 * torch.randn(B, L, V, generator=gen, dtype=torch.float64), -1)
    ids, logprobs, tail = top_k(teacher)
    loss_mask, _ = masks(gen)
    batch = {"loss_mask": loss_mask, "input_ids": torch.randint(V, (B, L + 1), generator=gen), "topk_ids": ids,
             "topk_logprobs": logprobs.float(), "tail_logmass": tail.float()}
    weights = {name: 0.7, "ce": 0.4}
    loss, metrics = distillation_loss(hidden, head, batch | {KD_MASK: loss_mask},
                                      config(weights, "mapped", temperature=1.7, chunk_positions=4, impl=impl))
    same, same_metrics = distillation_loss(hidden, head, batch, config(weights, "topk_tail", temperature=1.7))

    torch.testing.assert_close(loss, same, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(metrics, same_metrics, rtol=1e-12, atol=1e-14)
    assert float(metrics[name]) > 1e-3
    assert_grads_close(grads(loss, hidden, head), grads(same, hidden, head), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
@pytest.mark.parametrize("name,temperature", [(d, t) for d in DIVERGENCES for t in (1.0, 1.7)])
def test_mapped_matches_brute_force(name, temperature, impl):
    teacher, teacher_ids, to_student, batch = mapped_case(2)
    hidden, head = student(2)
    weights = {name: 0.7, "ce": 0.4}
    loss, metrics = distillation_loss(hidden, head, batch,
                                      config(weights, "mapped", temperature=temperature, chunk_positions=5,
                                             impl=impl))
    expected, means = mapped_reference(head(hidden), teacher, teacher_ids, to_student, batch, weights, temperature)

    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics[name], means[name], rtol=1e-10, atol=1e-12)
    assert int(metrics["tokens"]) == int(batch["loss_mask"].sum()) and float(metrics[name]) > 1e-3
    assert_grads_close(grads(loss, hidden, head), grads(expected, hidden, head), rtol=1e-8, atol=1e-11)


def sorted_case(seed: int, teacher_vocab: int, concentrated: bool):
    """A dense teacher and its top-k batch; `concentrated`: the teacher's mass is all on K ids (its tail is 0)."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(B, L, teacher_vocab, generator=gen, dtype=torch.float64)
    if concentrated:
        kept = torch.rand(B, L, teacher_vocab, generator=gen).argsort(-1)[..., :K]
        logits = torch.full_like(logits, -math.inf).scatter(-1, kept, logits.gather(-1, kept))
    teacher = F.log_softmax(logits, -1)
    ids, logprobs, tail = top_k(teacher)
    loss_mask, kd = masks(gen)
    batch = {"loss_mask": loss_mask, "input_ids": torch.randint(V, (B, L + 1), generator=gen)}
    return teacher, batch | with_filler(kd, ids, logprobs, tail)


@pytest.mark.parametrize("teacher_vocab", [U, 20])
def test_sorted_tv_is_half_the_full_sorted_l1_when_the_top_k_holds_all_mass(teacher_vocab):
    """ULD: half the L1 between both full distributions sorted decreasing, the shorter padded with zeros."""
    teacher, batch = sorted_case(3, teacher_vocab, concentrated=True)
    hidden, head = student(3)
    loss, metrics = distillation_loss(hidden, head, batch, config({"tv": 1.0}, "sorted", chunk_positions=4))

    logits = head(hidden)
    width = max(teacher_vocab, V)
    total = logits.new_zeros(())
    for b, j in batch[KD_MASK].nonzero().tolist():
        p = F.pad(teacher[b, j].exp().sort(descending=True).values, (0, width - teacher_vocab))
        q = F.pad(F.softmax(logits[b, j], -1).sort(descending=True).values, (0, width - V))
        total = total + (p - q).abs().sum() / 2
    expected = (total + ce_outside_kd(logits, batch)) / int(batch["loss_mask"].sum())
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics["tv"], expected.detach(), rtol=1e-10, atol=1e-12)
    assert_grads_close(grads(loss, hidden, head), grads(expected, hidden, head), rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_sorted_matches_its_sparse_form(name):
    """In general: the teacher's top-k and tail tempered as buckets, its top-k sorted decreasing; the student's K
    largest tempered probabilities sorted decreasing and its remaining mass."""
    temperature = 1.5
    teacher, batch = sorted_case(4, U, concentrated=False)
    hidden, head = student(4)
    weights = {name: 0.6, "ce": 0.5}
    loss, metrics = distillation_loss(hidden, head, batch,
                                      config(weights, "sorted", temperature=temperature, chunk_positions=3))

    logits = head(hidden)
    total = logits.new_zeros(())
    for b, j in batch[KD_MASK].nonzero().tolist():
        top = teacher[b, j].exp().sort(descending=True).values[:K]
        p = torch.cat([top, 1 - top.sum(-1, keepdim=True)]) ** (1 / temperature)
        p = p / p.sum()
        q_top = F.softmax(logits[b, j] / temperature, -1).sort(descending=True).values[:K]
        total = total + divergence(name, p, torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)]))
    total = total + ce_outside_kd(logits, batch, temperature)
    expected, means = combine(logits, batch, {name: total}, weights, temperature**2)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics[name], means[name].detach(), rtol=1e-10, atol=1e-12)
    assert float(metrics[name]) > 1e-3
    assert_grads_close(grads(loss, hidden, head), grads(expected, hidden, head), rtol=1e-8, atol=1e-11)


# Two rows of text chunks. Row 0: position 0 untrained, chunks of 2, 1, 3 and 1 student tokens, one trained
# position in no usable chunk; chunk 1 has probability 1 for the teacher (clamped); the last entry is padding. Row
# 1: chunk 3 is not usable (NaN) and no position points at it.
CHUNK_IDS_BL = torch.tensor([[-1, 0, 0, 1, 2, 2, 2, -1, 3], [0, 1, 1, -1, 2, 2, -1, -1, -1]])
LOSS_MASK_BL = torch.tensor([[False, True, True, True, True, True, True, True, True],
                             [True, True, True, True, True, True, False, False, False]])
CHUNK_LOGPROB_BA = torch.tensor([[-3.2, 0.0, -7.5, -1.1, math.nan], [-0.4, -5.0, -2.0, math.nan, math.nan]])


def chunks_batch(seed: int, chunk_ids=CHUNK_IDS_BL, chunk_logprob=CHUNK_LOGPROB_BA, loss_mask=LOSS_MASK_BL):
    gen = torch.Generator().manual_seed(seed)
    return {"loss_mask": loss_mask, "input_ids": torch.randint(V, (B, L + 1), generator=gen),
            CHUNK_IDS: chunk_ids, CHUNK_LOGPROB: chunk_logprob}


def binary(loglik: torch.Tensor, tau: float) -> torch.Tensor:
    """[P(chunk), 1 - P(chunk)] with P(chunk) = exp(min(loglik / tau, -1e-6)), as probabilities."""
    chance = torch.minimum(loglik / tau, loglik.new_tensor(-1e-6)).exp()
    return torch.stack([chance, 1 - chance])


def chunks_reference(logits, batch, weights, tau):
    """The loss with chunks targets: each usable chunk's log-likelihoods summed by explicit loops over its
    positions, tau * the binary divergence."""
    logq = F.log_softmax(logits, -1)
    true = batch["input_ids"][:, 1:]
    sums = {name: logits.new_zeros(()) for name in weights if name != "ce"}
    for b in range(B):
        for c, teacher in enumerate(batch[CHUNK_LOGPROB][b].double()):
            if teacher.isnan():
                continue
            student = sum(logq[b, j, true[b, j]] for j in range(L) if batch[CHUNK_IDS][b, j] == c)
            for name in sums:
                sums[name] = sums[name] + tau * divergence(name, binary(teacher, tau), binary(student, tau))
    return combine(logits, batch, sums, weights, 1.0)


@pytest.mark.parametrize("name,tau", [(d, t) for d in DIVERGENCES for t in (100.0, 2.5)])
def test_chunks_match_brute_force(name, tau):
    hidden, head = student(5)
    batch = chunks_batch(5)
    weights = {name: 0.8, "ce": 0.3}
    loss, metrics = distillation_loss(hidden, head, batch,
                                      config(weights, "chunks", chunk_temperature=tau, chunk_positions=4))
    expected, means = chunks_reference(head(hidden), batch, weights, tau)

    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics[name], means[name].detach(), rtol=1e-10, atol=1e-12)
    assert float(metrics[name]) > 1e-3
    assert_grads_close(grads(loss, hidden, head), grads(expected, hidden, head), rtol=1e-8, atol=1e-11)


def one_token_chunks(seed: int):
    """Every trained position its own chunk (the same tokenizer), its log-likelihood a teacher's true-token log-prob."""
    gen = torch.Generator().manual_seed(seed)
    loss_mask, _ = masks(gen)
    teacher = F.log_softmax(torch.randn(B, L, V, generator=gen, dtype=torch.float64), -1)
    batch = chunks_batch(seed, torch.where(loss_mask, torch.arange(L), -1), None, loss_mask)
    true_logprob = teacher.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1).float()
    batch[CHUNK_LOGPROB] = torch.where(loss_mask, true_logprob, math.nan)
    return batch


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_one_token_chunks_are_the_per_token_binary_divergence(name):
    hidden, head = student(6)
    batch = one_token_chunks(6)
    tau = 4.0
    loss, metrics = distillation_loss(hidden, head, batch, config({name: 1.0}, "chunks", chunk_temperature=tau))

    mask = batch["loss_mask"]
    logq = F.log_softmax(head(hidden), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)[mask]
    p, q = binary(batch[CHUNK_LOGPROB][mask].double(), tau), binary(logq, tau)
    expected = tau * divergence(name, p.T, q.T).sum() / int(mask.sum())
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics[name], expected.detach(), rtol=1e-10, atol=1e-12)
    assert_grads_close(grads(loss, hidden, head), grads(expected, hidden, head), rtol=1e-8, atol=1e-11)


def test_chunks_forward_kl_tends_to_its_large_tau_limit():
    """tau * binary KL -> (LL_t - LL_s) - LL_t log(LL_t / LL_s) as tau grows: a scale independent of tau."""
    hidden, head = student(7)
    batch = one_token_chunks(7)
    _, metrics = distillation_loss(hidden, head, batch, config({"forward_kl": 1.0}, "chunks", chunk_temperature=1e5))

    mask = batch["loss_mask"]
    student_ll = F.log_softmax(head(hidden), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)[mask]
    teacher_ll = batch[CHUNK_LOGPROB][mask].double()
    limit = ((teacher_ll - student_ll) - teacher_ll * (teacher_ll / student_ll).log()).sum() / int(mask.sum())
    torch.testing.assert_close(metrics["forward_kl"], limit.detach(), rtol=1e-3, atol=0.0)


def kd_only(targets: str) -> LossConfig:
    temperature = 1.0 if targets == "chunks" else 2.0
    return config(dict.fromkeys(DIVERGENCES, 1.0), targets, temperature=temperature, chunk_positions=4)


def assert_zero_where(gradient_BLH: torch.Tensor, silent_BL: torch.Tensor) -> None:
    assert gradient_BLH.isfinite().all()
    assert torch.equal(gradient_BLH[silent_BL], torch.zeros_like(gradient_BLH[silent_BL]))
    assert gradient_BLH[~silent_BL].abs().sum() > 0


@pytest.mark.parametrize(("targets", "impl"), [("mapped", "fused"), ("mapped", "checkpoint"), ("sorted", "fused")])
def test_positions_outside_kd_mask_count_their_true_tokens_ce(targets, impl):
    """With every divergence in the mix: a trained position outside kd_mask (holding the filler) adds its true
    token's CE to each divergence term, value and gradient exactly, with no NaN; an untrained one adds nothing."""
    _, _, _, batch = mapped_case(8)
    hidden, head = student(8)
    loss, _ = distillation_loss(hidden, head, batch, dataclasses.replace(kd_only(targets), impl=impl))
    assert loss.isfinite() and loss.item() > 0
    gradient = grads(loss, hidden, head)[0]
    outside = batch["loss_mask"] & ~batch[KD_MASK]
    reference = len(DIVERGENCES) * ce_outside_kd(head(hidden), batch) / int(batch["loss_mask"].sum())
    torch.testing.assert_close(gradient[outside], grads(reference, hidden, head)[0][outside], rtol=1e-10, atol=1e-13)
    assert torch.equal(gradient[~batch["loss_mask"]], torch.zeros_like(gradient[~batch["loss_mask"]]))

    none = batch | with_filler(torch.zeros_like(batch[KD_MASK]), batch["topk_ids"], batch["topk_logprobs"],
                               batch["tail_logmass"])
    loss, metrics = distillation_loss(hidden, head, none, dataclasses.replace(kd_only(targets), impl=impl))
    # Each term holds CE / T^2, which the loss's T^2 undoes.
    temperature = dataclasses.replace(kd_only(targets), impl=impl).temperature
    ce = (ce_outside_kd(head(hidden), none) / int(none["loss_mask"].sum())).detach()
    torch.testing.assert_close(loss.detach(), len(DIVERGENCES) * ce, rtol=1e-12, atol=1e-14)
    assert all(float(metrics[name]) == pytest.approx(float(ce) / temperature**2, rel=1e-12) for name in DIVERGENCES)


def test_chunks_outside_usable_ones_add_exactly_zero():
    """Positions with chunk_ids -1, and positions pointing at a chunk whose chunk_logprob is NaN, have a gradient of
    exactly 0 and change nothing; a batch without usable chunks has a loss of exactly 0, with no NaN."""
    hidden, head = student(9)
    batch = chunks_batch(9)
    loss, metrics = distillation_loss(hidden, head, batch, kd_only("chunks"))
    assert_zero_where(grads(loss, hidden, head)[0], LOSS_MASK_BL & (CHUNK_IDS_BL < 0))

    # Row 0's chunk 2 made not usable, its positions still pointing at it.
    spoiled = CHUNK_LOGPROB_BA.clone()
    spoiled[0, 2] = math.nan
    dropped, _ = distillation_loss(hidden, head, chunks_batch(9, chunk_logprob=spoiled), kd_only("chunks"))
    cut_ids = CHUNK_IDS_BL.clone()
    cut_ids[0][cut_ids[0] == 2] = -1
    cut, _ = distillation_loss(hidden, head, chunks_batch(9, cut_ids, spoiled), kd_only("chunks"))
    assert torch.equal(dropped, cut) and dropped.item() < loss.item()
    assert_zero_where(grads(dropped, hidden, head)[0], LOSS_MASK_BL & (cut_ids < 0))

    unusable = torch.full_like(CHUNK_LOGPROB_BA, math.nan)
    loss, metrics = distillation_loss(hidden, head, chunks_batch(9, chunk_logprob=unusable), kd_only("chunks"))
    assert loss.item() == 0.0 and all(float(metrics[name]) == 0.0 for name in DIVERGENCES)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads(loss, hidden, head))


@pytest.mark.parametrize("targets", CROSS_TARGETS)
def test_chunk_positions_change_nothing(targets):
    hidden, head = student(10)
    batch = chunks_batch(10) if targets == "chunks" else mapped_case(10)[3]
    temperature = 1.0 if targets == "chunks" else 1.3
    weights = {"jsd": 0.5, "tv": 0.4, "ce": 0.3}
    base_loss, base_metrics = distillation_loss(
        hidden, head, batch, config(weights, targets, temperature=temperature, chunk_positions=1000))
    base_grads = grads(base_loss, hidden, head)
    for size in (1, 3):
        loss, metrics = distillation_loss(hidden, head, batch,
                                          config(weights, targets, temperature=temperature, chunk_positions=size))
        torch.testing.assert_close(loss, base_loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(metrics, base_metrics, rtol=1e-12, atol=1e-14)
        assert_grads_close(grads(loss, hidden, head), base_grads, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("targets", CROSS_TARGETS)
def test_no_trained_position_gives_zero_with_a_graph(targets):
    hidden, head = student(11)
    batch = chunks_batch(11) if targets == "chunks" else mapped_case(11)[3]
    batch = batch | {"loss_mask": torch.zeros(B, L, dtype=torch.bool), KD_MASK: torch.zeros(B, L, dtype=torch.bool),
                     CHUNK_IDS: torch.full((B, L), -1), CHUNK_LOGPROB: torch.full((B, 5), math.nan)}
    loss, metrics = distillation_loss(hidden, head, batch, config({"forward_kl": 1.0, "ce": 1.0}, targets))
    assert loss.item() == 0.0 and int(metrics["tokens"]) == 0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads(loss, hidden, head))


def test_cross_targets_are_offered_to_targets_from():
    assert set(CROSS_TARGETS) == {"chunks", "mapped", "sorted"} and set(CROSS_TARGETS) <= set(TARGETS_FROM)
    assert LossConfig().chunk_temperature == 100.0


@pytest.mark.parametrize("options,match", [
    ({"targets": "chunks", "temperature": 2.0}, "--chunk-temperature"),
    ({"targets": "chunks", "chunk_temperature": 0.0}, "chunk_temperature: expected a finite temperature > 0"),
    ({"targets": "mapped", "chunk_temperature": -1.0}, "chunk_temperature"),
    ({"targets": "sorted", "chunk_temperature": math.inf}, "chunk_temperature"),
    ({"targets": "mapped", "weights": {"jsd": 1.0, "rollout_rkl": 0.5}}, "rollout_rkl cannot be used with mapped"),
    ({"targets": "sorted", "weights": {"rollout_rkl": 1.0}}, "samples tokens the teacher never scored"),
    ({"targets": "chunks", "weights": {"rollout_rkl": 1.0, "ce": 1.0}}, "rollout_rkl cannot be used with chunks"),
])
def test_loss_config_errors(options, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**options)


@pytest.mark.parametrize("targets,missing", [("mapped", KD_MASK), ("sorted", "tail_logmass"),
                                             ("chunks", CHUNK_LOGPROB)])
def test_a_missing_record_is_named(targets, missing):
    hidden, head = student(12)
    batch = chunks_batch(12) | mapped_case(12)[3]
    del batch[missing]
    with pytest.raises(ValueError, match=f"{targets} targets need the batch records .*{missing} are missing"):
        distillation_loss(hidden, head, batch, config({"tv": 1.0}, targets))
