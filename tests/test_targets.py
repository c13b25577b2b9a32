"""Stored teacher targets against a brute-force reference computed here in plain torch.

The reference is the model's own forward pass: `AutoModelForCausalLM.from_pretrained(dir)(ids).logits`, one
sample at a time on its real tokens only, then a full log-softmax in float64. Stores are built from real text
with float32 weights, for a tiny Llama and a tiny GPT-2. Sampled targets are checked against their expectation
under that reference distribution with z-scores and a chi-square test. The pure numerics
(`extract_targets`, `encode_draws`) are checked on hand-made inputs and random heads.

Legend: L seq_len, K top-k, V vocabulary, N draws per position.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from transformers import AutoModelForCausalLM

from storage import open_store
from teacher_cache import BuildConfig, build_cache
from teacher_cache.targets import TargetSpec, extract_targets
from teacher_cache.targets.sampled import encode_draws

L = 48
K = 8
N = 200
STEP = 1 / 64  # stored log-probs are the nearest multiple of STEP nat to the build's own float32 value
# The reference here (one unpadded sample through `model(...)`) recomputes what the build computed from padded batches
# through the base model and the head in chunks: other kernels, other summation orders, so float32 noise on each
# log-prob, measured at up to 7e-6 nat on these teachers (|log p| < 14), the same at 1 and 2 threads. A bound of
# STEP / 2 alone fails whenever a value sits at a rounding midpoint. RECOMPUTE_NOISE covers the noise 15 times over
# and is 1/80 of a step, so a value off by a step still fails, and `assert_nearest_step` checks the rounding exactly
# wherever the reference is clear of a midpoint.
RECOMPUTE_NOISE = 1e-4
WITHIN = STEP / 2 + RECOMPUTE_NOISE
DENSE = ("entropy", "true_logprob", "topk_ids", "topk_logprobs", "tail_logmass", "sampled_nunique")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def teacher_dir(request):
    return request.getfixturevalue(f"{request.param}_dir")


@pytest.fixture(scope="module")
def model(teacher_dir):
    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()


def build(teacher_dir, data, output, **options):
    config = dict(model=str(teacher_dir), dataset=str(data), output=str(output), seq_len=L, batch_size=4,
                  samples_per_shard=6, top_k=K, num_draws=N, seed=0, targets=("topk", "sampled"),
                  hidden_layers=(0, -1), pack=True, max_samples=12, dtype="float32", device="cpu")
    build_cache(BuildConfig(**(config | options)))
    return open_store(output)


@pytest.fixture(scope="module")
def packed(teacher_dir, corpus_jsonl, tmp_path_factory):
    """12 full packed samples in 2 shards, batches of 4 cut at the shard boundary (4, 2, 4, 2)."""
    return build(teacher_dir, corpus_jsonl, tmp_path_factory.mktemp("packed") / "store")


@pytest.fixture(scope="module")
def unpacked(teacher_dir, corpus_jsonl, tmp_path_factory):
    """One document per sample, short ones padded (seq_len 16: 3 of the first 8 paragraphs are shorter);
    small logit chunks so that a batch's positions span several chunks."""
    return build(teacher_dir, corpus_jsonl, tmp_path_factory.mktemp("unpacked") / "store", pack=False,
                 seq_len=16, max_samples=8, hidden_layers=(-1,), chunk_positions=37)


def reference(model, sample) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """float64 log-probs [n, V] and hidden states of the sample's n real inputs, from a plain forward pass."""
    n = int(sample["attention_mask"][:-1].sum())
    ids = torch.from_numpy(sample["input_ids"][:n].astype(np.int64))[None]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return out.logits[0].double().log_softmax(-1), tuple(h[0] for h in out.hidden_states)


def trained(sample) -> np.ndarray:
    positions = np.flatnonzero(sample["loss_mask"])
    assert len(positions), "every sample has at least one trained position"
    return positions


def assert_nearest_step(stored: np.ndarray, reference: np.ndarray) -> int:
    """Stored values are the nearest multiple of STEP to the reference wherever the reference is further than the
    recomputation noise from a midpoint between two multiples (all but about 1.3% of values, 2 * noise / STEP);
    returns how many were checked."""
    scaled = reference.astype(np.float64) / STEP
    clear = np.abs(scaled - np.floor(scaled) - 0.5) > RECOMPUTE_NOISE / STEP
    np.testing.assert_array_equal(stored[clear], np.round(scaled[clear]) * STEP)
    return int(clear.sum())


def per_position_draws(sample) -> list[tuple[np.ndarray, np.ndarray]]:
    nunique = sample["sampled_nunique"].astype(np.int64)
    ends = np.cumsum(nunique)
    assert len(sample["sampled_ids"]) == len(sample["sampled_counts"]) == ends[-1]
    return [(sample["sampled_ids"][e - u:e].astype(np.int64), sample["sampled_counts"][e - u:e].astype(np.int64))
            for u, e in zip(nunique, ends, strict=True)]


# --------------------------------------------------------------------------------------------- dense targets


def check_dense_targets(model, store) -> int:
    """Top-k, tail, entropy and true log-prob of every trained position against the reference."""
    checked = rounded = candidates = 0
    for i in range(len(store)):
        sample = store[i]
        logp_nV, _ = reference(model, sample)
        pos = trained(sample)
        ref = logp_nV[pos]  # [P, V]
        true_ids = torch.from_numpy(sample["input_ids"][pos + 1].astype(np.int64))

        # true next token and entropy
        np.testing.assert_allclose(sample["true_logprob"][pos], ref.gather(1, true_ids[:, None])[:, 0].numpy(),
                                   rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(sample["entropy"][pos], -(ref.exp() * ref).sum(-1).numpy(), rtol=1e-4, atol=1e-5)

        # top-k: values in order, each id's own log-prob, and the id set wherever the k-th is not tied
        top_vals, top_ids = ref.topk(K + 1, dim=-1)
        ids = sample["topk_ids"][pos].astype(np.int64)
        vals = sample["topk_logprobs"][pos].astype(np.float64)
        assert (np.diff(ids, axis=-1) > 0).all()  # ascending ids (FORMAT.md)
        # stored in steps of 1/64 nat: each within 1/128 of the build's value, so of the reference up to its noise
        np.testing.assert_allclose(-np.sort(-vals, axis=-1), top_vals[:, :K].numpy(), rtol=0, atol=WITHIN)
        np.testing.assert_allclose(vals, ref.gather(1, torch.from_numpy(ids)).numpy(), rtol=0, atol=WITHIN)
        assert np.all(vals * 64 == np.round(vals * 64))
        rounded += assert_nearest_step(vals, ref.gather(1, torch.from_numpy(ids)).numpy())
        candidates += vals.size
        separated = (top_vals[:, K - 1] - top_vals[:, K]) > RECOMPUTE_NOISE
        assert separated.float().mean() > 0.5
        for row in np.flatnonzero(separated.numpy()):
            assert set(ids[row]) == set(top_ids[row, :K].tolist()), (i, pos[row])
        assert all(len(set(row)) == K for row in ids)

        # tail: 1 - sum of the reference's top-k probabilities, and the exact log-space sum outside them
        tail = 1.0 - top_vals[:, :K].exp().sum(-1)
        np.testing.assert_allclose(np.exp(sample["tail_logmass"][pos].astype(np.float64)), tail.numpy(),
                                   rtol=math.expm1(WITHIN), atol=1e-6)
        outside = ref.scatter(1, top_ids[:, :K], float("-inf")).logsumexp(-1)
        np.testing.assert_allclose(sample["tail_logmass"][pos], outside.numpy(), rtol=0, atol=WITHIN)
        kept = separated.numpy()  # the same top-k ids as the build, so the same ids outside
        rounded += assert_nearest_step(sample["tail_logmass"][pos][kept], outside.numpy()[kept])
        candidates += int(kept.sum())
        checked += len(pos)
    assert rounded > 0.9 * candidates, (rounded, candidates)  # the exact rounding check covers almost every value
    return checked


def test_dense_targets_match_brute_force(model, packed):
    assert len(packed) == 12 and all(packed[i]["loss_mask"].all() for i in range(12))
    assert check_dense_targets(model, packed) == 12 * L


def test_unpacked_padding_is_zero_and_real_positions_match(model, unpacked):
    """Right padding changes nothing at real positions; positions without a target hold zeros everywhere."""
    padded = [i for i in range(len(unpacked)) if not unpacked[i]["attention_mask"].all()]
    assert len(unpacked) == 8 and 0 < len(padded) < 8
    assert check_dense_targets(model, unpacked) > 0
    for i in range(len(unpacked)):
        sample = unpacked[i]
        off = ~sample["loss_mask"]
        assert off.any() == (i in padded)
        for name in (*DENSE, f"hidden_states_{model.config.num_hidden_layers}"):
            assert (sample[name][off] == 0).all(), name
        draws = per_position_draws(sample)
        assert all(len(draws[t][0]) == 0 for t in np.flatnonzero(off))


# ------------------------------------------------------------------------------------------- sampled targets


def check_draw_structure(sample, vocab_size: int, num_draws: int) -> None:
    draws = per_position_draws(sample)
    for t, (ids, counts) in enumerate(draws):
        if sample["loss_mask"][t]:
            assert counts.sum() == num_draws and (counts >= 1).all()
            assert (np.diff(ids) > 0).all()  # strictly ascending: distinct ids
            assert ids.min() >= 0 and ids.max() < vocab_size
        else:
            assert len(ids) == 0 and sample["sampled_nunique"][t] == 0


def test_sampled_structure(model, packed, unpacked):
    for store in (packed, unpacked):
        for i in range(len(store)):
            check_draw_structure(store[i], model.config.vocab_size, N)


BIN_EDGES = (0.5, 0.1, 0.01, 1e-3)  # teacher probability bins: [0.5, 1], [0.1, 0.5), ..., [0, 1e-3)


def test_sampled_frequencies_match_teacher(model, packed):
    """Over 576 positions x 200 draws: the mass drawn on each position's top-1 id and on each probability bin
    matches its expectation under the reference distribution."""
    edges = torch.tensor(BIN_EDGES, dtype=torch.float64)
    nbins = len(BIN_EDGES) + 1
    top1 = torch.zeros(3, dtype=torch.float64)  # observed, expected, variance
    bins = torch.zeros(3, nbins, dtype=torch.float64)
    for i in range(len(packed)):
        sample = packed[i]
        logp_nV, _ = reference(model, sample)
        pos = trained(sample)
        p_PV = logp_nV[pos].exp()
        # the draws as flat (row of p_PV, id, count) entries
        nunique = torch.from_numpy(sample["sampled_nunique"][pos].astype(np.int64))
        row_E = torch.repeat_interleave(torch.arange(len(pos)), nunique)
        ids_E = torch.from_numpy(sample["sampled_ids"].astype(np.int64))
        counts_E = torch.from_numpy(sample["sampled_counts"].astype(np.float64))

        p_best_P, best_P = p_PV.max(-1)
        on_best = ids_E == best_P[row_E]
        top1 += torch.stack([counts_E[on_best].sum(), N * p_best_P.sum(), N * (p_best_P * (1 - p_best_P)).sum()])

        bin_PV = torch.bucketize(-p_PV, -edges)  # bin 0 holds the largest probabilities
        mass_PB = torch.zeros(len(pos), nbins, dtype=torch.float64).scatter_add_(1, bin_PV, p_PV)
        observed_B = torch.zeros(nbins, dtype=torch.float64).index_add_(0, bin_PV[row_E, ids_E], counts_E)
        bins += torch.stack([observed_B, N * mass_PB.sum(0), N * (mass_PB * (1 - mass_PB)).sum(0)])

    observed, expected, variance = top1
    assert abs(observed - expected) <= 5 * math.sqrt(variance) + 1, (observed, expected, variance)

    observed_B, expected_B, variance_B = bins
    assert observed_B.sum() == N * 12 * L
    for b in range(nbins):  # z-score per bin (binomial variance summed over positions); +1 for discreteness
        assert abs(observed_B[b] - expected_B[b]) <= 5 * math.sqrt(variance_B[b]) + 1, (b, bins[:, b])
    # Pearson chi-square over the bins expecting at least 5 draws (the others pooled into the last kept bin).
    keep = expected_B >= 5
    assert keep[0]
    o, e = observed_B[keep].clone(), expected_B[keep].clone()
    o[-1] += observed_B[~keep].sum()
    e[-1] += expected_B[~keep].sum()
    df = len(o) - 1
    if df:
        chi2 = float(((o - e) ** 2 / e).sum())
        p_value = float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(chi2 / 2)))
        assert p_value > 1e-6, (chi2, df, o, e)


def sampled_arrays(store) -> list[np.ndarray]:
    return [store[i][name] for i in range(len(store)) for name in ("sampled_nunique", "sampled_ids", "sampled_counts")]


def test_draws_depend_only_on_the_seed(model, teacher_dir, corpus_jsonl, tmp_path):
    small = dict(targets=("sampled",), hidden_layers=(), seq_len=32, max_samples=4, num_draws=20)
    a = build(teacher_dir, corpus_jsonl, tmp_path / "a", **small)
    b = build(teacher_dir, corpus_jsonl, tmp_path / "b", **small)
    c = build(teacher_dir, corpus_jsonl, tmp_path / "c", **small, seed=1)
    for x, y in zip(sampled_arrays(a), sampled_arrays(b), strict=True):
        np.testing.assert_array_equal(x, y)
    for i in range(len(c)):
        check_draw_structure(c[i], model.config.vocab_size, 20)

    # A different seed must change the draws somewhere, which needs positions where the teacher is uncertain.
    uncertain = sum(int((reference(model, a[i])[0][:32].exp().max(-1).values < 0.9).sum()) for i in range(len(a)))
    if uncertain < 10:
        pytest.skip(f"this teacher is near-deterministic (top-1 p >= 0.9 at all but {uncertain} positions): "
                    "two seeds give the same draws")
    assert any(not np.array_equal(x, y) for x, y in zip(sampled_arrays(a), sampled_arrays(c), strict=True))


def test_batches_draw_independently(model, teacher_dir, tmp_path, corpus_texts):
    """Identical samples at the same row of different batches must not get the same draws (a random stream
    reused per batch would repeat them)."""
    data = tmp_path / "same.jsonl"
    data.write_text("".join(json.dumps({"text": corpus_texts[9]}) + "\n" for _ in range(6)))
    store = build(teacher_dir, data, tmp_path / "store", targets=("sampled",), hidden_layers=(), seq_len=32,
                  pack=False, batch_size=2, samples_per_shard=6, max_samples=None, num_draws=20)
    assert len(store) == 6 and all(np.array_equal(store[i]["input_ids"], store[0]["input_ids"]) for i in range(6))
    uncertain = int((reference(model, store[0])[0][:32].exp().max(-1).values < 0.9).sum())
    if uncertain < 10:
        pytest.skip(f"this teacher is near-deterministic (top-1 p >= 0.9 at all but {uncertain} positions)")
    draws = [(store[i]["sampled_ids"], store[i]["sampled_counts"]) for i in (0, 2, 4)]  # row 0 of each batch
    for (ids_a, counts_a), (ids_b, counts_b) in itertools.combinations(draws, 2):
        assert not (np.array_equal(ids_a, ids_b) and np.array_equal(counts_a, counts_b))


# --------------------------------------------------------------------------------------------- hidden states


def test_hidden_states_match_model(model, packed):
    last = model.config.num_hidden_layers
    assert {"hidden_states_0", f"hidden_states_{last}"} <= set(packed[0])
    for i in range(len(packed)):
        sample = packed[i]
        _, hidden = reference(model, sample)
        pos = trained(sample)
        for name, expected in (("hidden_states_0", hidden[0]), (f"hidden_states_{last}", hidden[-1])):
            assert sample[name].dtype == np.float16
            np.testing.assert_allclose(sample[name][pos].astype(np.float32), expected[pos].numpy(),
                                       rtol=2e-3, atol=1e-4, err_msg=name)


# ----------------------------------------------------------------------------------------- pure numerics


def test_encode_draws_hand_made():
    out = encode_draws(torch.tensor([[5, 3, 5, 5], [1, 1, 1, 1]]))
    assert out["sampled_nunique"].tolist() == [2, 1]
    assert out["sampled_ids"].tolist() == [3, 5, 1]
    assert out["sampled_counts"].tolist() == [1, 3, 4]


@settings(max_examples=200, deadline=None)
@given(arrays(np.int64, array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=9), elements=st.integers(0, 12)))
def test_encode_draws_round_trip(draws):
    out = encode_draws(torch.from_numpy(draws))
    nunique, ids, counts = out["sampled_nunique"], out["sampled_ids"], out["sampled_counts"]
    expected = np.sort(draws, axis=1)
    np.testing.assert_array_equal(torch.repeat_interleave(ids, counts).numpy(), expected.ravel())
    assert nunique.tolist() == [len(np.unique(row)) for row in draws]
    for row, row_ids in zip(draws, torch.split(ids, nunique.tolist()), strict=True):
        np.testing.assert_array_equal(row_ids.numpy(), np.unique(row))  # distinct, ascending


def random_head(V: int = 50, H: int = 16, P: int = 11, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    head_VH = torch.randn(V, H, generator=g) * 3
    hidden_PH = torch.randn(P, H, generator=g)
    true_P = torch.randint(0, V, (P,), generator=g)
    return hidden_PH, true_P, lambda h_pH: h_pH @ head_VH.T, head_VH


def test_extract_targets_chunked_equals_unchunked_and_brute_force():
    hidden_PH, true_P, logits_fn, head_VH = random_head()
    whole = extract_targets(hidden_PH, true_P, logits_fn, TargetSpec(top_k=5, num_draws=None))
    chunked = extract_targets(hidden_PH, true_P, logits_fn, TargetSpec(top_k=5, num_draws=None, chunk_positions=3))
    assert set(whole) == set(chunked) == {"entropy", "true_logprob", "topk_ids", "topk_logprobs", "tail_logmass"}
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name])

    logp = (hidden_PH.double() @ head_VH.double().T).log_softmax(-1)
    top_vals, top_ids = logp.topk(5, dim=-1)
    ids_by_id, order = top_ids.sort(-1)  # stored in ascending id order (FORMAT.md)
    assert torch.equal(whole["topk_ids"], ids_by_id)
    torch.testing.assert_close(whole["topk_logprobs"].double(), top_vals.gather(1, order), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole["entropy"].double(), -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole["true_logprob"].double(), logp[torch.arange(11), true_P], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole["tail_logmass"].double().exp(), 1 - top_vals.exp().sum(-1), rtol=1e-4, atol=1e-6)


def test_extract_targets_chunked_draws_stay_with_their_positions():
    """Point-mass distributions (a different id per position): every draw lands on its position's id."""
    P, V, N_ = 10, 40, 7
    target_P = (torch.arange(P) * 7 + 3) % V
    hidden_PH = torch.eye(P)
    head_VH = torch.zeros(V, P)
    head_VH[target_P, torch.arange(P)] = 200.0
    out = extract_targets(hidden_PH, target_P, lambda h: h @ head_VH.T,
                          TargetSpec(top_k=2, num_draws=N_, chunk_positions=3), torch.Generator().manual_seed(0))
    assert out["sampled_nunique"].tolist() == [1] * P
    assert out["sampled_ids"].tolist() == target_P.tolist()
    assert out["sampled_counts"].tolist() == [N_] * P
    assert out["topk_ids"].gather(1, out["topk_logprobs"].argmax(1, keepdim=True))[:, 0].tolist() == target_P.tolist()
    torch.testing.assert_close(out["true_logprob"], torch.zeros(P), atol=1e-6, rtol=0)


def test_extract_targets_tiny_tail_is_exact():
    """A tail far below fp32's smallest probability is still stored exactly in log space."""
    P, V = 4, 40
    logits_PV = torch.zeros(P, V)
    logits_PV[:, 0] = 200.0
    out = extract_targets(torch.eye(P), torch.zeros(P, dtype=torch.long), lambda h: h @ logits_PV,
                          TargetSpec(top_k=1, num_draws=None))
    # outside the top 1: V - 1 ids at logit 0 against one at 200 -> log(V - 1) - 200
    assert out["topk_ids"][:, 0].tolist() == [0] * P
    torch.testing.assert_close(out["tail_logmass"], torch.full((P,), math.log(V - 1) - 200.0), rtol=0, atol=1e-3)


def test_extract_targets_k_equals_vocab_has_no_tail():
    hidden_PH, true_P, logits_fn, head_VH = random_head(V=20)
    out = extract_targets(hidden_PH, true_P, logits_fn, TargetSpec(top_k=20, num_draws=None, chunk_positions=4))
    assert torch.isneginf(out["tail_logmass"]).all()
    assert (out["topk_ids"].sort(-1).values == torch.arange(20)).all()  # every id once
    logp = (hidden_PH.double() @ head_VH.double().T).log_softmax(-1)
    torch.testing.assert_close(out["topk_logprobs"].double(), logp,
                               rtol=1e-5, atol=1e-5)


def test_extract_targets_no_positions_matches_the_shapes_of_some():
    hidden_PH, true_P, logits_fn, _ = random_head()
    spec = TargetSpec(top_k=5, num_draws=4)
    some = extract_targets(hidden_PH, true_P, logits_fn, spec, torch.Generator().manual_seed(0))
    none = extract_targets(hidden_PH[:0], true_P[:0], logits_fn, spec, torch.Generator().manual_seed(0))
    assert set(none) == set(some)
    for name in some:
        assert none[name].shape == (0, *some[name].shape[1:]) and none[name].dtype == some[name].dtype, name
