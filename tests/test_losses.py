"""Distillation losses against dense brute-force computations written here in plain torch.

Each case draws a random full teacher distribution per position and derives the store's records from it the way the
store does (torch.topk, ids sorted ascending, tail mass; torch.multinomial draws as distinct ids + counts). The
reference builds the student's full [B, L, V] softmax in float64 and the teacher's buckets from the dense teacher
distribution (tail = 1 - sum of the top-k, not the stored tail), then compares values and gradients.

Legend: B batch, L positions per row, H hidden size, V vocabulary, K top-k, N draws, S draw sets.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from student_train.losses import LOSSES, TAIL_BUCKET, LossConfig, distillation_loss

B, L, H, V, K, N = 2, 7, 16, 97, 6, 20


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


def dense_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def buckets(logp_V: torch.Tensor, ids_K: torch.Tensor) -> torch.Tensor:
    """Probabilities of the K ids and of the ghost bucket (1 - their sum), [..., K + 1]."""
    p_K = logp_V.exp().gather(-1, ids_K)
    return torch.cat([p_K, 1 - p_K.sum(-1, keepdim=True)], -1)


def reference_kd(kind: str, logits: torch.Tensor, teacher: torch.Tensor, batch: dict, temperature: float):
    """Dense per-position KD [B, L] in float64."""
    ids = batch["topk_ids"]
    if kind == "topk_tail":
        q = buckets(F.log_softmax(logits / temperature, -1), ids)
        p = buckets(teacher, ids) ** (1 / temperature)
        return dense_kl((p / p.sum(-1, keepdim=True)).log(), q.log())
    if kind == "topk_renorm":
        p = teacher.exp().gather(-1, ids) ** (1 / temperature)
        q = F.softmax(logits / temperature, -1).gather(-1, ids)
        return dense_kl((p / p.sum(-1, keepdim=True)).log(), (q / q.sum(-1, keepdim=True)).log())
    counts = torch.zeros_like(logits).scatter_(-1, batch["sampled_ids"], batch["sampled_counts"].double())
    target = counts / counts.sum(-1, keepdim=True)
    return dense_kl(target.log(), F.log_softmax(logits, -1))


def reference_loss(logits, teacher, batch, kind, alpha, temperature):
    """Dense loss from the student's full logits [B, L, V], in float64."""
    logits = logits.double()
    mask = batch["loss_mask"]
    kd = reference_kd(kind, logits, teacher, batch, temperature)[mask].mean()
    ce = F.cross_entropy(logits[mask], batch["input_ids"][:, 1:][mask])
    return alpha * temperature**2 * kd + (1 - alpha) * ce, kd, ce


def grads(loss, hidden, head):
    return torch.autograd.grad(loss, [hidden, *head.parameters()])


def assert_grads_close(actual, expected, **tolerance):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.double(), e.double(), **tolerance)


CASES = [
    ("topk_tail", 1.0, 1.0),
    ("topk_tail", 0.3, 2.0),
    ("topk_tail", 1.0, 0.5),
    ("topk_renorm", 1.0, 1.0),
    ("topk_renorm", 0.6, 3.0),
    ("sampled", 1.0, 1.0),
    ("sampled", 0.25, 1.0),
]


@pytest.mark.parametrize("kind,alpha,temperature", CASES)
def test_loss_matches_dense_reference(kind, alpha, temperature):
    hidden, head, teacher, batch = make_case(1, bias=kind != "sampled")
    config = LossConfig(kind=kind, alpha=alpha, temperature=temperature, chunk_positions=4)
    loss, metrics = distillation_loss(hidden, head, batch, config)
    ref_loss, ref_kd, ref_ce = reference_loss(head(hidden), teacher, batch, kind, alpha, temperature)

    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["kd"].double(), ref_kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["ce"].double(), ref_ce, rtol=1e-5, atol=1e-6)
    assert int(metrics["tokens"]) == int(batch["loss_mask"].sum())
    assert ref_kd > 1e-3  # a KD that is not trivially zero
    assert_grads_close(grads(loss, hidden, head), grads(ref_loss, hidden, head), rtol=1e-4, atol=1e-7)


def test_plain_ce_needs_no_targets():
    hidden, head, _, batch = make_case(2)
    batch = {key: batch[key] for key in ("loss_mask", "input_ids")}
    loss, metrics = distillation_loss(hidden, head, batch, LossConfig(kind="topk_tail", alpha=0.0, temperature=3.0))
    mask = batch["loss_mask"]
    expected = F.cross_entropy(head(hidden)[mask], batch["input_ids"][:, 1:][mask])
    torch.testing.assert_close(loss, expected)
    assert float(metrics["kd"]) == 0.0


def test_chunk_size_changes_nothing():
    hidden, head, _, batch = make_case(3, length=11)
    for kind, temperature in [("topk_tail", 1.5), ("topk_renorm", 1.0), ("sampled", 1.0)]:
        base_loss, base_metrics = distillation_loss(
            hidden, head, batch, LossConfig(kind=kind, temperature=temperature, chunk_positions=10_000)
        )
        base_grads = grads(base_loss, hidden, head)
        for size in (1, 3):
            config = LossConfig(kind=kind, temperature=temperature, chunk_positions=size)
            loss, metrics = distillation_loss(hidden, head, batch, config)
            torch.testing.assert_close(loss, base_loss, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(metrics, base_metrics, rtol=1e-6, atol=1e-6)
            assert_grads_close(grads(loss, hidden, head), base_grads, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", list(LOSSES))
def test_masked_positions_change_nothing(kind):
    hidden, head, _, batch = make_case(4)
    config = LossConfig(kind=kind, alpha=0.5, chunk_positions=3)
    loss, _ = distillation_loss(hidden, head, batch, config)
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
    spoiled_loss, _ = distillation_loss(spoiled_hidden, head, spoiled, config)
    actual = grads(spoiled_loss, spoiled_hidden, head)

    torch.testing.assert_close(spoiled_loss, loss)
    assert_grads_close(actual, expected, rtol=1e-6, atol=0.0)
    assert (actual[0][masked] == 0).all()


def test_no_trained_position_gives_zero_with_graph():
    hidden, head, _, batch = make_case(5)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    loss, metrics = distillation_loss(hidden, head, batch, LossConfig(kind="topk_tail"))
    assert loss.item() == 0.0 and int(metrics["tokens"]) == 0
    assert all((g == 0).all() for g in grads(loss, hidden, head))


@pytest.mark.parametrize("k", [V - 1, V])
def test_ghost_bucket_over_whole_vocabulary_is_full_kl(k):
    hidden, head, teacher, batch = make_case(6, k=k)
    if k == V:
        assert torch.isneginf(batch["tail_logmass"]).all()
    loss, _ = distillation_loss(hidden, head, batch, LossConfig(kind="topk_tail", alpha=1.0, chunk_positions=4))
    mask = batch["loss_mask"]
    full_kl = dense_kl(teacher, F.log_softmax(head(hidden).double(), -1))[mask].mean()
    torch.testing.assert_close(loss.double(), full_kl, rtol=1e-5, atol=1e-6)
    actual = grads(loss, hidden, head)
    assert all(torch.isfinite(g).all() for g in actual)
    assert_grads_close(actual, grads(full_kl, hidden, head), rtol=1e-4, atol=1e-7)


def test_tail_bucket_draws_match_the_dense_bucket_kl():
    """Draws from top-k + a tail bucket (vllm stores): the bucket's student probability is its mass outside the top-k.

    Reference: counts over the K + 1 buckets against the student's bucket probabilities, densely in float64.
    """
    hidden, head, teacher, batch = make_case(4, bias=False)
    gen = torch.Generator().manual_seed(11)
    p_buckets = buckets(teacher, batch["topk_ids"])  # [B, L, K + 1]
    bucket_counts = draw_counts(p_buckets.float(), N, gen)
    assert bucket_counts[..., -1].sum() > 0  # some draws land in the bucket
    # The batch the loader gives: real ids for the K columns, TAIL_BUCKET for the last, ascending, padded with 0/0.
    col_ids, counts = sampled_records(bucket_counts)
    real_ids = torch.cat([batch["topk_ids"], torch.full((B, L, 1), TAIL_BUCKET)], -1).gather(-1, col_ids)
    ids = torch.where(counts > 0, real_ids, 0)
    batch = batch | {"sampled_ids": ids, "sampled_counts": counts}
    config = LossConfig(kind="sampled", alpha=1.0, chunk_positions=4, sampled_tail_bucket=True)
    loss, _ = distillation_loss(hidden, head, batch, config)

    target = bucket_counts.double() / N
    q_buckets = buckets(F.log_softmax(head(hidden).double(), -1), batch["topk_ids"])
    expected = dense_kl(target.log(), q_buckets.log())[batch["loss_mask"]].mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(loss, hidden, head), grads(expected, hidden, head), rtol=1e-4, atol=1e-7)
    without_topk = {key: value for key, value in batch.items() if key != "topk_ids"}
    with pytest.raises(ValueError, match="topk_ids"):
        distillation_loss(hidden, head, without_topk, config)


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
    loss, _ = distillation_loss(hidden, head, batch, LossConfig(kind="sampled", alpha=1.0, chunk_positions=512))
    (grad_hidden,) = torch.autograd.grad(loss, hidden)
    estimate = grad_hidden.double().sum(1) * B  # mean over sets of the per-position gradient q - counts / N

    dense_logits = logits.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(dense_kl(teacher, F.log_softmax(dense_logits, -1)).sum(), dense_logits)
    p = teacher.exp()
    standard_error = (p * (1 - p) / (draws * sets)).sqrt()
    z = (estimate - expected) / standard_error.clamp_min(1e-12)
    assert z.abs().max() < 5, z
    assert (estimate - expected).abs().max() > 0  # draws, not the exact distribution


def test_graph_holds_at_most_one_chunk_of_logits():
    """Forward keeps only chunk inputs; the [C, V] logits are recomputed in backward, never saved for all P."""
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

    for kind in LOSSES:
        storages.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss, _ = distillation_loss(hidden, head, batch, LossConfig(kind=kind, chunk_positions=size))
        assert sum(storages.values()) < size * vocab, (kind, storages)
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
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, metrics = distillation_loss(hidden, head, batch, LossConfig(kind="topk_tail"))
        assert head(hidden).dtype == torch.bfloat16
    assert loss.dtype == metrics["kd"].dtype == torch.float32
    reference, _, _ = reference_loss(exact, teacher, batch, "topk_tail", 0.5, 1.0)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)


def test_config_errors():
    with pytest.raises(ValueError, match="temperature 1"):
        LossConfig(kind="sampled", temperature=2.0)
    with pytest.raises(ValueError, match="topk_tail, topk_renorm, sampled"):
        LossConfig(kind="topk")
    for bad in ({"alpha": 1.5}, {"temperature": 0.0}, {"chunk_positions": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LossConfig(kind="topk_tail", **bad)


def test_missing_targets_are_named():
    hidden, head, _, batch = make_case(10)
    del batch["sampled_counts"]
    with pytest.raises(ValueError, match="sampled_counts are missing"):
        distillation_loss(hidden, head, batch, LossConfig(kind="sampled"))
