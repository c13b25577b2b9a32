"""The `hybrid` (exact top-k + draws from the tail) and `topk_residual` (tail mass to the true token) representations
against dense brute-force computations written here in plain torch.

Each case draws a random full teacher distribution per position and derives the store's records from it: torch.topk
(ids ascending) and the tail mass, and for hybrid torch.multinomial draws from the teacher conditioned on the tail.
The reference builds by hand, in float64 over the whole vocabulary, the dense target the representation stands for
(p-hat: the head exact, t * count / N at each drawn tail id; p~: the head, plus the tail mass on the true token,
tempered), the student's full softmax, and each divergence from its textbook formula; the student's logits are the
hidden states (an identity head), so gradients are with respect to the logits.

Legend: B batch, L positions per row, V vocabulary, K top-k, N draws, S draw sets.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import make_small_store, make_student_config
from test_losses import BETA, SKEW, config, divergence, draw_counts, kl, sampled_records
from torch import nn

from storage.manifest import Manifest
from storage.reader import Store
from storage.writer import StoreWriter
from student_train.cli import main
from student_train.config import TrainConfig
from student_train.divergences import TARGETS_FROM, TRUE_IDS, Logits
from student_train.loss_config import LossConfig
from student_train.losses import DIVERGENCES, REPRESENTATIONS, distillation_loss
from student_train.train import Trainer, train

B, L, V, K, N = 2, 9, 61, 5, 8
ALLOWED = [d for d in DIVERGENCES if d != "reverse_kl"]  # reverse KL is infinite against both targets
assert (BETA, SKEW) == (0.3, 0.2)  # the parameters `config` gives the losses and `divergence` the references


def identity_head(vocab: int = V) -> nn.Linear:
    """A head whose outputs are its inputs, exactly: the hidden states are the student's logits."""
    head = nn.Linear(vocab, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab))
    return head.requires_grad_(False)


def head_records(teacher_XV: torch.Tensor, k: int = K, rounded: bool = True) -> dict[str, torch.Tensor]:
    """The stored top-k of dense teacher log-probs: ids ascending, their log-probs, the log of the tail mass; rounded
    to 1/64 nat as the store keeps them (so that they no longer sum to exactly 1), or exact."""
    ids = teacher_XV.topk(k, -1).indices.sort(-1).values
    logprobs, tail = teacher_XV.gather(-1, ids), teacher_XV.scatter(-1, ids, -math.inf).logsumexp(-1)
    if rounded:
        logprobs, tail = (logprobs * 64).round() / 64, (tail * 64).round() / 64
    return {"topk_ids": ids, "topk_logprobs": logprobs.float(), "tail_logmass": tail.float()}


def tail_counts(teacher_XV: torch.Tensor, ids_XK: torch.Tensor, draws: int, gen: torch.Generator) -> torch.Tensor:
    """Counts [..., V] of `draws` draws from the teacher conditioned on the ids outside `ids_XK`; none where that tail
    has no mass."""
    p_tail = teacher_XV.exp().scatter(-1, ids_XK, 0.0)
    empty = p_tail.sum(-1, keepdim=True) == 0
    counts = draw_counts(torch.where(empty, 1.0, p_tail).float(), draws, gen)  # any row to draw from; zeroed below
    return torch.where(empty, 0, counts)


def head_and_tail(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored head and tail renormalised together in float64: [..., K] probabilities and the tail mass [...]."""
    both = torch.cat([batch["topk_logprobs"].double(), batch["tail_logmass"].double()[..., None]], -1).softmax(-1)
    return both[..., :-1], both[..., -1]


def make_hybrid_case(seed: int, vocab: int = V):
    """Logits [B, L, V] (leaf), the dense tail counts [B, L, V], and the batch the loader would give.

    Position (0, 1) has no tail mass (so no draws); position (1, 2) has tail mass but its draws are removed, the
    case where the whole tail goes to the rest bucket.
    """
    gen = torch.Generator().manual_seed(seed)
    teacher = 2.0 * torch.randn(B, L, vocab, generator=gen, dtype=torch.float64)
    head = torch.zeros(vocab, dtype=torch.bool).scatter_(0, teacher[0, 1].topk(K).indices, True)
    teacher[0, 1] = teacher[0, 1].masked_fill(~head, -math.inf)
    teacher = F.log_softmax(teacher, -1)
    records = head_records(teacher)
    counts = tail_counts(teacher, records["topk_ids"], N, gen)
    counts[1, 2] = 0
    ids, sampled_counts = sampled_records(counts)
    mask = torch.rand(B, L, generator=gen) < 0.8
    mask[0, 1] = mask[1, 2] = True
    batch = {"loss_mask": mask, "input_ids": torch.randint(vocab, (B, L + 1), generator=gen), **records,
             "sampled_ids": ids, "sampled_counts": sampled_counts}
    logits = (3.0 * torch.randn(B, L, vocab, generator=gen)).requires_grad_(True)
    return logits, counts, batch


def hybrid_reference(name: str, logits: torch.Tensor, counts: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean D over the trained positions: D(p-hat, q) over the vocabulary where the tail was drawn, else D over the
    K ids plus one bucket for the rest (the teacher's tail mass, the student's mass elsewhere)."""
    p_head, tail = head_and_tail(batch)
    ids = batch["topk_ids"]
    draws = counts.sum(-1, keepdim=True)
    p_hat = (tail[..., None] * counts / draws.clamp_min(1)).scatter(-1, ids, p_head)
    q = F.softmax(logits.double(), -1)
    dense = divergence(name, p_hat, q)
    q_head = q.gather(-1, ids)
    bucketed = divergence(name, torch.cat([p_head, tail[..., None]], -1),
                          torch.cat([q_head, 1 - q_head.sum(-1, keepdim=True)], -1))
    return torch.where(draws[..., 0] > 0, dense, bucketed)[batch["loss_mask"]].mean()


def make_residual_case(seed: int, vocab: int = V):
    """Logits [B, L, V] (leaf) and the batch of a top-k store; some true tokens inside the top-k, most outside."""
    gen = torch.Generator().manual_seed(seed)
    teacher = F.log_softmax(2.0 * torch.randn(B, L, vocab, generator=gen, dtype=torch.float64), -1)
    records = head_records(teacher)
    input_ids = torch.randint(vocab, (B, L + 1), generator=gen)
    inside = torch.rand(B, L, generator=gen) < 0.3
    input_ids[:, 1:] = torch.where(inside, records["topk_ids"][..., 2], input_ids[:, 1:])
    mask = torch.rand(B, L, generator=gen) < 0.8
    batch = {"loss_mask": mask, "input_ids": input_ids, **records}
    in_head = (records["topk_ids"] == input_ids[:, 1:, None]).any(-1)
    assert (in_head & mask).any() and (~in_head & mask).any()
    logits = (3.0 * torch.randn(B, L, vocab, generator=gen)).requires_grad_(True)
    return logits, batch


def residual_reference(name: str, logits: torch.Tensor, batch: dict, temperature: float) -> torch.Tensor:
    """T^2 times the mean D(p~^(1/T) / Z, softmax(z / T)) over the trained positions, p~ dense over the vocabulary."""
    p_head, tail = head_and_tail(batch)
    p_tilde = torch.zeros(*tail.shape, V, dtype=torch.float64).scatter(-1, batch["topk_ids"], p_head)
    p_tilde = p_tilde.scatter_add(-1, batch["input_ids"][:, 1:, None], tail[..., None])
    tempered = p_tilde ** (1 / temperature)  # 0 stays 0
    q = F.softmax(logits.double() / temperature, -1)
    d = divergence(name, tempered / tempered.sum(-1, keepdim=True), q)
    return temperature**2 * d[batch["loss_mask"]].mean()


def loss_and_grad(logits, batch, loss_config):
    loss, metrics = distillation_loss(logits, identity_head(logits.shape[-1]), batch, loss_config)
    return loss, metrics, torch.autograd.grad(loss, logits)[0]


def test_every_representation_is_tested():
    assert set(REPRESENTATIONS) == {"topk_tail", "topk_renorm", "sampled", "hybrid", "topk_residual"}


@pytest.mark.parametrize("name", ALLOWED)
def test_hybrid_matches_dense_p_hat(name):
    logits, counts, batch = make_hybrid_case(1)
    assert (batch["tail_logmass"][0, 1] == -math.inf) and (counts[0, 1] == 0).all()
    assert (counts.sum(-1) > 0).sum() >= B * L - 2 and (batch["sampled_counts"] == 0).any()  # padding, too
    expected = hybrid_reference(name, logits, counts, batch)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert expected > 1e-3
    base_loss, base_metrics, base_grad = loss_and_grad(logits, batch, config({name: 1.0}, "hybrid",
                                                                             chunk_positions=10_000))
    torch.testing.assert_close(base_loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base_metrics[name].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base_grad, expected_grad, rtol=1e-4, atol=1e-7)
    for size in (1, 4):
        loss, metrics, grad = loss_and_grad(logits, batch, config({name: 1.0}, "hybrid", chunk_positions=size))
        torch.testing.assert_close(loss, base_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(metrics, base_metrics, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, base_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ALLOWED)
def test_hybrid_without_draws_is_topk_tail(name):
    """With no draws anywhere (M = 0), every position keeps its tail in one bucket: topk_tail at T = 1."""
    logits, _, batch = make_hybrid_case(2)
    batch |= {"sampled_ids": batch["sampled_ids"][..., :0], "sampled_counts": batch["sampled_counts"][..., :0]}
    hybrid_loss, _, hybrid_grad = loss_and_grad(logits, batch, config({name: 1.0}, "hybrid", chunk_positions=5))
    tail_loss, _, tail_grad = loss_and_grad(logits, batch, config({name: 1.0}, "topk_tail", chunk_positions=5))
    torch.testing.assert_close(hybrid_loss, tail_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(hybrid_grad, tail_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("name", ALLOWED)
def test_topk_residual_matches_dense_p_tilde(name, temperature):
    logits, batch = make_residual_case(3)
    expected = residual_reference(name, logits, batch, temperature)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert expected > 1e-3
    options = {"temperature": temperature}
    base_loss, base_metrics, base_grad = loss_and_grad(logits, batch, config({name: 1.0}, "topk_residual",
                                                                             chunk_positions=10_000, **options))
    torch.testing.assert_close(base_loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base_grad, expected_grad, rtol=1e-4, atol=1e-7)
    for size in (1, 4):
        loss, metrics, grad = loss_and_grad(logits, batch, config({name: 1.0}, "topk_residual", chunk_positions=size,
                                                                  **options))
        torch.testing.assert_close(loss, base_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(metrics, base_metrics, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, base_grad, rtol=1e-5, atol=1e-7)


def test_topk_residual_with_whole_vocabulary_head_is_exact():
    """K = V: no tail mass to move, so topk_residual is the full divergence (the true token's own bucket empty)."""
    gen = torch.Generator().manual_seed(4)
    teacher = F.log_softmax(torch.randn(B, L, V, generator=gen, dtype=torch.float64), -1)
    logits = torch.randn(B, L, V, generator=gen).requires_grad_(True)
    batch = {"loss_mask": torch.ones(B, L, dtype=torch.bool), "input_ids": torch.randint(V, (B, L + 1), generator=gen),
             **head_records(teacher, V, rounded=False)}
    loss, _, grad = loss_and_grad(logits, batch, config({"jsd": 1.0}, "topk_residual", chunk_positions=4))
    expected = divergence("jsd", teacher.exp(), F.softmax(logits.double(), -1)).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, logits)[0], rtol=1e-4, atol=1e-7)


class _Reductions:
    """The calls a representation may make on the student's logits, and nothing else (no `full`, no tensor)."""

    def __init__(self, logits_CV: torch.Tensor):
        self._logits = Logits(logits_CV)

    def lse(self, *args):
        return self._logits.lse(*args)

    def gather(self, *args):
        return self._logits.gather(*args)

    def outside_lse(self, *args):
        return self._logits.outside_lse(*args)


@pytest.mark.parametrize("representation,temperature", [("hybrid", 1.0), ("topk_residual", 1.0),
                                                        ("topk_residual", 2.0)])
def test_representations_read_the_logits_only_through_reductions(representation, temperature):
    """What a fused loss can answer with small tensors: lse, gather and outside_lse; and two distributions."""
    if representation == "hybrid":
        logits, _, batch = make_hybrid_case(5)
    else:
        logits, batch = make_residual_case(5)
    mask = batch["loss_mask"]
    targets = {key: batch[key][mask] for key in ("topk_ids", "topk_logprobs", "tail_logmass", "sampled_ids",
                                                 "sampled_counts") if key in batch}
    targets[TRUE_IDS] = batch["input_ids"][:, 1:][mask]
    logits_CV = logits.detach()[mask]
    logp_CJ, logq_CJ = TARGETS_FROM[representation](Logits(logits_CV), targets, temperature)
    actual = TARGETS_FROM[representation](_Reductions(logits_CV), targets, temperature)
    torch.testing.assert_close(actual, (logp_CJ, logq_CJ), rtol=0, atol=0)
    for log_CJ in (logp_CJ, logq_CJ):
        torch.testing.assert_close(log_CJ.exp().sum(-1), torch.ones(len(log_CJ)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("representation", ["hybrid", "topk_residual"])
def test_masked_positions_change_nothing(representation):
    if representation == "hybrid":
        logits, _, batch = make_hybrid_case(6)
    else:
        logits, batch = make_residual_case(6)
    loss_config = config({d: 1.0 for d in ALLOWED} | {"ce": 0.5}, representation, chunk_positions=3)
    loss, _, expected = loss_and_grad(logits, batch, loss_config)
    masked = ~batch["loss_mask"]
    spoiled = {key: value.clone() for key, value in batch.items()}
    for key in ("topk_logprobs", "tail_logmass", "sampled_counts"):
        if key in spoiled:
            spoiled[key][masked] = math.nan
    for key in ("topk_ids", "sampled_ids"):
        if key in spoiled:
            spoiled[key][masked] = V + 5
    spoiled["input_ids"][:, 1:][masked] = V + 5
    spoiled_logits = logits.detach().clone()
    spoiled_logits[masked] = math.nan
    spoiled_loss, _, actual = loss_and_grad(spoiled_logits.requires_grad_(True), spoiled, loss_config)
    torch.testing.assert_close(spoiled_loss, loss)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0.0)
    assert (actual[masked] == 0).all()


def test_graph_holds_at_most_one_chunk_of_logits():
    """On the checkpointed path, as the other representations: the [C, V] logits are recomputed in backward, never
    saved for all positions."""
    vocab, size = 3000, 2
    gen = torch.Generator().manual_seed(9)
    hidden = torch.randn(B, L, 16, generator=gen, requires_grad=True)
    head = nn.Linear(16, vocab)
    cases = {"hybrid": make_hybrid_case(9, vocab)[2], "topk_residual": make_residual_case(9, vocab)[1]}
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes() // tensor.element_size()
        return tensor

    for representation, batch in cases.items():
        batch["loss_mask"] = torch.ones(B, L, dtype=torch.bool)
        storages.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss, _ = distillation_loss(hidden, head, batch, config({d: 1.0 for d in ALLOWED} | {"ce": 1.0},
                                                                    representation, chunk_positions=size,
                                                                    impl="checkpoint"))
        assert sum(storages.values()) < size * vocab < B * L * vocab, (representation, storages)
        assert all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, [hidden, *head.parameters()]))


@pytest.mark.parametrize("representation,temperature", [("hybrid", 1.0), ("topk_residual", 1.0),
                                                        ("topk_residual", 2.0)])
def test_gradients_are_finite_on_extreme_targets(representation, temperature):
    """A one-hot teacher (tail mass and all but one head probability 0, no draws) and a very confident student."""
    logits, batch = make_residual_case(7)
    batch |= {"topk_logprobs": torch.full((B, L, K), -math.inf).index_fill(-1, torch.tensor([1]), 0.0),
              "tail_logmass": torch.full((B, L), -math.inf),
              "sampled_ids": torch.zeros(B, L, 0, dtype=torch.long), "sampled_counts": torch.zeros(B, L, 0)}
    sharp = (logits.detach() * 40).requires_grad_(True)
    loss_config = config({d: 1.0 for d in ALLOWED}, representation, temperature=temperature)
    loss, _, grad = loss_and_grad(sharp, batch, loss_config)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_hybrid_gradient_is_unbiased_and_renormalised_topk_is_not():
    """Averaged over S independent sets of N tail draws, hybrid's forward-KL gradient w.r.t. the logits approaches
    the full KL's q - p within a few standard errors per coordinate; renormalised top-k (no tail) and the tail draws
    read as draws of the whole distribution (`sampled`) are far off on the same case."""
    vocab, k, sets, draws = 40, 5, 3000, 8
    gen = torch.Generator().manual_seed(17)
    teacher = F.log_softmax(1.5 * torch.randn(vocab, generator=gen, dtype=torch.float64), -1)
    logits = torch.randn(vocab, generator=gen)
    records = head_records(teacher[None], k, rounded=False)
    p = teacher.exp()
    tail_mass = float(p.scatter(-1, records["topk_ids"][0], 0.0).sum())
    assert 0.2 < tail_mass < 0.8  # a tail that matters, and a head that does

    # The draws, independently of any store code: multinomial over the tail ids, p_v / t.
    p_tail = p.scatter(-1, records["topk_ids"][0], 0.0) / tail_mass
    samples = torch.multinomial(p_tail.float().expand(sets, vocab), draws, replacement=True, generator=gen)
    counts = torch.zeros(sets, vocab).scatter_add_(1, samples, torch.ones(sets, draws))
    ids, sampled_counts = sampled_records(counts)
    batch = {"loss_mask": torch.ones(1, sets, dtype=torch.bool),
             "input_ids": torch.zeros(1, sets + 1, dtype=torch.long),
             **{key: value.expand(sets, *value.shape[1:])[None] for key, value in records.items()},
             "sampled_ids": ids[None], "sampled_counts": sampled_counts[None]}

    def mean_gradient(targets: str) -> torch.Tensor:
        """The gradient of the mean over the S positions, times S: the mean per-position gradient, [V]."""
        hidden = logits.expand(1, sets, vocab).clone().requires_grad_(True)
        loss_config = LossConfig(targets=targets, weights={"forward_kl": 1.0}, chunk_positions=1024)
        _, _, grad = loss_and_grad(hidden, batch, loss_config)
        return grad.double().sum((0, 1))

    dense_logits = logits.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(kl(p, F.softmax(dense_logits, -1)), dense_logits)
    # Per tail coordinate, t c_v / N has variance t^2 p'_v (1 - p'_v) / N (p' = p / t); the head is exact.
    standard_error = (tail_mass**2 * p_tail * (1 - p_tail) / (draws * sets)).sqrt()
    head = torch.zeros(vocab, dtype=torch.bool).scatter_(0, records["topk_ids"][0], True)

    hybrid = mean_gradient("hybrid")
    torch.testing.assert_close(hybrid[head], expected[head], rtol=0, atol=1e-6)  # no variance on the head
    z = (hybrid - expected)[~head] / standard_error[~head]
    assert z.abs().max() < 4.5, z
    assert (hybrid - expected)[~head].abs().max() > 0  # draws, not the exact distribution

    for biased in ("topk_renorm", "sampled"):
        error = (mean_gradient(biased) - expected).abs()
        assert error.max() > 0.05 and (error / standard_error.clamp_min(standard_error[~head].min())).max() > 50, (
            biased, error)


# --- refusals ------------------------------------------------------------------------------------------------------


def test_config_refusals():
    with pytest.raises(ValueError, match="temperature: 2.0 cannot be used with hybrid targets: the stored tail draws "
                                         "come from the teacher at temperature 1"):
        LossConfig(targets="hybrid", temperature=2.0)
    LossConfig(targets="hybrid", temperature=2.0, weights={"ce": 1.0})  # no divergence: the targets are unused
    LossConfig(targets="topk_residual", temperature=2.0, top_k=3)
    for targets in ("hybrid", "topk_residual"):
        with pytest.raises(ValueError, match=f"reverse_kl cannot be used with {targets} targets: .* infinite. Use "
                                             "skew_rkl"):
            LossConfig(targets=targets, weights={"forward_kl": 1.0, "reverse_kl": 0.5})
    with pytest.raises(ValueError, match="top_k: 4 cannot narrow hybrid targets: their tail draws are of the ids "
                                         "outside the stored top-k"):
        LossConfig(targets="hybrid", top_k=4)
    with pytest.raises(ValueError, match="top_k: 4 cannot narrow hybrid"):
        TrainConfig(store="s", student="t", output="o", targets_from="hybrid", top_k=4)
    with pytest.raises(ValueError, match="untempered tail"):
        TrainConfig(store="s", student="t", output="o", loss=["hybrid"], temperature=0.5)


def test_missing_records_are_named():
    logits, _, batch = make_hybrid_case(8)
    del batch["sampled_counts"]
    with pytest.raises(ValueError, match="hybrid targets need .* sampled_counts are missing"):
        distillation_loss(logits, identity_head(), batch, LossConfig(targets="hybrid"))


# --- training on stores ---------------------------------------------------------------------------------------------


def write_hybrid_store(source: Path, output: Path) -> Path:
    """A hybrid store from a store of top-k + draws of the whole distribution: at each position, the draws that fell
    outside the top-k, which are draws from the teacher conditioned on the tail (their number varies by position).
    The manifest says so; every other record is copied."""
    store = Store(source)
    manifest = store.manifest
    targets = manifest.targets | {"sampled": manifest.targets["sampled"] | {"draws_from": "tail"}}
    writer = StoreWriter.open(output, Manifest(teacher=manifest.teacher, dataset=manifest.dataset,
                                               build=manifest.build, targets=targets), resume=False)
    for index, shard in enumerate(store.shards):
        record = shard.read()
        nunique = record["sampled_nunique"]
        position_E = np.repeat(np.arange(nunique.size), nunique.reshape(-1).astype(np.int64))
        topk_PK = record["topk_ids"].reshape(nunique.size, -1)
        tail_E = ~(topk_PK[position_E] == record["sampled_ids"][:, None]).any(1)
        record |= {"sampled_ids": record["sampled_ids"][tail_E], "sampled_counts": record["sampled_counts"][tail_E],
                   "sampled_nunique": np.bincount(position_E[tail_E], minlength=nunique.size).reshape(
                       nunique.shape).astype(nunique.dtype)}
        writer.write_shard(index, record)
    writer.finish()
    return output


@pytest.fixture(scope="module")
def stores(tmp_path_factory, llama_dir, corpus_texts) -> tuple[Path, Path]:
    """(a store of top-k + draws of the whole distribution, the hybrid store made from it)."""
    root = tmp_path_factory.mktemp("hybrid-stores")
    plain = make_small_store(root, llama_dir, corpus_texts[:16], num_draws=200)
    return plain, write_hybrid_store(plain, root / "hybrid")


@pytest.fixture(scope="module")
def student(tmp_path_factory, llama_dir) -> Path:
    return make_student_config(tmp_path_factory.mktemp("student"), llama_dir)


def _train_config(store: Path, student: Path, output: Path, **options) -> TrainConfig:
    return TrainConfig(**{"store": str(store), "student": str(student), "output": str(output), "batch_size": 4,
                          "max_steps": 2, "lr": 1e-2, "eval_fraction": 0.2, "eval_every": 2, "save_every": 2,
                          "log_every": 1, "device": "cpu", **options})


def test_the_hybrid_store_holds_tail_draws(stores):
    plain, hybrid = stores
    batch_tail, batch_drawn = 0, 0
    for sample in Store(hybrid):
        nunique = sample["sampled_nunique"].astype(np.int64)
        position = np.repeat(np.arange(len(nunique)), nunique)
        assert not (sample["topk_ids"][position] == sample["sampled_ids"][:, None]).any()
        batch_tail += int((nunique > 0).sum())
        batch_drawn += len(nunique)
    assert batch_tail > 0.2 * batch_drawn  # enough positions with tail draws to train on


@pytest.mark.parametrize("targets_from", [None, "hybrid", "topk_residual"])
def test_trains_on_hybrid_and_residual_targets(tmp_path, stores, student, targets_from):
    _, hybrid = stores
    config = _train_config(hybrid, student, tmp_path / "run", loss=["forward_kl=0.7", "tv=0.2", "ce=0.1"],
                           targets_from=targets_from)
    trainer = Trainer(config)
    assert trainer.loss_config.targets == (targets_from or "hybrid")  # a hybrid store's default
    assert trainer.eval_loss_config.targets == "topk_tail"  # the held-out KL of every top-k store
    evaluation = trainer.run()
    assert evaluation["step"] == 2 and math.isfinite(evaluation["kl"])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kd = [record["kd"] for record in lines if "eval" not in record]
    assert len(kd) == 2 and all(math.isfinite(value) and value > 0 for value in kd)


def test_topk_residual_trains_on_a_top_k_store_with_top_k(tmp_path, stores, student):
    plain, _ = stores
    evaluation = train(_train_config(plain, student, tmp_path / "run", targets_from="topk_residual", top_k=4,
                                     temperature=2.0, max_steps=1, eval_every=1, save_every=1))
    assert evaluation["step"] == 1


def test_store_and_targets_must_agree(tmp_path, stores, student):
    plain, hybrid = stores

    def refused(store, message, **options):
        with pytest.raises(ValueError, match=message):
            Trainer(_train_config(store, student, tmp_path / "run", **options))

    refused(plain, r"--targets-from hybrid: .* no tail draws \(its draws are not conditioned on the tail: they "
                   r"train with --targets-from sampled\); build one with `teacher-cache build --targets hybrid`",
            loss=["hybrid"])
    refused(hybrid, "--targets-from sampled: this store's draws are of the teacher's tail only .* use --targets-from "
                    "hybrid", targets_from="sampled")
    Trainer(_train_config(plain, student, tmp_path / "ce", targets_from="hybrid", alpha=0.0))  # CE reads no targets

    result = CliRunner().invoke(main, ["--store", str(plain), "--student", str(student), "--output",
                                       str(tmp_path / "cli"), "--targets-from", "hybrid", "--device", "cpu"])
    assert result.exit_code == 2 and "teacher-cache build --targets hybrid" in result.output, result.output
    result = CliRunner().invoke(main, ["--store", str(hybrid), "--student", str(student), "--output",
                                       str(tmp_path / "cli"), "--targets-from", "sampled", "--device", "cpu"])
    assert result.exit_code == 2 and "use --targets-from hybrid" in result.output, result.output


def test_targets_need_their_records():
    from student_train.targets import check_targets as _check_targets

    topk = {"topk": {"k": 8}}
    sampled = {"sampled": {"num_draws": 16}}
    for representation in ("topk_tail", "topk_renorm", "topk_residual"):
        with pytest.raises(ValueError, match=f"--targets-from {representation}: reads the store's top-k targets"):
            _check_targets(representation, sampled)
        _check_targets(representation, topk)
    with pytest.raises(ValueError, match="--targets-from sampled: reads the teacher's draws, and this store has none"):
        _check_targets("sampled", topk)
    with pytest.raises(ValueError, match=r"no tail draws; build one with `teacher-cache build --targets hybrid`"):
        _check_targets("hybrid", topk)
    _check_targets("hybrid", topk | {"sampled": {"num_draws": 16, "draws_from": "tail"}})
    _check_targets("online", {})
