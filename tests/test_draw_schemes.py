"""Systematic draws (`teacher-cache build --draw-scheme systematic`) beside multinomial ones.

Every count is checked against N p computed here in float64 (a softmax of the logits, or the weights normalised):
each id's count is floor(N p) or ceil(N p), ids at p = 0 are never drawn, and over many independent offsets the mean
count / N is p within five standard errors (the count of one id takes two neighbouring values, so its variance is at
most 1/4, and the mean of S counts has a standard deviation of at most 0.5 / sqrt(S)). The same holds for the tail
draws of hybrid targets (against p(v) / tail mass, never a top-k id) and for the vllm backend's top-k + tail bucket.
Real builds of a tiny Llama record the scheme, hold counts within those bounds against the model's own forward pass,
refuse to be concatenated with stores of the other scheme, and train a student.

Legend: P positions, V vocabulary, J outcomes drawn from, N draws, S independent offsets, K top-k.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_student_config, write_jsonl
from transformers import AutoModelForCausalLM

from storage.concat import concat_stores
from storage.reader import Store
from storage.targets import concat_key, describe_targets
from storage.targets.sampled import draw_scheme
from student_train.cli import main as train_main
from teacher_cache import BuildConfig
from teacher_cache.cli import main
from teacher_cache.targets import TargetSpec, extract_targets
from teacher_cache.targets.draws import DEFAULT_DRAW_SCHEME, draw
from teacher_cache.vllm_backend import records_from_topk

SEQ_LEN, K, N = 32, 8, 16
# How far N p computed here may lie from the N p the draws were made from (fp32 probabilities there).
SLACK = 1e-4


def counts_of(draws_PN: torch.Tensor, J: int) -> torch.Tensor:
    """[P, J] float64 count of each outcome among the draws."""
    return torch.zeros(draws_PN.shape[0], J, dtype=torch.float64).scatter_add_(
        1, draws_PN, torch.ones_like(draws_PN, dtype=torch.float64))


def dense_counts(out: dict[str, torch.Tensor], J: int) -> torch.Tensor:
    """[P, J] float64 counts of the encoded draws of an extraction (ids + counts)."""
    P = out["sampled_nunique"].shape[0]
    row_E = torch.repeat_interleave(torch.arange(P), out["sampled_nunique"])
    return torch.zeros(P, J, dtype=torch.float64).index_put_(
        (row_E, out["sampled_ids"]), out["sampled_counts"].double(), accumulate=True)


def assert_floor_or_ceil(counts_PJ: torch.Tensor, p_PJ: torch.Tensor, num_draws: int, slack: float = 1e-9) -> None:
    """Each count is floor(N p) or ceil(N p) (within `slack` of N p), 0 where p = 0, and a row's counts sum to N."""
    expected_PJ = num_draws * p_PJ
    low, high = (expected_PJ - slack).floor(), (expected_PJ + slack).ceil()
    bad = (counts_PJ < low) | (counts_PJ > high)
    assert not bad.any(), (bad.nonzero()[:5], counts_PJ[bad][:5], expected_PJ[bad][:5])
    assert (counts_PJ[p_PJ == 0] == 0).all()
    assert (counts_PJ.sum(-1) == num_draws).all()


def assert_unbiased(counts_SJ: torch.Tensor, p_J: torch.Tensor, num_draws: int) -> None:
    """The mean of S count / N is p within 5 sigma, sigma = 0.5 / sqrt(S) / N (a count's variance is <= 1/4)."""
    S = counts_SJ.shape[0]
    tolerance = 5 * 0.5 / math.sqrt(S) / num_draws
    error_J = (counts_SJ.mean(0) / num_draws - p_J).abs()
    assert (error_J <= tolerance).all(), (error_J.max(), tolerance)


def extract_from_logits(logits_PV: torch.Tensor, spec: TargetSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """`extract_targets` of positions whose logits are exactly `logits_PV` (-inf included): each position's hidden
    state is its row index."""
    P = len(logits_PV)
    return extract_targets(torch.arange(P, dtype=torch.float32)[:, None], torch.zeros(P, dtype=torch.long),
                           lambda h_p1: logits_PV[h_p1[:, 0].long()], spec, torch.Generator().manual_seed(seed))


def random_weights(P: int, J: int, seed: int) -> torch.Tensor:
    """[P, J] fp32 weights: peaked (uniform^4), a third of the ids at 0, and row 0 all on one id."""
    g = torch.Generator().manual_seed(seed)
    weights_PJ = torch.rand(P, J, generator=g) ** 4
    weights_PJ[torch.rand(P, J, generator=g) < 1 / 3] = 0.0
    weights_PJ[:, J // 2] += 1e-3  # every row has some mass
    weights_PJ[0] = 0.0
    weights_PJ[0, J - 2] = 1.0
    return weights_PJ


# --------------------------------------------------------------------------------------- the count bound


def test_whole_expected_counts_are_drawn_exactly():
    """N p whole for every id: the counts are N p whatever the offset, and ids at p = 0 are skipped."""
    weights_PJ = torch.tensor([[0.5, 0.25, 0.0, 0.125, 0.125]]).repeat(500, 1)
    draws_PN = draw(weights_PJ, 8, "systematic", torch.Generator().manual_seed(0))
    assert (counts_of(draws_PN, 5) == torch.tensor([4.0, 2.0, 0.0, 1.0, 1.0], dtype=torch.float64)).all()
    one_PJ = torch.tensor([[0.0, 0.0, 1.0, 0.0]]).repeat(50, 1)
    assert (draw(one_PJ, 5, "systematic", torch.Generator().manual_seed(1)) == 2).all()


def test_hand_made_fractional_counts():
    """p = (0.3, 0, 0.7): N = 4 gives 1 or 2 of id 0 (N p = 1.2) and 2 or 3 of id 2 (2.8), both outcomes occur."""
    weights_PJ = torch.tensor([[0.3, 0.0, 0.7]]).repeat(2000, 1)
    counts_PJ = counts_of(draw(weights_PJ, 4, "systematic", torch.Generator().manual_seed(0)), 3)
    assert set(counts_PJ[:, 0].tolist()) == {1.0, 2.0} and set(counts_PJ[:, 2].tolist()) == {2.0, 3.0}
    assert (counts_PJ[:, 1] == 0).all()


@pytest.mark.parametrize("num_draws", [1, 3, 16, 50, 257])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_are_floor_or_ceil_of_n_p(num_draws, seed):
    weights_PJ = random_weights(64, 40, seed)
    draws_PN = draw(weights_PJ, num_draws, "systematic", torch.Generator().manual_seed(seed))
    p_PJ = weights_PJ.double() / weights_PJ.double().sum(-1, keepdim=True)
    assert_floor_or_ceil(counts_of(draws_PN, 40), p_PJ, num_draws)
    assert (draws_PN.diff(dim=1) >= 0).all()  # evenly spaced points give ascending ids


def test_counts_are_floor_or_ceil_of_n_p_over_a_large_vocabulary():
    """32000 ids, mass spread over thousands of them: the float64 cumulative sum keeps every interval exact."""
    weights_PJ = torch.randn(8, 32000, generator=torch.Generator().manual_seed(0)).mul(3).softmax(-1)
    draws_PN = draw(weights_PJ, 4096, "systematic", torch.Generator().manual_seed(0))
    assert_floor_or_ceil(counts_of(draws_PN, 32000), weights_PJ.double() / weights_PJ.double().sum(-1, True), 4096)


def test_ids_behind_a_large_cumulative_mass_keep_their_counts():
    """1000 ids with N p = 2.9999 after one id of mass 0.75, N = 60000: each is drawn 2 or 3 times, never 4. A
    cumulative sum near 0.75 resolved only to fp32's 6e-8 would stretch some of their intervals by up to
    N * 6e-8 = 0.0036 draws, past 3."""
    N_ = 60000
    weights_J = torch.cat([torch.tensor([0.75]), torch.full((1000,), (3 - 1e-4) / N_), torch.tensor([0.0])])
    weights_J[-1] = 1.0 - weights_J[:-1].double().sum()
    p_J = weights_J.double() / weights_J.double().sum()
    assert ((N_ * p_J[1:-1] - (3 - 1e-4)).abs() < 1e-5).all()  # the margin to 3 survives the fp32 weights
    draws_PN = draw(weights_J.repeat(50, 1), N_, "systematic", torch.Generator().manual_seed(0))
    assert_floor_or_ceil(counts_of(draws_PN, len(weights_J)), p_J.expand(50, -1), N_)


def test_a_point_rounded_up_to_the_total_draws_the_last_id_with_mass(monkeypatch):
    """The largest offset below 1, 1 - 2^-53, puts the last point (N - 1 + u) / N at the total once rounded: past
    every interval, it belongs to the last id with mass, not to the ids at p = 0 after it."""
    largest = 1.0 - 2.0**-53
    assert (3 + largest) * (1.0 / 4) == 1.0  # the rounding this test relies on
    monkeypatch.setattr(torch, "rand", lambda *shape, **kwargs: torch.full(*shape, largest, dtype=torch.float64))
    weights_PJ = torch.tensor([[0.25, 0.75, 0.0, 0.0]])
    assert draw(weights_PJ, 4, "systematic", None).tolist() == [[0, 1, 1, 1]]


def test_extracted_draws_of_the_full_distribution_are_floor_or_ceil_of_n_p():
    """Through `extract_targets` (fp32 probabilities, chunks of 7), against a float64 softmax of the logits."""
    P, V = 30, 50
    logits_PV = torch.randn(P, V, generator=torch.Generator().manual_seed(0)) * 3
    logits_PV[:, ::5] = float("-inf")
    out = extract_from_logits(logits_PV, TargetSpec(top_k=None, num_draws=N, chunk_positions=7,
                                                    draw_scheme="systematic"))
    assert_floor_or_ceil(dense_counts(out, V), logits_PV.double().softmax(-1), N, SLACK)


# ------------------------------------------------------------------------------------------ unbiasedness


@pytest.mark.parametrize("num_draws", [1, 7, 50])
def test_mean_counts_over_many_offsets_are_n_p(num_draws):
    """200 seeds x 100 positions of one distribution: 20000 independent offsets."""
    weights_J = random_weights(2, 30, 3)[1]
    counts = [counts_of(draw(weights_J.repeat(100, 1), num_draws, "systematic",
                             torch.Generator().manual_seed(seed)), 30) for seed in range(200)]
    p_J = weights_J.double() / weights_J.double().sum()
    assert (num_draws * p_J % 1 > 0.01).sum() >= 5  # fractional parts: the offset's randomness is tested
    assert_unbiased(torch.cat(counts), p_J, num_draws)


def test_systematic_is_the_default_and_multinomial_still_independent():
    """Independent draws: an id at p = 0.5 of N = 4 is drawn 0 or 4 times too, which systematic draws never do."""
    assert DEFAULT_DRAW_SCHEME == "systematic" == TargetSpec(top_k=None, num_draws=4).draw_scheme
    assert BuildConfig(model="m", dataset="d", output="o").draw_scheme == "systematic"
    weights_PJ = torch.tensor([[0.5, 0.5]]).repeat(2000, 1)
    counts = counts_of(draw(weights_PJ, 4, "multinomial", torch.Generator().manual_seed(0)), 2)[:, 0]
    assert {0.0, 4.0} <= set(counts.tolist())
    counts = counts_of(draw(weights_PJ, 4, "systematic", torch.Generator().manual_seed(0)), 2)[:, 0]
    assert set(counts.tolist()) == {2.0}


# ------------------------------------------------------------------------------------ hybrid and vllm draws


def test_hybrid_tail_draws_avoid_the_top_k_and_are_floor_or_ceil_of_the_tail_distribution():
    P, V, K_ = 40, 30, 4
    logits_PV = torch.randn(P, V, generator=torch.Generator().manual_seed(1)) * 2
    logits_PV[:5, 10:] = float("-inf")  # tails with ids at p = 0
    out = extract_from_logits(logits_PV, TargetSpec(top_k=K_, num_draws=N, chunk_positions=16, draws_from_tail=True,
                                                    draw_scheme="systematic"))
    p_PV = logits_PV.double().softmax(-1)
    assert torch.equal(out["topk_ids"], p_PV.topk(K_, -1).indices.sort(-1).values)
    tail_PV = p_PV.scatter(1, out["topk_ids"], 0.0)
    counts_PV = dense_counts(out, V)
    assert (counts_PV.gather(1, out["topk_ids"]) == 0).all()
    assert_floor_or_ceil(counts_PV, tail_PV / tail_PV.sum(-1, keepdim=True), N, SLACK)


def test_hybrid_tail_draws_are_unbiased_for_the_tail_distribution():
    """One position's logits repeated over 20000 positions (each its own offset): mean count / N -> p(v) / m."""
    S, V, K_, N_ = 20000, 24, 3, 5
    logits_V = torch.randn(V, generator=torch.Generator().manual_seed(2)) * 2
    out = extract_from_logits(logits_V.repeat(S, 1), TargetSpec(top_k=K_, num_draws=N_, chunk_positions=4096,
                                                                draws_from_tail=True, draw_scheme="systematic"))
    p_V = logits_V.double().softmax(-1)
    tail_V = p_V.scatter(0, p_V.topk(K_).indices, 0.0)
    counts_SV = dense_counts(out, V)
    assert (counts_SV[:, p_V.topk(K_).indices] == 0).all()
    assert_unbiased(counts_SV, tail_V / tail_V.sum(), N_)


def test_vllm_draws_from_the_top_k_and_the_tail_bucket():
    """The vllm backend's K + 1 outcomes (top-k ids, one bucket of the rest, stored as id V): floor or ceil of N p
    per outcome, and unbiased over many positions."""
    S, V, K_, N_ = 20000, 100, 5, 7
    logp_V = (torch.randn(V, generator=torch.Generator().manual_seed(3)) * 2).log_softmax(-1)
    top_logp_K, top_ids_K = logp_V.topk(K_)
    spec = TargetSpec(top_k=K_, num_draws=N_, draw_scheme="systematic")
    out = records_from_topk(top_ids_K.repeat(S, 1), top_logp_K.repeat(S, 1), torch.zeros(S), spec, V,
                            torch.Generator().manual_seed(0))
    p_J = torch.zeros(V + 1, dtype=torch.float64)
    p_J[top_ids_K] = top_logp_K.double().exp()
    p_J[V] = 1.0 - p_J.sum()
    counts_SJ = dense_counts(out, V + 1)
    assert_floor_or_ceil(counts_SJ, p_J.expand(S, -1), N_, SLACK)
    assert_unbiased(counts_SJ, p_J, N_)


def test_the_same_seed_gives_the_same_draws():
    logits_PV = torch.randn(20, 40, generator=torch.Generator().manual_seed(0)) * 2
    for targets in ({"top_k": None}, {"top_k": 4, "draws_from_tail": True}):
        spec = TargetSpec(num_draws=N, draw_scheme="systematic", **targets)
        first, again, other = (extract_from_logits(logits_PV, spec, seed) for seed in (5, 5, 6))
        for name in ("sampled_nunique", "sampled_ids", "sampled_counts"):
            assert torch.equal(first[name], again[name]), name
        assert not all(torch.equal(first[name], other[name]) for name in ("sampled_ids", "sampled_counts"))


# ---------------------------------------------------------------------------------------------- options


def test_the_option_is_checked():
    with pytest.raises(ValueError, match="--draw-scheme: 'stratified' is not one of systematic, multinomial"):
        BuildConfig(model="m", dataset="d", output="o", draw_scheme="stratified")
    result = CliRunner().invoke(main, ["build", "--model", "m", "--dataset", "d", "--output", "o",
                                       "--draw-scheme", "stratified"])
    assert result.exit_code == 2 and "--draw-scheme" in result.output and "systematic" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    help_text = CliRunner().invoke(main, ["build", "--help"]).output
    assert "--draw-scheme" in help_text and "floor(N p) or ceil(N p)" in " ".join(help_text.split())


def test_a_section_without_the_scheme_reads_as_multinomial():
    old = {"topk": {"k": 4}, "sampled": {"num_draws": 8, "seed": 1}}
    explicit = {"topk": {"k": 4}, "sampled": {"num_draws": 8, "seed": 2, "draw_scheme": "multinomial"}}
    systematic = {"topk": {"k": 4}, "sampled": {"num_draws": 8, "seed": 1, "draw_scheme": "systematic"}}
    assert draw_scheme(old["sampled"]) == "multinomial" and draw_scheme(systematic["sampled"]) == "systematic"
    assert concat_key(old) == concat_key(explicit) != concat_key(systematic)
    hybrid = {"topk": {"k": 4}, "sampled": systematic["sampled"] | {"draws_from": "tail"}}
    assert concat_key(hybrid) != concat_key(hybrid | {"sampled": old["sampled"] | {"draws_from": "tail"}})
    assert describe_targets(hybrid) == "hybrid: top-4 + tail mass, 8 draws from the tail outside the top-4 (systematic)"


# ------------------------------------------------------------------------------------------- real builds


def _build(llama_dir: Path, data: Path, output: Path, *options: str) -> Path:
    result = CliRunner().invoke(main, [
        "build", "--model", str(llama_dir), "--dataset", str(data), "--output", str(output), "--seq-len",
        str(SEQ_LEN), "--batch-size", "4", "--samples-per-shard", "4", "--max-samples", "6", "--top-k", str(K),
        "--samples", str(N), "--device", "cpu", "--dtype", "float32", *options])
    assert result.exit_code == 0, (result.output, result.exception)
    return output


@pytest.fixture(scope="module")
def data(tmp_path_factory, corpus_texts) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("draw-data") / "docs.jsonl", corpus_texts[:30])


@pytest.fixture(scope="module")
def stores(tmp_path_factory, llama_dir, data) -> dict[str, Path]:
    """topk,sampled stores of each scheme (systematic by default) and a systematic hybrid store, of the same 6
    samples."""
    root = tmp_path_factory.mktemp("draw-stores")
    return {
        "systematic": _build(llama_dir, data, root / "systematic"),
        "multinomial": _build(llama_dir, data, root / "multinomial", "--draw-scheme", "multinomial"),
        "hybrid": _build(llama_dir, data, root / "hybrid", "--targets", "hybrid"),
    }


def _teacher_probs(llama_dir: Path, store: Store):
    """(sample, [L, V] float64 probabilities of the teacher's own forward pass) of every sample of `store`."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    for sample in store:
        ids = torch.from_numpy(sample["input_ids"].astype(np.int64))
        with torch.no_grad():
            yield sample, model(ids[None, :-1]).logits[0].double().softmax(-1)


def _stored_counts(sample: dict, V: int) -> torch.Tensor:
    out = {name: torch.from_numpy(sample[name].astype(np.int64))
           for name in ("sampled_nunique", "sampled_ids", "sampled_counts")}
    return dense_counts(out, V)


def test_the_manifest_records_the_scheme(stores):
    targets = {name: Store(path).manifest.targets for name, path in stores.items()}
    assert targets["systematic"]["sampled"]["draw_scheme"] == "systematic"
    assert targets["hybrid"]["sampled"]["draw_scheme"] == "systematic"
    assert targets["hybrid"]["sampled"]["draws_from"] == "tail"
    assert "draw_scheme" not in targets["multinomial"]["sampled"]  # as every store built before the option
    assert draw_scheme(targets["multinomial"]["sampled"]) == "multinomial"
    info = CliRunner().invoke(main, ["info", str(stores["systematic"])])
    assert info.exit_code == 0 and "sampled: 16 draws (full distribution, systematic)" in info.output, info.output
    info = CliRunner().invoke(main, ["info", str(stores["hybrid"])])
    assert "draws from the tail outside the top-8 (systematic)" in info.output, info.output


def test_a_systematic_store_holds_floor_or_ceil_of_n_p(stores, llama_dir):
    """Against the tiny teacher's own forward pass, in float64 (its fp32 logits are the build's up to rounding)."""
    store = Store(stores["systematic"])
    V = store.manifest.teacher["vocab_size"]
    for sample, p_LV in _teacher_probs(llama_dir, store):
        mask = torch.from_numpy(sample["loss_mask"])
        assert_floor_or_ceil(_stored_counts(sample, V)[mask], p_LV[mask], N, 1e-3)


def test_a_systematic_hybrid_store_holds_floor_or_ceil_of_the_tail_draws(stores, llama_dir):
    store = Store(stores["hybrid"])
    V = store.manifest.teacher["vocab_size"]
    for sample, p_LV in _teacher_probs(llama_dir, store):
        mask = torch.from_numpy(sample["loss_mask"])
        top_LK = torch.from_numpy(sample["topk_ids"].astype(np.int64))
        tail_LV = p_LV.scatter(1, top_LK, 0.0)
        counts_LV = _stored_counts(sample, V)
        assert (counts_LV.gather(1, top_LK) == 0).all()
        assert_floor_or_ceil(counts_LV[mask], (tail_LV / tail_LV.sum(-1, keepdim=True))[mask], N, 1e-3)


def test_stores_of_different_schemes_are_not_concatenated(stores, tmp_path):
    with pytest.raises(ValueError, match=r"targets\.sampled\.draw_scheme: .* has 'systematic', .* has 'multinomial'"):
        concat_stores([stores["systematic"], stores["multinomial"]], tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()
    manifest = concat_stores([stores["systematic"], stores["systematic"]], tmp_path / "twice")
    assert manifest.targets["sampled"]["draw_scheme"] == "systematic"
    result = CliRunner().invoke(main, ["merge", str(stores["multinomial"]), str(stores["systematic"]),
                                       "--output", str(tmp_path / "cli")])
    assert result.exit_code == 2 and "draw_scheme" in result.output and "--draw-scheme" in result.output, result.output


def test_a_systematic_store_trains_a_student(stores, llama_dir, tmp_path):
    student = make_student_config(tmp_path / "student", llama_dir)
    result = CliRunner().invoke(train_main, [
        "--store", str(stores["systematic"]), "--student", str(student), "--output", str(tmp_path / "run"),
        "--targets-from", "sampled", "--max-steps", "2", "--batch-size", "2", "--eval-fraction", "0.34",
        "--eval-every", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "Student saved to" in result.output
