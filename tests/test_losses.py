"""Distillation losses against dense brute-force computations written here in plain torch.

Each case draws a random full teacher distribution per position and derives the store's records from it the way the
store does (torch.topk, ids sorted ascending, tail mass; torch.multinomial draws as distinct ids + counts). The
reference builds the student's full [B, L, V] softmax in float64 and the teacher's distribution over the same buckets
from the dense teacher (tail = 1 - sum of the top-k, not the stored tail; the empirical draws over the whole
vocabulary), computes each divergence from its textbook formula with `xlogy`, and compares values and gradients.

Legend: B batch, L positions per row, H hidden size, V vocabulary, K top-k, N draws, S draw sets.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from torch.special import xlogy

from student_train.cli import main
from student_train.collate import TAIL_BUCKET
from student_train.config import TrainConfig
from student_train.loss_config import LossConfig, kd_scale
from student_train.losses import DIVERGENCES, distillation_loss

B, L, H, V, K, N = 2, 7, 16, 97, 6, 20
BETA, SKEW = 0.3, 0.2
# The representations of make_case's records; hybrid (draws of the tail) and topk_residual are tested in
# tests/test_hybrid_losses.py.
CASE_REPRESENTATIONS = ("topk_tail", "topk_renorm", "sampled")
# Every (divergence, representation) pair the losses allow: reverse KL is infinite against sampled targets.
PAIRS = [(d, r) for r in CASE_REPRESENTATIONS for d in DIVERGENCES if (d, r) != ("reverse_kl", "sampled")]
SAMPLED_DIVERGENCES = [d for d in DIVERGENCES if d != "reverse_kl"]


def sampled_records(counts_XV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense counts [..., V] -> distinct ids ascending + counts [..., M], padded with id 0 and count 0 at the end."""
    vocab = counts_XV.shape[-1]
    present = counts_XV > 0
    ids = torch.arange(vocab).expand_as(counts_XV)
    order = torch.where(present, ids, ids + vocab).argsort(-1)[..., : int(present.sum(-1).max())]
    counts = counts_XV.gather(-1, order)
    return torch.where(counts > 0, order, 0), counts.float()


def draw_counts(p_XV: torch.Tensor, draws: int, generator: torch.Generator) -> torch.Tensor:
    """Counts of `draws` draws with replacement from each row of p, [..., V]."""
    flat = p_XV.reshape(-1, p_XV.shape[-1])
    samples = torch.multinomial(flat, draws, replacement=True, generator=generator)
    counts = torch.zeros(flat.shape, dtype=torch.long).scatter_add_(1, samples, torch.ones_like(samples))
    return counts.view(p_XV.shape)


def make_case(seed: int, *, vocab: int = V, k: int = K, bias: bool = True, length: int = L):
    """Student (hidden, head), dense teacher log-probs [B, L, V] float64, and the batch the loader would give."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Linear(H, vocab, bias=bias)
    hidden = torch.randn(B, length, H, generator=gen, requires_grad=True)
    teacher = F.log_softmax(2.5 * torch.randn(B, length, vocab, generator=gen, dtype=torch.float64), -1)
    top_ids = teacher.topk(k, -1).indices.sort(-1).values
    tail = teacher.scatter(-1, top_ids, -math.inf).logsumexp(-1)
    sampled_ids, sampled_counts = sampled_records(draw_counts(teacher.exp(), N, gen))
    mask = torch.rand(B, length, generator=gen) < 0.7
    mask[0, 0], mask[1, -1] = True, False
    batch = {
        "loss_mask": mask,
        "input_ids": torch.randint(vocab, (B, length + 1), generator=gen),
        "topk_ids": top_ids,
        "topk_logprobs": teacher.gather(-1, top_ids).float(),
        "tail_logmass": tail.float(),
        "sampled_ids": sampled_ids,
        "sampled_counts": sampled_counts,
    }
    return hidden, head, teacher, batch


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (xlogy(p, p) - xlogy(p, q)).sum(-1)


def divergence(name: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """D(p, q) over the last axis, from probabilities, with the test's jsd beta and skew alpha."""
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        m = BETA * p + (1 - BETA) * q
        return BETA * kl(p, m) + (1 - BETA) * kl(q, m)
    if name == "tv":
        return (p - q).abs().sum(-1) / 2
    if name == "skew_kl":
        return kl(p, SKEW * p + (1 - SKEW) * q)
    assert name == "skew_rkl"
    return kl(q, SKEW * q + (1 - SKEW) * p)


def buckets(p_V: torch.Tensor, ids_K: torch.Tensor) -> torch.Tensor:
    """Probabilities of the K ids and of the ghost bucket (1 - their sum), [..., K + 1]."""
    p_K = p_V.gather(-1, ids_K)
    return torch.cat([p_K, 1 - p_K.sum(-1, keepdim=True)], -1)


def normalise(p: torch.Tensor) -> torch.Tensor:
    return p / p.sum(-1, keepdim=True)


def distributions(representation: str, logits: torch.Tensor, teacher: torch.Tensor, batch: dict, temperature: float):
    """(teacher, student) probabilities over the representation's support, densely in float64."""
    ids = batch["topk_ids"]
    if representation == "topk_tail":
        q = buckets(F.softmax(logits / temperature, -1), ids)
        return normalise(buckets(teacher.exp(), ids) ** (1 / temperature)), q
    if representation == "topk_renorm":
        p = teacher.exp().gather(-1, ids) ** (1 / temperature)
        return normalise(p), normalise(F.softmax(logits / temperature, -1).gather(-1, ids))
    assert representation == "sampled" and temperature == 1.0
    counts = torch.zeros_like(logits).scatter_(-1, batch["sampled_ids"], batch["sampled_counts"].double())
    return normalise(counts), F.softmax(logits, -1)


def reference(logits, teacher, batch, weights: dict, representation: str, temperature: float, scale: float = 1.0):
    """Dense loss and per-divergence means from the student's full logits [B, L, V], in float64."""
    logits = logits.double()
    mask = batch["loss_mask"]
    p, q = distributions(representation, logits, teacher, batch, temperature)
    means = {name: divergence(name, p, q)[mask].mean() for name in weights if name != "ce"}
    ce = F.cross_entropy(logits[mask], batch["input_ids"][:, 1:][mask])
    loss = scale * temperature**2 * sum(weights[name] * value for name, value in means.items())
    return loss + weights.get("ce", 0.0) * ce, means, ce


def config(weights: dict, targets: str, **options) -> LossConfig:
    return LossConfig(weights=weights, targets=targets, jsd_beta=BETA, skew_alpha=SKEW, **options)


def grads(loss, hidden, head):
    return torch.autograd.grad(loss, [hidden, *head.parameters()])


def assert_grads_close(actual, expected, **tolerance):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.double(), e.double(), **tolerance)


# Sampled targets are draws at T = 1: other temperatures are refused (test_config_errors).
@pytest.mark.parametrize("name,representation,temperature",
                         [(d, r, t) for d, r in PAIRS for t in ((1.0,) if r == "sampled" else (1.0, 2.0, 0.5))])
def test_each_divergence_matches_dense_reference(name, representation, temperature):
    hidden, head, teacher, batch = make_case(1, bias=representation != "sampled")
    weights = {name: 0.7, "ce": 0.4}
    loss, metrics = distillation_loss(hidden, head, batch, config(weights, representation, temperature=temperature,
                                                                  chunk_positions=4))
    ref_loss, ref_means, ref_ce = reference(head(hidden), teacher, batch, weights, representation, temperature)

    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics[name].double(), ref_means[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["kd"].double(), ref_means[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["ce"].double(), ref_ce, rtol=1e-5, atol=1e-6)
    assert int(metrics["tokens"]) == int(batch["loss_mask"].sum())
    assert ref_means[name] > 1e-3  # a divergence that is not trivially zero
    assert_grads_close(grads(loss, hidden, head), grads(ref_loss, hidden, head), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name,representation", PAIRS)
def test_chunk_size_changes_nothing(name, representation):
    hidden, head, _, batch = make_case(3, length=11)
    temperature = 1.0 if representation == "sampled" else 1.5
    weights = {name: 1.0, "ce": 0.5}
    base_loss, base_metrics = distillation_loss(
        hidden, head, batch, config(weights, representation, temperature=temperature, chunk_positions=10_000))
    base_grads = grads(base_loss, hidden, head)
    for size in (1, 3):
        chunked = config(weights, representation, temperature=temperature, chunk_positions=size)
        loss, metrics = distillation_loss(hidden, head, batch, chunked)
        torch.testing.assert_close(loss, base_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(metrics, base_metrics, rtol=1e-6, atol=1e-6)
        assert_grads_close(grads(loss, hidden, head), base_grads, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("representation", CASE_REPRESENTATIONS)
def test_mixture_is_the_weighted_sum_of_its_terms(representation):
    """A mix of every allowed divergence and CE equals the weighted sum of single-term losses; "kd" is their mean."""
    hidden, head, _, batch = make_case(12)
    temperature = 1.0 if representation == "sampled" else 2.0
    names = [d for d, r in PAIRS if r == representation]
    weights = {name: 0.1 * (i + 1) for i, name in enumerate(names)} | {"ce": 0.25}
    mixed, metrics = distillation_loss(hidden, head, batch, config(weights, representation, temperature=temperature))

    singles = {name: distillation_loss(hidden, head, batch, config({name: 1.0}, representation,
                                                                   temperature=temperature))[0] for name in weights}
    expected = sum(weights[name] * singles[name] for name in weights)  # T^2 is inside each single KD loss
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)
    kd_weight = sum(weights[name] for name in names)
    expected_kd = sum(weights[name] * singles[name] for name in names) / temperature**2 / kd_weight
    torch.testing.assert_close(metrics["kd"], expected_kd, rtol=1e-5, atol=1e-6)
    for name in names:
        torch.testing.assert_close(metrics[name], singles[name].detach() / temperature**2, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(mixed, hidden, head), grads(expected, hidden, head), rtol=1e-4, atol=1e-7)


def test_kd_schedule_values():
    assert [kd_scale("constant", step) for step in (0, 7, 10**6)] == [1.0, 1.0, 1.0]
    assert [kd_scale("linear_warmup:4", step) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = [kd_scale("cosine_decay:4", step) for step in range(6)]
    expected = [1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2, 0.0, 0.0]
    assert cosine == pytest.approx(expected, abs=1e-12)
    for bad in ("linear", "linear_warmup", "linear_warmup:0", "linear_warmup:-3", "cosine_decay:x", "constant:5"):
        with pytest.raises(ValueError, match="linear_warmup:STEPS"):
            kd_scale(bad, 0)


def test_schedule_scales_the_divergences_only():
    hidden, head, teacher, batch = make_case(13)
    weights = {"jsd": 0.6, "ce": 0.4}
    scheduled = config(weights, "topk_tail", temperature=2.0, kd_schedule="linear_warmup:4")
    for step, scale in [(0, 0.25), (2, 0.75), (9, 1.0)]:
        loss, metrics = distillation_loss(hidden, head, batch, scheduled, step=step)
        expected, means, _ = reference(head(hidden), teacher, batch, weights, "topk_tail", 2.0, scale=scale)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(metrics["kd"].double(), means["jsd"], rtol=1e-5, atol=1e-6)  # unscheduled
        assert float(metrics["kd_scale"]) == scale


def test_plain_ce_needs_no_targets():
    hidden, head, _, batch = make_case(2)
    batch = {key: batch[key] for key in ("loss_mask", "input_ids")}
    loss, metrics = distillation_loss(hidden, head, batch, LossConfig(weights={"ce": 1.0, "jsd": 0.0},
                                                                      temperature=3.0))
    mask = batch["loss_mask"]
    expected = F.cross_entropy(head(hidden)[mask], batch["input_ids"][:, 1:][mask])
    torch.testing.assert_close(loss, expected)
    assert float(metrics["kd"]) == 0.0 and "jsd" not in metrics


@pytest.mark.parametrize("representation", CASE_REPRESENTATIONS)
def test_masked_positions_change_nothing(representation):
    hidden, head, _, batch = make_case(4)
    weights = {d: 1.0 for d, r in PAIRS if r == representation} | {"ce": 0.5}
    loss_config = config(weights, representation, chunk_positions=3)
    loss, _ = distillation_loss(hidden, head, batch, loss_config)
    expected = grads(loss, hidden, head)

    # Garbage at the masked positions: NaN states and targets, out-of-vocabulary ids.
    masked = ~batch["loss_mask"]
    spoiled = dict(batch)
    for key in ("topk_logprobs", "tail_logmass", "sampled_counts"):
        spoiled[key] = batch[key].clone()
        spoiled[key][masked] = math.nan
    for key in ("topk_ids", "sampled_ids"):
        spoiled[key] = batch[key].clone()
        spoiled[key][masked] = V + 5
    spoiled["input_ids"] = batch["input_ids"].clone()
    spoiled["input_ids"][:, 1:][masked] = V + 5
    spoiled_hidden = hidden.detach().clone()
    spoiled_hidden[masked] = math.nan
    spoiled_hidden.requires_grad_(True)
    spoiled_loss, _ = distillation_loss(spoiled_hidden, head, spoiled, loss_config)
    actual = grads(spoiled_loss, spoiled_hidden, head)

    torch.testing.assert_close(spoiled_loss, loss)
    assert_grads_close(actual, expected, rtol=1e-6, atol=0.0)
    assert (actual[0][masked] == 0).all()


def test_no_trained_position_gives_zero_with_graph():
    hidden, head, _, batch = make_case(5)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    loss, metrics = distillation_loss(hidden, head, batch, LossConfig(weights={"forward_kl": 0.5, "tv": 0.5}))
    assert loss.item() == 0.0 and int(metrics["tokens"]) == 0
    assert all((g == 0).all() for g in grads(loss, hidden, head))


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("k", [V - 1, V])
def test_ghost_bucket_over_whole_vocabulary_is_the_full_divergence(name, k):
    """With K = V - 1 the ghost bucket is one id, with K = V it is empty (p = q = 0): either way exact."""
    hidden, head, teacher, batch = make_case(6, k=k)
    if k == V:
        assert torch.isneginf(batch["tail_logmass"]).all()
    loss, _ = distillation_loss(hidden, head, batch, config({name: 1.0}, "topk_tail", chunk_positions=4))
    mask = batch["loss_mask"]
    full = divergence(name, teacher.exp(), F.softmax(head(hidden).double(), -1))[mask].mean()
    torch.testing.assert_close(loss.double(), full, rtol=1e-5, atol=1e-6)
    actual = grads(loss, hidden, head)
    assert all(torch.isfinite(g).all() for g in actual)
    assert_grads_close(actual, grads(full, hidden, head), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", SAMPLED_DIVERGENCES)
def test_tail_bucket_draws_match_the_dense_bucket_divergence(name):
    """Draws from top-k + a tail bucket (vllm stores): the bucket's student probability is its mass outside the top-k.

    Reference: counts over the K + 1 buckets against the student's bucket probabilities, densely in float64.
    """
    hidden, head, teacher, batch = make_case(4, bias=False, k=20)
    gen = torch.Generator().manual_seed(11)
    p_buckets = buckets(teacher.exp(), batch["topk_ids"])  # [B, L, K + 1]
    bucket_counts = draw_counts(p_buckets.float(), N, gen)
    assert (bucket_counts[..., -1] > 0).any() and (bucket_counts[..., -1] == 0).any()  # bucket drawn, and not
    # The batch the loader gives: real ids for the K columns, TAIL_BUCKET for the last, ascending, padded with 0/0.
    col_ids, counts = sampled_records(bucket_counts)
    real_ids = torch.cat([batch["topk_ids"], torch.full((B, L, 1), TAIL_BUCKET)], -1).gather(-1, col_ids)
    ids = torch.where(counts > 0, real_ids, 0)
    batch = batch | {"sampled_ids": ids, "sampled_counts": counts}
    loss_config = config({name: 1.0}, "sampled", chunk_positions=4, sampled_tail_bucket=True)
    loss, _ = distillation_loss(hidden, head, batch, loss_config)

    target = bucket_counts.double() / N
    q_buckets = buckets(F.softmax(head(hidden).double(), -1), batch["topk_ids"])
    expected = divergence(name, target, q_buckets)[batch["loss_mask"]].mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(loss, hidden, head), grads(expected, hidden, head), rtol=1e-4, atol=1e-7)
    without_topk = {key: value for key, value in batch.items() if key != "topk_ids"}
    with pytest.raises(ValueError, match="topk_ids"):
        distillation_loss(hidden, head, without_topk, loss_config)


def test_sampled_gradient_is_unbiased():
    """Averaged over S independent sets of N draws, the gradient w.r.t. the logits approaches the full KL's."""
    vocab, sets, draws = 30, 2000, N
    gen = torch.Generator().manual_seed(7)
    teacher = F.log_softmax(2.0 * torch.randn(B, vocab, generator=gen, dtype=torch.float64), -1)
    logits = torch.randn(B, vocab, generator=gen)
    head = nn.Linear(vocab, vocab, bias=False)  # identity: hidden states are the logits
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab))
    hidden = logits[:, None, :].expand(B, sets, vocab).clone().requires_grad_(True)
    counts = draw_counts(teacher.exp()[:, None, :].expand(B, sets, vocab).float(), draws, gen)
    ids, counts = sampled_records(counts)
    mask = torch.ones(B, sets, dtype=torch.bool)
    true_ids = torch.zeros(B, sets + 1, dtype=torch.long)
    batch = {"loss_mask": mask, "input_ids": true_ids, "sampled_ids": ids, "sampled_counts": counts}
    loss, _ = distillation_loss(hidden, head, batch, LossConfig(targets="sampled", chunk_positions=512))
    (grad_hidden,) = torch.autograd.grad(loss, hidden)
    estimate = grad_hidden.double().sum(1) * B  # mean over sets of the per-position gradient q - counts / N

    dense_logits = logits.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(kl(teacher.exp(), F.softmax(dense_logits, -1)).sum(), dense_logits)
    p = teacher.exp()
    standard_error = (p * (1 - p) / (draws * sets)).sqrt()
    z = (estimate - expected) / standard_error.clamp_min(1e-12)
    assert z.abs().max() < 5, z
    assert (estimate - expected).abs().max() > 0  # draws, not the exact distribution


def test_graph_holds_at_most_one_chunk_of_logits():
    """Checkpointed chunks: forward keeps only chunk inputs; the [C, V] logits are recomputed in backward, never saved
    for all P. (The fused path keeps the gradients instead: test_fused_loss.)"""
    vocab, length, size = 5000, 32, 2
    hidden, head, _, batch = make_case(8, vocab=vocab, k=8, length=length)
    batch["loss_mask"] = torch.ones(B, length, dtype=torch.bool)
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes() // tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        F.log_softmax(head(hidden), -1)  # control: a dense computation is seen holding [P, V]
    assert sum(storages.values()) >= B * length * vocab

    for representation in CASE_REPRESENTATIONS:
        weights = {d: 1.0 for d, r in PAIRS if r == representation} | {"ce": 1.0}
        storages.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss, _ = distillation_loss(hidden, head, batch, config(weights, representation, chunk_positions=size,
                                                                    impl="checkpoint"))
        assert sum(storages.values()) < size * vocab, (representation, storages)
        assert all(torch.isfinite(g).all() for g in grads(loss, hidden, head))


@pytest.mark.parametrize("autocast", [True, False])
def test_bfloat16_student_gets_float32_loss(autocast):
    """bf16 logits (autocast, or a bf16 model) are the only rounding: the loss after the head is fp32 math."""
    _, head, teacher, batch = make_case(9)
    gen = torch.Generator().manual_seed(9)
    # Coarse values (states in {-1/2, 0, 1/2}, weights in eighths) make every logit exact in bf16, in any order.
    hidden = (torch.randint(-1, 2, (B, L, H), generator=gen) / 2).requires_grad_(True)
    with torch.no_grad():
        for param in head.parameters():
            param.copy_(torch.randint(-8, 9, param.shape, generator=gen) / 8)
    exact = head(hidden).detach().double()
    if not autocast:
        hidden, head = hidden.detach().bfloat16().requires_grad_(True), head.bfloat16()
    weights = {"forward_kl": 0.5, "skew_rkl": 0.2, "ce": 0.5}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, metrics = distillation_loss(hidden, head, batch, config(weights, "topk_tail"))
        assert head(hidden).dtype == torch.bfloat16
    assert loss.dtype == metrics["kd"].dtype == torch.float32
    expected, _, _ = reference(exact, teacher, batch, weights, "topk_tail", 1.0)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_config_errors():
    with pytest.raises(ValueError, match="temperature 1"):
        LossConfig(targets="sampled", temperature=2.0)
    LossConfig(targets="sampled", temperature=2.0, weights={"ce": 1.0})  # no divergence: the targets are unused
    with pytest.raises(ValueError, match="skew_rkl"):
        LossConfig(targets="sampled", weights={"reverse_kl": 1.0})
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd, tv, skew_kl, skew_rkl, ce"):
        LossConfig(weights={"kl": 1.0})
    with pytest.raises(ValueError, match="topk_tail, topk_renorm, sampled"):
        LossConfig(targets="topk")
    with pytest.raises(ValueError, match=">= 0"):
        LossConfig(weights={"forward_kl": -0.5, "ce": 1.0})
    with pytest.raises(ValueError, match="all are 0"):
        LossConfig(weights={"forward_kl": 0.0, "ce": 0.0})
    with pytest.raises(ValueError, match="linear_warmup:STEPS"):
        LossConfig(kd_schedule="warmup")
    for bad in ({"temperature": 0.0}, {"chunk_positions": 0}, {"jsd_beta": 0.0}, {"jsd_beta": 1.0},
                {"skew_alpha": 0.0}, {"skew_alpha": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LossConfig(**bad)


def test_missing_targets_are_named():
    hidden, head, _, batch = make_case(10)
    del batch["sampled_counts"]
    with pytest.raises(ValueError, match="sampled_counts are missing"):
        distillation_loss(hidden, head, batch, LossConfig(targets="sampled"))


def _train_config(**options) -> TrainConfig:
    return TrainConfig(store="store", student="student", output="run", **options)


@pytest.mark.parametrize("options,loss,targets_from", [
    ({}, ["forward_kl=0.9", "ce=0.1"], None),
    ({"alpha": 0.0}, ["ce=1.0"], None),
    ({"loss": "sampled", "alpha": 1.0}, ["forward_kl=1.0"], "sampled"),  # the form before the menu
    ({"loss": ["jsd=0.7", "ce=0.3", "tv=0"], "targets_from": "topk_renorm"}, ["jsd=0.7", "ce=0.3"], "topk_renorm"),
    ({"loss": ("topk_tail", "skew_kl=2")}, ["skew_kl=2.0"], "topk_tail"),
])
def test_train_config_resolves_the_loss_menu(options, loss, targets_from):
    config = _train_config(**options)
    assert (config.loss, config.targets_from, config.alpha) == (loss, targets_from, None)
    assert TrainConfig(**json.loads(json.dumps(asdict(config)))) == config  # train_config.json round trip
    built = config.loss_config(targets_from or "topk_tail")
    assert built.weights == {term.split("=")[0]: float(term.split("=")[1]) for term in loss}


@pytest.mark.parametrize("options,message", [
    ({"loss": ["kl=1"]}, "forward_kl, reverse_kl, jsd, tv, skew_kl, skew_rkl, ce"),
    ({"loss": ["jsd"]}, "NAME=WEIGHT"),
    ({"loss": ["jsd=-0.1", "ce=1"]}, "must be >= 0"),
    ({"loss": ["jsd=0", "ce=0"]}, "every weight is 0"),
    ({"loss": ["jsd=1", "jsd=2"]}, "given twice"),
    ({"loss": ["jsd=1"], "alpha": 0.5}, "weight ce there"),
    ({"alpha": 1.5}, "--alpha"),
    ({"loss": ["sampled"], "targets_from": "topk_tail"}, "different targets"),
    ({"targets_from": "full"}, "--targets-from"),
    ({"loss": ["sampled"], "temperature": 2.0}, "temperature 1"),
    ({"loss": ["reverse_kl=1"], "targets_from": "sampled"}, "skew_rkl"),
    ({"jsd_beta": 1.0}, "jsd_beta"),
    ({"skew_alpha": 0.0}, "skew_alpha"),
    ({"kd_schedule": "cosine"}, "cosine_decay:STEPS"),
])
def test_train_config_errors_name_the_fix(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _train_config(**options)


def test_cli_loss_options_and_yaml_config(tmp_path, monkeypatch):
    import student_train.train

    seen = []
    monkeypatch.setattr(student_train.train, "train", lambda config: seen.append(config) or {})
    required = ["--store", "s", "--student", "t", "--output", str(tmp_path / "run")]
    result = CliRunner().invoke(main, [*required, "--loss", "jsd=0.7", "--loss", "ce=0.3", "--jsd-beta", "0.2",
                                       "--kd-schedule", "linear_warmup:10", "--targets-from", "topk_renorm"])
    assert result.exit_code == 0, result.output
    config = seen.pop()
    assert config.loss == ["jsd=0.7", "ce=0.3"] and config.jsd_beta == 0.2 and config.targets_from == "topk_renorm"
    assert config.kd_schedule == "linear_warmup:10"

    # A YAML file fills the options; the command line wins over it.
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("loss:\n  - skew_kl=0.8\n  - ce=0.2\nskew_alpha: 0.3\nlr: 0.01\n")
    result = CliRunner().invoke(main, [*required, "--config", str(yaml_file), "--lr", "0.002"])
    assert result.exit_code == 0, result.output
    config = seen.pop()
    assert (config.loss, config.skew_alpha, config.lr) == (["skew_kl=0.8", "ce=0.2"], 0.3, 0.002)

    yaml_file.write_text("loss: [jsd=1]\nlearning_rate: 0.01\n")
    result = CliRunner().invoke(main, [*required, "--config", str(yaml_file)])
    assert result.exit_code == 2 and "unknown option(s) learning_rate" in result.output and "lr" in result.output
    result = CliRunner().invoke(main, [*required, "--loss", "kl=1"])
    assert result.exit_code == 2 and "forward_kl, reverse_kl, jsd, tv, skew_kl, skew_rkl, ce" in result.output
    result = CliRunner().invoke(main, [*required, "--loss", "forward_kl=-1", "--loss", "ce=1"])
    assert result.exit_code == 2 and "must be >= 0" in result.output
    assert not seen
